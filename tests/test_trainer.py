"""The shared loop's non-finite guard: it syncs with the device only every SYNC_EVERY steps, yet
names the exact first bad step, and writes neither a model nor a checkpoint."""
import pytest
import torch
from torch import nn

from ptpipe import files, trainer
from ptpipe.stage import StageError


class NanAtStep:
    """A linear-regression task whose loss is NaN from step `bad` (1-based, epoch 1) on."""

    unit = "item"

    def __init__(self, bad: int, steps: int = 130):
        self.bad, self.steps, self.seen = bad, steps, 0

    def train_batches(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(self.steps):
            yield torch.randn(4, 3, generator=g)

    def loss(self, model, batch):
        self.seen += 1
        loss = model(batch).pow(2).mean()
        return (loss * float("nan") if self.seen >= self.bad else loss), len(batch)

    def validate(self, model):
        return {"val/loss": 0.0}


@pytest.mark.parametrize("bad", [1, 7, trainer.SYNC_EVERY, trainer.SYNC_EVERY + 1, 2 * trainer.SYNC_EVERY + 13, 130])
def test_non_finite_guard_names_the_exact_first_bad_step(tmp_path, bad):
    model = nn.Linear(3, 1)
    spec = trainer.Fit(epochs=1, model_path=tmp_path / "model.pt", checkpoint_path=tmp_path / "ckpt.pt",
                       config={}, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(StageError, match=rf"non-finite training loss at epoch 1, step {bad}: "):
        trainer.fit(model, NanAtStep(bad), opt, None, spec, torch.device("cpu"))
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "ckpt.pt").exists()


def test_train_loss_is_the_mean_over_all_steps(tmp_path):
    # the losses are summed in chunks of SYNC_EVERY: the epoch's mean must still be over every step
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = trainer.Fit(epochs=1, model_path=tmp_path / "model.pt", checkpoint_path=tmp_path / "ckpt.pt",
                       config={}, progress=False)
    task = NanAtStep(bad=10**9, steps=123)
    reference = []
    ref_model = nn.Linear(3, 1)
    ref_model.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01)
    for x in task.train_batches(0):
        loss = ref_model(x).pow(2).mean()
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        reference.append(loss.item())
    result = trainer.fit(model, task, torch.optim.SGD(model.parameters(), lr=0.01), None, spec, torch.device("cpu"))
    assert result.history[0]["train/loss"] == pytest.approx(sum(reference) / len(reference), rel=1e-6)


class StopsAtEpoch(NanAtStep):
    """Like a killed run: epoch `stop` raises, after the checkpoint of the epoch before it."""

    def __init__(self, stop: int):
        super().__init__(bad=10**9, steps=5)
        self.stop = stop

    def train_batches(self, epoch):
        if epoch == self.stop:
            raise KeyboardInterrupt
        yield from super().train_batches(epoch)


def test_a_checkpoint_resumes_only_on_the_same_data_and_survives_garbage(tmp_path, capsys):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "ids.npy").write_bytes(b"first version")

    def run(task):
        spec = trainer.Fit(epochs=3, model_path=tmp_path / "model.pt", checkpoint_path=tmp_path / "ckpt.pt",
                           config={"lr": 0.01}, inputs=(data,), progress=False)
        model = nn.Linear(3, 1)
        return trainer.fit(model, task, torch.optim.SGD(model.parameters(), lr=0.01), None, spec,
                           torch.device("cpu"))

    with pytest.raises(KeyboardInterrupt):
        run(StopsAtEpoch(stop=1))
    assert (tmp_path / "ckpt.pt").exists()
    (data / "ids.npy").write_bytes(b"second version")  # e.g. `dvc exp run -S prepare...` after the kill
    with pytest.raises(KeyboardInterrupt):
        run(StopsAtEpoch(stop=2))
    out = capsys.readouterr().out
    assert "it was written with other params, data" in out and "resuming" not in out
    result = run(StopsAtEpoch(stop=None))  # same data as the checkpoint now: resumes after epoch 2
    assert "resuming from" in capsys.readouterr().out and len(result.history) == 3

    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")  # a foreign or truncated file
    with pytest.raises(KeyboardInterrupt):
        run(StopsAtEpoch(stop=1))
    assert "unreadable" in capsys.readouterr().out


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StageError, match=r"train.nproc asks for 2 processes but this machine has 1 GPU\(s\)"):
        trainer.resolve_device("cuda", trainer.Distributed(rank=1, world_size=2, local_rank=1))
    assert trainer.resolve_device("cuda", trainer.Distributed(rank=0, world_size=2, local_rank=0)).index == 0


