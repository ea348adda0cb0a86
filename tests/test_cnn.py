"""The image classifier kind: train@cnn + evaluate@cnn on tiny learnable data (CPU, seconds each)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import (CLASSES, evaluate_model, recipe_keys, tool_env, train_command, train_model, write_params,
                      write_prepared_cifar)
from ptpipe import kinds, params, train
from ptpipe.kinds import cnn
from ptpipe.stage import StageError

SHRINK = {"default": {"epochs": 3, "batch_size": 64, "tta": 1}}  # on top of the tiny params (conftest)


def small(root: Path, recipe: str = "default", **overrides) -> None:
    """Train models.cnn with `recipe`, shrunk to a seconds-long CPU run; overrides are recipe keys."""
    write_params(root, **{"models.cnn.recipe": recipe}, **recipe_keys("cnn", recipe, **{**SHRINK.get(recipe, {}),
                                                                                         **overrides}))


@pytest.fixture
def cnn_dir(tmp_path, tiny_params):
    write_prepared_cifar(tmp_path)
    return tmp_path


def outputs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for d in ("models", "dvclive", "metrics", "reports")
                  for p in (root / d).rglob("*") if p.is_file())


def test_learns_class_patches_far_above_chance(cnn_dir):
    small(cnn_dir, lr=0.01)
    result = train_model(cnn_dir, "cnn")
    assert result.history[-1]["val/acc"] > 0.6  # chance is 0.1
    metrics = evaluate_model(cnn_dir, "cnn")
    assert metrics["test"]["acc"] > 0.6
    assert set(metrics["per_class_acc"]) == set(CLASSES)
    assert json.loads((cnn_dir / "metrics/cnn/evaluate.json").read_text()) == metrics
    rows = json.loads((cnn_dir / "reports/cnn/evaluate/confusion.json").read_text())
    assert len(rows) == 200 and set(rows[0]) == {"actual", "predicted"}
    assert (cnn_dir / "reports/cnn/evaluate/predictions.png").read_bytes()[:4] == b"\x89PNG"
    live = json.loads((cnn_dir / "dvclive/cnn/metrics.json").read_text())
    assert {"train", "val"} <= set(live)
    final = json.loads((cnn_dir / "metrics/cnn/train.json").read_text())
    assert final["val_acc"] == result.best["val/acc"] and final["epochs_run"] == 3 and final["best_epoch"] == 3
    assert final["compiled"] is False and final["device"] == "cpu" and final["gpu"] is None


def test_tutorial_recipe_is_lenet_and_learns(cnn_dir):
    small(cnn_dir, "tutorial", lr=0.01, epochs=3)
    result = train_model(cnn_dir, "cnn")
    saved = torch.load(cnn_dir / "models/cnn/model.pt", weights_only=True)
    assert saved["config"]["kind"] == "cnn" and saved["config"]["model_args"]["arch"] == "lenet"
    assert [tuple(v.shape) for k, v in saved["state_dict"].items() if k.endswith("weight")] == [
        (6, 3, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    assert result.history[-1]["val/acc"] > 0.3


def test_same_seed_same_metrics(cnn_dir, tmp_path):
    small(cnn_dir)
    first = train_model(cnn_dir, "cnn").history
    second = train_model(cnn_dir, "cnn", model_path=tmp_path / "again/model.pt", live_dir=None).history
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in h]  # noqa: E731
    assert strip(first) == strip(second)


def test_every_file_loads_with_weights_only(cnn_dir):
    small(cnn_dir, epochs=1)
    train_model(cnn_dir, "cnn")
    saved = torch.load(cnn_dir / "models/cnn/model.pt", weights_only=True)
    model = cnn.build_model(**saved["config"]["model_args"])  # arch + the net's arguments
    model.load_state_dict(saved["state_dict"])  # rebuilt without params.yaml
    assert saved["config"]["data"]["classes"] == CLASSES and saved["config"]["data"]["name"] == "cifar10"
    for path in (cnn_dir / "models").rglob("*.pt"):
        torch.load(path, weights_only=True)


def test_unprepared_workspace_says_which_stage_to_run_and_writes_nothing(tmp_path, tiny_params):
    small(tmp_path)  # params only: no data/prepared
    with pytest.raises(StageError, match=r"holds no prepared cifar10-python data \(card\.json is missing\): "
                                         r"run `dvc repro prepare@cifar10` first"):
        train_model(tmp_path, "cnn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_non_finite_loss_names_the_step_and_writes_no_model(cnn_dir):
    small(cnn_dir, "tutorial", lr=10)  # the largest lr the params allow
    with pytest.raises(StageError, match=r"non-finite training loss at epoch 1, step \d+: .* "
                                         r"lower the learning rate \(recipes\.cnn\.tutorial\.lr: 10, "
                                         r"recipes\.cnn\.tutorial\.optimizer: sgd\)"):
        train_model(cnn_dir, "cnn")
    assert outputs(cnn_dir) == []


@pytest.mark.parametrize("key, value, message", [
    ("recipes.cnn.default.epochs", "ten", "recipes.cnn.default.epochs"),
    ("recipes.cnn.default.lr", -0.1, "recipes.cnn.default.lr"),
    ("recipes.cnn.default.optimiser", "sgd", "recipes.cnn.default.optimiser: unknown key"),
    ("models.cnn.recipe", "fastest", "models.cnn.recipe: 'fastest' is not one of recipes.cnn"),
    ("recipes.cnn.default.model_args", {"depth": 3}, "recipes.cnn.default.model_args: airbench takes no argument 'depth'"),
    ("recipes.cnn.default.checkpoint_every", 0, "recipes.cnn.default.checkpoint_every"),
    ("recipes.cnn.default.validation", "sometimes", "recipes.cnn.default.validation"),
    ("recipes.cnn.default.autocast", "float16", "recipes.cnn.default.autocast"),
    ("recipes.cnn.default.drop_last", "yes", "recipes.cnn.default.drop_last"),
    ("models.cnn.data", "alice", "models.cnn.data: 'alice' is text data"),
])
def test_bad_cnn_params_name_the_key_and_write_nothing(cnn_dir, key, value, message):
    write_params(cnn_dir, **{key: value})
    with pytest.raises(StageError, match=message.replace("(", r"\(")):
        train_model(cnn_dir, "cnn")
    assert outputs(cnn_dir) == []


def test_drop_last_with_a_batch_larger_than_the_data_is_refused_before_anything_is_written(cnn_dir):
    small(cnn_dir, batch_size=1024, drop_last=True)
    with pytest.raises(StageError, match=r"recipes.cnn.default: no training batch: batch_size 1024 is more than "
                                         r"the 600 training images per process and drop_last is on"):
        train_model(cnn_dir, "cnn")
    assert outputs(cnn_dir) == []


def test_no_validation_and_no_checkpoint_when_train_val_holds_nothing_out(cnn_dir, monkeypatch):
    small(cnn_dir, train_split="train+val", checkpoint_every=100)  # validation: auto
    saved, save = [], train.files.save_torch
    monkeypatch.setattr(train.files, "save_torch", lambda path, obj: (saved.append(Path(path).name), save(path, obj)))
    result = train_model(cnn_dir, "cnn")
    assert all("val/acc" not in row and "val/loss" not in row for row in result.history) and saved == ["model.pt"]
    final = json.loads((cnn_dir / "metrics/cnn/train.json").read_text())
    assert "val_acc" not in final and final["compiled"] is False and final["recompiles"] == 0


def test_airbench94_recipe_runs_on_cpu_and_its_loss_falls(cnn_dir):
    # the GPU recipe as written (SGD-nesterov, Lookahead, label smoothing, alternating flip, whitening,
    # TTA) but at a quarter of its widths, on 600 images: batch 1024 > 600, so one (partial) step per epoch
    small(cnn_dir, "airbench94", epochs=6, drop_last=False,
          model_args={"widths": [16, 64, 64], "scale": 1 / 9, "zero_whiten_bias": True})
    result = train_model(cnn_dir, "cnn")
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.2
    metrics = evaluate_model(cnn_dir, "cnn")
    assert metrics["test"]["tta"] == 2 and metrics["test"]["acc"] > 0.2


@pytest.mark.slow  # three training runs, two of them fresh processes: ~15 s idle, ~50 s under load
def test_sigkill_mid_run_then_resume_matches_uninterrupted(cnn_dir, tmp_path):
    small(cnn_dir, epochs=4)
    write_prepared_cifar(cnn_dir, n_train=2000)  # epochs long enough to be killed inside one
    reference = train_model(cnn_dir, "cnn", model_path=tmp_path / "ref/model.pt", live_dir=None,
                            metrics_path=None).history

    cmd = train_command(cnn_dir, "cnn")
    proc = subprocess.Popen(cmd, cwd=cnn_dir, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = cnn_dir / "models/cnn/checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cnn_dir / "models/cnn/model.pt").exists()
    torch.load(checkpoint, weights_only=True)

    rerun = subprocess.run(cmd, cwd=cnn_dir, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    resumed = torch.load(cnn_dir / "models/cnn/model.pt", weights_only=True)
    ref = torch.load(tmp_path / "ref/model.pt", weights_only=True)
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    final = json.loads((cnn_dir / "metrics/cnn/train.json").read_text())
    assert final["val_acc"] == reference[-1]["val/acc"] and final["val_loss"] == reference[-1]["val/loss"]
    assert not checkpoint.exists()


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused():
    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    kwargs = dict(seed=0, mean=[0.5] * 3, std=[0.5] * 3, flip="none", translate=0)
    with pytest.raises(StageError, match=r"batch_size 255 does not divide among train.nproc=2 processes"):
        cnn.EpochImages(images, labels, batch_size=255, world_size=2, rank=0, **kwargs)
    assert len(cnn.EpochImages(images, labels, batch_size=4, world_size=2, rank=1, **kwargs)) == 2


def hint(root: Path) -> str:
    """The hint the CNN's Training carries (what a non-finite or diverged run says), for models.cnn."""
    p = params.load(root / "params.yaml")
    r, recipe = p.recipe("cnn"), p.models["cnn"].recipe
    return cnn.training(r, root / "data/prepared/cifar10", torch.device("cpu"), train.Distributed(),
                        key=f"recipes.cnn.{recipe}", default_lr=p.lr).hint


