"""torch.compile in the CNN's training on the CPU: the warm-up compiles every graph the timed epochs need
(bf16 autocast, the last partial batch, validation), a failed compile is recorded (auto) or an error
(always), and the warm-up leaves no trace in the run's results.

torch.compile runs with backend "aot_eager" here (kinds.cnn.COMPILE_BACKEND): dynamo captures the
same graphs with the same guards and AOTAutograd builds their backward, but no C++ is generated;
inductor's code generation works on this CPU too (gcc 12) but takes ~3 minutes for the tiny net."""
import json

import pytest
import torch
import torch.nn.functional as F

from fixtures import evaluate_model, recipe_keys, train_model, write_params, write_prepared_cifar
from ptpipe import train
from ptpipe.kinds import cnn
from ptpipe.stage import StageError

TINY = {"epochs": 2, "batch_size": 64, "tta": 0}  # on top of the tiny params (conftest)


@pytest.fixture
def tiny(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setattr(cnn, "COMPILE_BACKEND", "aot_eager")
    write_prepared_cifar(tmp_path, n_train=150, n_val=40, n_test=40)  # batches of 64, 64 and a partial 22

    def recipe(**overrides):
        write_params(tmp_path, **{"models.cnn.recipe": "default"}, **recipe_keys("cnn", **{**TINY, **overrides}))
    return recipe


def metrics(root) -> dict:
    return json.loads((root / "metrics/cnn/train.json").read_text())


def test_compile_always_with_bf16_autocast_compiles_in_the_warm_up_only(tiny, tmp_path):
    tiny(compile="always", autocast="bfloat16")
    result = train_model(tmp_path, "cnn")
    m = metrics(tmp_path)
    assert m["compiled"] is True and m["compile_error"] is None and m["autocast"] == "bfloat16"
    # train mode at 64 and at the partial 22, eval mode at 40 (the validation set): one graph each
    assert m["graphs"] == 3 and m["graph_breaks"] == 0
    assert m["recompiles"] == 0  # nothing compiled inside the timed epochs
    assert m["torch"] == torch.__version__ and m["gpu"] is None and m["warmup_seconds"] > 0
    assert m["train_seconds"] > 0 and m["other_seconds"] >= 0
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in result.history)
    assert evaluate_model(tmp_path, "cnn")["test"]["images"] == 40  # the model file of a compiled run loads and evaluates


def test_a_shape_the_warm_up_missed_is_counted_as_a_recompile(tiny, tmp_path, monkeypatch):
    tiny(compile="always", autocast="bfloat16")
    monkeypatch.setattr(train, "warm_up", lambda *args: 0.0)  # no warm-up: training compiles its own graphs
    train_model(tmp_path, "cnn")
    assert metrics(tmp_path)["graphs"] == 0 and metrics(tmp_path)["recompiles"] == 3


def _boom(*args, **kwargs):
    raise RuntimeError("inductor is broken here")


def test_a_failed_compile_under_auto_warns_falls_back_to_eager_and_is_recorded(monkeypatch, capsys):
    """`auto` compiles on a GPU only: the GPU is faked for this one call (synchronize is its only GPU call)."""
    monkeypatch.setattr(torch, "compile", _boom)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    torch.manual_seed(0)
    model = cnn.build_model("airbench", widths=[8, 16, 16])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    parts = {"batches": lambda epoch: [(x, y)], "evaluate": None, "autocast_dtype": None,
             "loss": lambda m, batch, carry: (F.cross_entropy(m(batch[0]), batch[1]), 8, None)}
    eager = model(x)
    with pytest.warns(RuntimeWarning, match="torch.compile FAILED, training EAGERLY"):
        facts = cnn.compile_and_warm_up(model, parts, torch.device("cuda"), "auto", "recipes.cnn.default")
    assert facts["compile"] == "auto" and facts["compiled"] is False
    assert facts["compile_error"] == "RuntimeError: inductor is broken here" and facts["warmup_seconds"] > 0
    assert "torch.compile failed: training eagerly (recipes.cnn.default.compile: auto)" in capsys.readouterr().err
    assert torch.equal(model(x), eager)  # eager again, the weights untouched by the warm-up


def test_compile_never_and_auto_on_the_cpu_train_eagerly_with_the_same_results(tiny, tmp_path):
    tiny(compile="never")
    eager = train_model(tmp_path, "cnn", model_path=tmp_path / "eager/model.pt", live_dir=None, metrics_path=None)
    tiny(compile="auto")  # auto: compile on a GPU only
    auto = train_model(tmp_path, "cnn")
    m = metrics(tmp_path)
    assert m["compile"] == "auto" and m["compiled"] is False and m["compile_error"] is None and m["recompiles"] == 0
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in h]  # noqa: E731
    assert strip(auto.history) == strip(eager.history)


def test_a_failed_compile_under_always_is_an_error_and_writes_no_model(tiny, tmp_path, monkeypatch):
    tiny(compile="always")
    monkeypatch.setattr(torch, "compile", _boom)
    with pytest.raises(StageError, match=r"torch.compile failed \(RuntimeError: inductor is broken here\): "
                                         r"recipes.cnn.default.compile is 'always'; set it to auto"):
        train_model(tmp_path, "cnn")
    assert not (tmp_path / "models/cnn/model.pt").exists() and not (tmp_path / "metrics/cnn/train.json").exists()


def test_the_warm_up_changes_no_weight_statistic_gradient_or_rng():
    model = cnn.build_model("airbench", widths=[8, 16, 16])
    images, labels = torch.randint(0, 255, (150, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (150,))
    epochs = cnn.EpochImages(images, labels, batch_size=64, seed=0, mean=[0.5] * 3, std=[0.25] * 3,
                             flip="alternate", translate=2)
    val_x, val_y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))

    def loss(m, batch, carry):
        x, y = batch
        return F.cross_entropy(m(x).float(), y, label_smoothing=0.1), len(y), None

    def evaluate(m):
        return {"val/loss": F.cross_entropy(m(val_x).float(), val_y).item()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    seconds = train.warm_up(model, epochs.epoch(0), loss, evaluate, torch.device("cpu"), torch.bfloat16)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
