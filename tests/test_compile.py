"""torch.compile in train_cnn on the CPU: the warm-up compiles every graph the timed epochs need
(bf16 autocast, the last partial batch, validation), a failed compile is recorded (auto) or an
error (always), and the warm-up leaves no trace in the run's results.

torch.compile runs with backend "aot_eager" here (train_cnn.COMPILE_BACKEND): dynamo captures the
same graphs with the same guards and AOTAutograd builds their backward, but no C++ is generated;
inductor's code generation works on this CPU too (gcc 12) but takes ~3 minutes for the tiny net."""
import json
from pathlib import Path

import pytest
import torch

from fixtures import write_params, write_prepared_cifar
from ptpipe import evaluate_cnn, train_cnn, trainer
from ptpipe.stage import StageError

TINY = {"model_args": {"widths": [8, 16, 16], "scale": 0.5}, "epochs": 2, "batch_size": 64, "tta": 0, "threads": 1}


@pytest.fixture
def tiny(in_tmp, monkeypatch):
    monkeypatch.setattr(train_cnn, "COMPILE_BACKEND", "aot_eager")
    write_prepared_cifar(in_tmp, n_train=150, n_val=40, n_test=40)  # batches of 64, 64 and a partial 22

    def params(**overrides):
        write_params(in_tmp, **{"cnn.recipe": "default"},
                     **{f"cnn.recipes.default.{k}": v for k, v in {**TINY, **overrides}.items()})
    return params


def metrics() -> dict:
    return json.loads(Path("metrics/cnn_train.json").read_text())


def test_compile_always_with_bf16_autocast_compiles_in_the_warm_up_only(tiny):
    tiny(compile="always", autocast="bfloat16")
    result = train_cnn.main(progress=False)
    m = metrics()
    assert m["compiled"] is True and m["compile_error"] is None and m["autocast"] == "bfloat16"
    # train mode at 64 and at the partial 22, eval mode at 40 (the validation set): one graph each
    assert m["graphs"] == 3 and m["graph_breaks"] == 0
    assert m["recompiles"] == 0  # nothing compiled inside the timed epochs
    assert m["torch"] == torch.__version__ and m["gpu"] is None and m["warmup_seconds"] > 0
    assert m["train_seconds"] > 0 and m["other_seconds"] >= 0
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in result.history)
    assert evaluate_cnn.main()["test"]["images"] == 40  # the model file of a compiled run loads and evaluates


def test_a_shape_the_warm_up_missed_is_counted_as_a_recompile(tiny, monkeypatch):
    tiny(compile="always", autocast="bfloat16")
    monkeypatch.setattr(trainer, "warm_up", lambda *args: 0.0)  # no warm-up: training compiles its own graphs
    train_cnn.main(progress=False)
    assert metrics()["graphs"] == 0 and metrics()["recompiles"] == 3


def _boom(*args, **kwargs):
    raise RuntimeError("inductor is broken here")


def test_a_failed_compile_under_auto_warns_trains_eagerly_and_is_recorded(tiny, monkeypatch, tmp_path):
    tiny(compile="never")
    eager = train_cnn.main(progress=False, model_path=tmp_path / "eager.pt", live_dir=None, metrics_path=None)
    tiny(compile="auto")
    monkeypatch.setattr(train_cnn, "wants_compile", lambda mode, device: mode != "never")  # auto as on a GPU
    monkeypatch.setattr(torch, "compile", _boom)
    with pytest.warns(RuntimeWarning, match="torch.compile FAILED, training EAGERLY"):
        fallback = train_cnn.main(progress=False)
    m = metrics()
    assert m["compile"] == "auto" and m["compiled"] is False
    assert m["compile_error"] == "RuntimeError: inductor is broken here"
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in h]  # noqa: E731
    assert strip(fallback.history) == strip(eager.history)  # the eager fallback is the plain eager run


def test_a_failed_compile_under_always_is_an_error_and_writes_no_model(tiny, monkeypatch):
    tiny(compile="always")
    monkeypatch.setattr(torch, "compile", _boom)
    with pytest.raises(StageError, match=r"torch.compile failed \(RuntimeError: inductor is broken here\): "
                                         r"cnn.recipes.default.compile is 'always'; set it to auto"):
        train_cnn.main(progress=False)
    assert not Path("models/cnn/model.pt").exists() and not Path("metrics/cnn_train.json").exists()


def test_the_warm_up_changes_no_weight_statistic_gradient_or_rng(tiny):
    from ptpipe.kinds.cnn import EpochImages, build_model

    model = build_model("airbench", widths=[8, 16, 16])
    images, labels = torch.randint(0, 255, (150, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (150,))
    train = EpochImages(images, labels, batch_size=64, seed=0, mean=[0.5] * 3, std=[0.25] * 3,
                        flip="alternate", translate=2)
    task = train_cnn.CnnTask(train, torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)), 0.1)
    spec = trainer.Fit(epochs=1, model_path=Path("m.pt"), checkpoint_path=Path("c.pt"), config={},
                       autocast_dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    trainer.warm_up(model, task, spec, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
