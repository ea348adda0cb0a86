"""The CIFAR-10 classifier: train_cnn + evaluate_cnn on tiny learnable data (CPU, seconds each)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import CLASSES, tool_env, write_params, write_prepared_cifar
from ptpipe import evaluate_cnn, train_cnn
from ptpipe.stage import StageError

def small(root: Path, recipe: str = "default", **overrides) -> None:
    """Select `recipe` and shrink it to a seconds-long CPU run; overrides are recipe keys."""
    shrink = {"default": {"model_args": {"widths": [8, 16, 16], "scale": 0.5}, "epochs": 3, "batch_size": 64,
                          "tta": 1}}.get(recipe, {})
    # 1 thread: a 2-thread op on a busy 2-core machine waits for the descheduled thread (4-10x slower)
    values = {"threads": 1, **shrink, **overrides}
    write_params(root, **{"cnn.recipe": recipe}, **{f"cnn.recipes.{recipe}.{k}": v for k, v in values.items()})


@pytest.fixture
def cnn_dir(in_tmp):
    write_prepared_cifar(in_tmp)
    return in_tmp


def outputs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for d in ("models", "dvclive", "metrics", "plots")
                  for p in (root / d).rglob("*") if p.is_file())


def test_learns_class_patches_far_above_chance(cnn_dir):
    small(cnn_dir, lr=0.01)
    result = train_cnn.main(progress=False)
    assert result.history[-1]["val/acc"] > 0.6  # chance is 0.1
    metrics = evaluate_cnn.main()
    assert metrics["test"]["acc"] > 0.6
    assert set(metrics["per_class_acc"]) == set(CLASSES)
    rows = json.loads((cnn_dir / "plots/cnn/confusion.json").read_text())
    assert len(rows) == 200 and set(rows[0]) == {"actual", "predicted"}
    assert (cnn_dir / "plots/cnn/predictions.png").read_bytes()[:4] == b"\x89PNG"
    live = json.loads((cnn_dir / "dvclive/cnn/metrics.json").read_text())
    assert {"train", "val"} <= set(live)


def test_tutorial_recipe_is_lenet_and_learns(cnn_dir):
    small(cnn_dir, "tutorial", lr=0.01, epochs=3)
    result = train_cnn.main(progress=False)
    saved = torch.load("models/cnn/model.pt", weights_only=True)
    assert saved["config"]["kind"] == "cnn" and saved["config"]["model_args"]["arch"] == "lenet"
    assert [tuple(v.shape) for k, v in saved["state_dict"].items() if k.endswith("weight")] == [
        (6, 3, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    assert result.history[-1]["val/acc"] > 0.3


def test_same_seed_same_metrics(cnn_dir, tmp_path):
    small(cnn_dir)
    first = train_cnn.main(progress=False).history
    second = train_cnn.main(progress=False, model_path=tmp_path / "again.pt", live_dir=None).history
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in h]  # noqa: E731
    assert strip(first) == strip(second)


def test_every_file_loads_with_weights_only(cnn_dir):
    small(cnn_dir, epochs=1)
    train_cnn.main(progress=False)
    saved = torch.load("models/cnn/model.pt", weights_only=True)
    from ptpipe.kinds.cnn import build_model

    model = build_model(**saved["config"]["model_args"])  # arch + the net's arguments
    model.load_state_dict(saved["state_dict"])  # rebuilt without params.yaml
    for path in Path("models").rglob("*.pt"):
        torch.load(path, weights_only=True)


def test_unprepared_workspace_says_which_stage_to_run_and_writes_nothing(in_tmp):
    small(in_tmp)  # params only: no data/prepared
    with pytest.raises(StageError, match=r"card\.json is missing: run `dvc repro prepare` first"):
        train_cnn.main(progress=False)
    assert sorted(p.name for p in in_tmp.iterdir()) == ["params.yaml"]


def test_non_finite_loss_names_the_step_and_writes_no_model(cnn_dir):
    small(cnn_dir, "tutorial", lr=1e8)
    with pytest.raises(StageError, match=r"non-finite training loss at epoch 1, step \d+: .* "
                                         r"lower the learning rate \(cnn\.recipes\.tutorial\.lr: 1e\+08\)"):
        train_cnn.main(progress=False)
    assert not Path("models/cnn/model.pt").exists()


@pytest.mark.parametrize("key, value, message", [
    ("cnn.recipes.default.epochs", "ten", "cnn.recipes.default.epochs"),
    ("cnn.recipes.default.lr", -0.1, "cnn.recipes.default.lr"),
    ("cnn.recipes.default.optimiser", "sgd", "cnn.recipes.default.optimiser: unknown key"),
    ("cnn.recipe", "fastest", "recipe 'fastest' is not one of cnn.recipes"),
    ("cnn.recipes.default.model_args", {"depth": 3}, "model_args: airbench takes no argument 'depth'"),
    ("cnn.recipes.default.checkpoint_every", 0, "cnn.recipes.default.checkpoint_every"),
    ("cnn.recipes.default.validation", "sometimes", "cnn.recipes.default.validation"),
    ("cnn.recipes.default.autocast", "float16", "cnn.recipes.default.autocast"),
    ("cnn.recipes.default.drop_last", "yes", "cnn.recipes.default.drop_last"),
])
def test_bad_cnn_params_name_the_key_and_write_nothing(cnn_dir, key, value, message):
    write_params(cnn_dir, **{key: value})
    with pytest.raises(StageError, match=message.replace("(", r"\(")):
        train_cnn.main(progress=False)
    assert outputs(cnn_dir) == []


def test_drop_last_with_a_batch_larger_than_the_data_is_refused_before_anything_is_written(cnn_dir):
    small(cnn_dir, batch_size=1024, drop_last=True)
    with pytest.raises(StageError, match=r"cnn.recipes.default: no training batch: batch_size 1024 is more than "
                                         r"the 600 training images per process and drop_last is on"):
        train_cnn.main(progress=False)
    assert outputs(cnn_dir) == []


def test_no_validation_and_no_checkpoint_when_train_val_holds_nothing_out(cnn_dir, monkeypatch):
    small(cnn_dir, train_split="train+val", checkpoint_every=100)  # validation: auto
    monkeypatch.setattr(train_cnn.CnnTask, "validate", lambda *a: pytest.fail("validated"))
    saved = []
    monkeypatch.setattr(train_cnn.trainer.files, "save_torch", lambda path, obj: saved.append(Path(path).name))
    result = train_cnn.main(progress=False)
    assert all("val/acc" not in row for row in result.history) and saved == ["model.pt"]
    final = json.loads(Path("metrics/cnn_train.json").read_text())
    assert final["val_acc"] is None and final["compiled"] is False and final["recompiles"] == 0


def test_airbench94_recipe_runs_on_cpu_and_its_loss_falls(cnn_dir):
    # the GPU recipe as written (SGD-nesterov, Lookahead, label smoothing, alternating flip, whitening,
    # TTA) but at a quarter of its widths, on 600 images: batch 1024 > 600, so one (partial) step per epoch
    small(cnn_dir, "airbench94", epochs=6, drop_last=False,
          model_args={"widths": [16, 64, 64], "scale": 1 / 9, "zero_whiten_bias": True})
    result = train_cnn.main(progress=False)
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.2
    metrics = evaluate_cnn.main()
    assert metrics["test"]["tta"] == 2 and metrics["test"]["acc"] > 0.2


@pytest.mark.slow  # three training runs, two of them fresh processes: ~15 s idle, ~50 s under load
def test_sigkill_mid_run_then_resume_matches_uninterrupted(cnn_dir, tmp_path):
    small(cnn_dir, epochs=4)
    write_prepared_cifar(cnn_dir, n_train=2000)  # epochs long enough to be killed inside one
    reference = train_cnn.main(progress=False, model_path=tmp_path / "ref/model.pt", live_dir=None,
                               metrics_path=None).history

    cmd = [sys.executable, "-m", "ptpipe.train_cnn"]
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
    final = json.loads((cnn_dir / "metrics/cnn_train.json").read_text())
    assert final["val_acc"] == reference[-1]["val/acc"] and final["val_loss"] == reference[-1]["val/loss"]
    assert not checkpoint.exists()


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused():
    from ptpipe.kinds.cnn import EpochImages

    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    kwargs = dict(seed=0, mean=[0.5] * 3, std=[0.5] * 3, flip="none", translate=0)
    with pytest.raises(StageError, match=r"batch_size 255 does not divide among train.nproc=2 processes"):
        EpochImages(images, labels, batch_size=255, world_size=2, rank=0, **kwargs)
    assert len(EpochImages(images, labels, batch_size=4, world_size=2, rank=1, **kwargs)) == 2


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
        wrapped = train_cnn.Lookahead(opt, model, total, steps_per_epoch) if ours else opt
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