def test_non_finite_hint_names_the_recipe_keys_in_effect(cnn_dir):
    p = params.load(cnn_dir / "params.yaml")  # default recipe: lr null -> the top-level lr, AdamW with weight decay
    assert hint(cnn_dir) == (
        f"lower the learning rate (lr: {p.lr:g}, recipes.cnn.default.optimizer: adamw) "
        f"or lower recipes.cnn.default.weight_decay ({p.recipe('cnn').weight_decay:g})")
    small(cnn_dir, "airbench94", model_args={"widths": [8, 16, 16]}, drop_last=False)
    h = hint(cnn_dir)
    assert h.startswith("lower the learning rate (recipes.cnn.airbench94.lr: 1.5, "
                        "recipes.cnn.airbench94.optimizer: sgd), ")
    assert h.endswith("or lower recipes.cnn.airbench94.bias_lr_scale (64)")


def test_a_recipe_records_its_resolved_lr_and_data(cnn_dir):
    small(cnn_dir, epochs=1)  # lr null: the top-level lr
    write_params(cnn_dir, lr=0.002)
    train_model(cnn_dir, "cnn")
    config = kinds.load_file(cnn_dir / "models/cnn/model.pt")["config"]
    assert config["params"]["lr"] == 0.002 and config["model_args"]["image_size"] == 32
    assert config["data"]["name"] == "cifar10" and config["data"]["format"] == "cifar10-python"