def test_same_weights_same_bytes_for_a_straight_and_a_resumed_run(tmp_path):
    """model.pt is byte-reproducible: the atomic write's random temporary name must not end up inside
    the zip archive, so an uninterrupted run and a resumed one (other folders) hash the same."""
    def run(folder, task):
        folder.mkdir(exist_ok=True)
        spec = trainer.Fit(epochs=3, model_path=folder / "model.pt", checkpoint_path=folder / "ckpt.pt",
                           config={"lr": 0.01}, progress=False)
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        return trainer.fit(model, task, torch.optim.SGD(model.parameters(), lr=0.01), None, spec,
                           torch.device("cpu"))

    run(tmp_path / "straight", StopsAtEpoch(stop=None))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", StopsAtEpoch(stop=1))
    run(tmp_path / "resumed", StopsAtEpoch(stop=None))
    assert files.digest(tmp_path / "straight/model.pt", "md5") == files.digest(tmp_path / "resumed/model.pt", "md5")


def test_the_explicit_lr_of_each_step_is_what_lambdalr_gave():
    """The loop sets every group's lr itself from one schedule function (no LambdaLR); at step k it must
    be what LambdaLR stepped k times gave, so the CNN and LSTM metrics stay what they were."""
    schedule = trainer.lr_schedule("onecycle", 40, warmup_fraction=0.2, initial_lr_factor=0.1, final_lr_factor=0.05)
    params = [nn.Parameter(torch.zeros(1)) for _ in range(3)]

    def groups():
        return [{"params": [params[0]], "lr": 0.3}, {"params": [params[1]], "lr": 0.3 * 64},
                {"params": [params[2]], "lr": 0.3, "frozen_after": 12}]

    old = torch.optim.SGD(groups(), lr=0.3, momentum=0.9)
    lambdalr = torch.optim.lr_scheduler.LambdaLR(old, [schedule, schedule, lambda s: schedule(s) if s < 12 else 0.0])
    new = trainer.make_optimizer(groups(), "sgd", 0.3, momentum=0.9)
    for step in range(45):
        trainer.set_lr(new, schedule, step)
        assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in old.param_groups], step
        old.step()  # (no gradients: moves nothing; LambdaLR expects it first)
        lambdalr.step()
    assert new.param_groups[2]["lr"] == 0.0 and new.param_groups[0]["lr"] == pytest.approx(0.3 * 0.05)


class Counting(NanAtStep):
    """A finite task that counts its validations."""

    def __init__(self, stop=None):
        super().__init__(bad=10**9, steps=5)
        self.stop, self.validations = stop, 0

    def train_batches(self, epoch):
        if epoch == self.stop:
            raise KeyboardInterrupt  # a kill after the checkpoint of the epochs before
        yield from super().train_batches(epoch)

    def validate(self, model):
        self.validations += 1
        return {"val/loss": 0.0}


def _run(tmp_path, task, name, **fit):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = trainer.Fit(epochs=5, model_path=tmp_path / f"{name}.pt", checkpoint_path=tmp_path / f"{name}.ckpt",
                       config={}, progress=False, **fit)
    result = trainer.fit(model, task, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None, spec,
                         torch.device("cpu"))
    return result, torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"]


def test_checkpoint_every_n_epochs_resumes_exactly(tmp_path, capsys):
    reference, ref_state = _run(tmp_path, Counting(), "ref")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, Counting(stop=4), "cut", checkpoint_every=2)  # checkpoints after epochs 2 and 4 only
    saved = torch.load(tmp_path / "cut.ckpt", weights_only=True)
    assert saved["epoch"] == 3  # 0-based: the checkpoint of epoch 4; the kill came in epoch 5
    result, state = _run(tmp_path, Counting(), "cut", checkpoint_every=2)
    assert "resuming from" in capsys.readouterr().out
    assert [r["train/loss"] for r in result.history] == [r["train/loss"] for r in reference.history]
    assert all(torch.equal(ref_state[k], v) for k, v in state.items())
    assert not (tmp_path / "cut.ckpt").exists()


def test_no_validation_when_asked_and_monitoring_then_is_refused(tmp_path):
    task = Counting()
    result, _ = _run(tmp_path, task, "noval", validate=False)
    assert task.validations == 0 and all("val/loss" not in r for r in result.history)
    assert result.train_seconds > 0 and result.other_seconds >= 0
    with pytest.raises(ValueError, match="monitor/patience need validation"):
        _run(tmp_path, Counting(), "bad", validate=False, monitor="val/loss")


def test_a_given_stopwatch_times_the_training_steps_on_top_of_what_it_already_timed(tmp_path):
    watch = trainer.Stopwatch(torch.device("cpu"))
    with watch.timing():
        sum(range(10**6))  # e.g. the whitening init: part of the timed region
    before = watch.seconds
    result, _ = _run(tmp_path, Counting(), "watch", stopwatch=watch)
    assert result.train_seconds > before > 0 and watch.seconds == result.train_seconds


def test_nccl_ranks_pick_their_gpu_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(trainer.dist, "get_world_size", lambda: 2)
    assert trainer.setup_distributed("auto") == trainer.Distributed(rank=1, world_size=2, local_rank=1)
    assert calls == [("set_device", 1), ("init", "nccl")]


def test_wrap_ddp_is_a_no_op_for_one_process():
    model = nn.Linear(3, 1)
    assert trainer.wrap_ddp(model, torch.device("cpu"), trainer.Distributed()) is model