def test_lookahead_follows_airbench94s_schedule():
    # airbench94's loop, written out: EMA from epoch 3 every 5 steps, copied back after every epoch
    from torch import nn

    steps_per_epoch, epochs = 7, 6
    total = steps_per_epoch * epochs
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(total)]

    def run(ours: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        wrapped = cnn.Lookahead(opt, model, total, steps_per_epoch, every=5, start_epoch=3) if ours else opt
        ema, steps = None, 0
        for epoch in range(epochs):
            for b in batches[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]:
                wrapped.zero_grad()
                model(b).pow(2).mean().backward()
                wrapped.step()
                steps += 1
                if not ours and epoch >= 3 and steps % 5 == 0:
                    if ema is None:
                        ema = {k: v.clone() for k, v in model.state_dict().items()}
                    else:
                        rho = 0.95**5 * (steps / total) ** 3
                        for e, p in zip(ema.values(), model.state_dict().values()):
                            if p.is_floating_point():
                                e.lerp_(p, 1 - rho)
                                p.copy_(e)
            if not ours and ema is not None:
                for e, p in zip(ema.values(), model.state_dict().values()):
                    if p.is_floating_point():
                        p.copy_(e)
        return model.state_dict()

    ours, reference = run(True), run(False)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_lookahead_state_is_checkpointed_and_restored():
    from torch import nn

    model = nn.Linear(4, 4)
    la = cnn.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), model, total=20, per_epoch=2, every=1,
                       start_epoch=0)
    for _ in range(3):
        la.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        la.step()
    state = la.state_dict()
    other = cnn.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), model, 20, 2, 1, 0)
    other.load_state_dict(state)
    assert other.steps == 3 and all(torch.equal(a, b) for a, b in zip(other.ema, la.ema))
