"""The one training loop (`ptpipe.train.fit`) on toy `Training`s: the deferred non-finite guard (one sync per
SYNC_EVERY steps, yet the exact first bad step named, no model or checkpoint written), exact resume, the
divergence guard, DVCLive cleanup, early stopping, the explicit lr; and that every kind trains through it."""
import pytest
import torch
from torch import nn

from fixtures import train_model, write_prepared_cifar, write_prepared_text
from ptpipe import data, files, train
from ptpipe.stage import StageError

CPU = torch.device("cpu")


def toy(*, steps: int = 5, epochs: int = 1, bad: int | None = None, stop: int | None = None, val=0.0,
        lr: float = 0.01, momentum: float = 0.0, **fields) -> train.Training:
    """A linear regression on seeded random batches as a kind would hand it to the loop: the loss is NaN from
    call `bad` (1-based, counted over the run) on; epoch `stop` (0-based) raises KeyboardInterrupt, as a kill
    after the checkpoints of the epochs before; `val`: the validation loss, a number or epoch -> number."""
    model = nn.Linear(3, 1)
    calls = {"loss": 0, "evaluate": 0}

    def batches(epoch):
        if epoch == stop:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(epoch)
        for _ in range(steps):
            yield torch.randn(4, 3, generator=g)

    def loss(model, batch, carry):
        calls["loss"] += 1
        value = model(batch).pow(2).mean()
        return (value * float("nan") if bad is not None and calls["loss"] >= bad else value), len(batch), None

    def evaluate(model):
        calls["evaluate"] += 1
        return {"val/loss": val(calls["evaluate"] - 1) if callable(val) else val}

    t = train.Training(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), lr_factor=None,
        batches=batches, loss=loss, evaluate=evaluate, config={"kind": "toy", "lr": lr}, epochs=epochs,
        checkpoint_every=1, clip=None, patience=None, monitor=None, ceiling=(100.0, "a lot"), hint="lower lr")
    t = t._replace(**fields)
    toy.calls = calls
    return t


def fit(t: train.Training, folder, live=None) -> train.FitResult:
    return train.fit(t, folder / "model.pt", live, CPU, train.Distributed(), progress=False)


@pytest.mark.parametrize("bad", [1, 7, train.SYNC_EVERY, train.SYNC_EVERY + 1, 2 * train.SYNC_EVERY + 13, 130])
def test_non_finite_guard_names_the_exact_first_bad_step(tmp_path, bad):
    with pytest.raises(StageError, match=rf"non-finite training loss at epoch 1, step {bad}: training stopped and "
                                         rf"no model file was written; lower lr"):
        fit(toy(steps=130, bad=bad), tmp_path)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    # deferred: the steps after the bad one run on up to the next sync, never past it
    assert toy.calls["loss"] == min(130, -(-bad // train.SYNC_EVERY) * train.SYNC_EVERY)


def test_train_loss_is_the_mean_over_all_steps(tmp_path):
    # the losses are summed in chunks of SYNC_EVERY: the epoch's mean must still be over every step
    torch.manual_seed(0)
    t = toy(steps=123)
    reference = []
    ref_model = nn.Linear(3, 1)
    ref_model.load_state_dict(t.model.state_dict())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01)
    for x in t.batches(0):
        loss = ref_model(x).pow(2).mean()
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        reference.append(loss.item())
    result = fit(t, tmp_path)
    assert result.history[0]["train/loss"] == pytest.approx(sum(reference) / len(reference), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(),
                                                 torch.load(tmp_path / "model.pt")["state_dict"].values()))


def test_a_checkpoint_resumes_only_on_the_same_data_and_survives_garbage(tmp_path, capsys):
    """The run key is the config, and train.train puts the prepared data's md5 into it (data.describe)."""
    prepared = write_prepared_text(tmp_path, "abcdefgh " * 50)

    def run(stop):
        facts = data.describe(prepared, "alice", "text")
        return fit(toy(epochs=3, stop=stop, config={"kind": "toy", "data": facts}), tmp_path)

    with pytest.raises(KeyboardInterrupt):
        run(stop=1)
    assert (tmp_path / "checkpoint.pt").exists()
    (prepared / "train_ids.npy").write_bytes(b"second version")  # e.g. `dvc exp run -S datasets...` after the kill
    with pytest.raises(KeyboardInterrupt):
        run(stop=2)
    out = capsys.readouterr().out
    assert "it was written with other params, data, device or process count" in out and "resuming" not in out
    result = run(stop=None)  # same data as the checkpoint now: resumes after epoch 2
    assert "resuming from" in capsys.readouterr().out and len(result.history) == 3

    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")  # a foreign or truncated file
    with pytest.raises(KeyboardInterrupt):
        run(stop=1)
    assert "unreadable" in capsys.readouterr().out


def test_the_stage_records_the_data_set_it_trained_on(tmp_path, tiny_params):
    # what makes a checkpoint of other data not resume, and evaluate/validate refuse other data
    prepared = write_prepared_text(tmp_path, "abcdefgh " * 100)
    train_model(tmp_path, "lstm")
    config = torch.load(tmp_path / "models/lstm/model.pt", weights_only=True)["config"]
    assert config["data"]["name"] == "alice" and config["data"]["format"] == "text"
    assert config["data"]["md5"] == data.digest(prepared) and config["data"]["vocab"] == sorted("abcdefgh ")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StageError, match=r"train.nproc asks for 2 processes but this machine has 1 GPU\(s\)"):
        train.resolve_device("cuda", train.Distributed(rank=1, world_size=2, local_rank=1))
    assert train.resolve_device("cuda", train.Distributed(rank=0, world_size=2, local_rank=0)).index == 0


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 0}, "a string"], ids=["list", "dict-lacking-keys", "str"])
def test_a_checkpoint_that_loads_but_is_not_one_is_ignored_like_an_unreadable_one(tmp_path, capsys, content):
    torch.save(content, tmp_path / "checkpoint.pt")  # loads with weights_only=True, but is no checkpoint of `fit`
    result = fit(toy(), tmp_path)
    out = capsys.readouterr().out
    assert f"ignoring {tmp_path / 'checkpoint.pt'}: unreadable (ValueError: not a checkpoint written by this loop)" in out
    assert len(result.history) == 1 and (tmp_path / "model.pt").exists() and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("fields", [{"bad": 3}, {"stop": 1}], ids=["non-finite", "interrupted"])
def test_a_failed_run_leaves_no_dvclive_directory(tmp_path, fields):
    # DVCLive writes params.yaml when the run starts and metrics each epoch: after a failure they would
    # look like a finished run's (the next run rebuilds them from the checkpoint's history)
    live = tmp_path / "dvclive" / "toy"
    with pytest.raises((StageError, KeyboardInterrupt)):
        fit(toy(epochs=3, **fields), tmp_path, live)
    assert not live.exists()
    assert not (tmp_path / "model.pt").exists()


def test_a_resumed_run_logs_the_resumed_epochs_to_dvclive_again(tmp_path):
    import json

    live = tmp_path / "dvclive"
    with pytest.raises(KeyboardInterrupt):
        fit(toy(epochs=3, stop=2), tmp_path, live)
    fit(toy(epochs=3), tmp_path, live)
    lines = (live / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(lines) == 1 + 3  # header + one row per epoch, the two resumed ones included
    assert json.loads((live / "metrics.json").read_text())["step"] == 2


@pytest.mark.parametrize("value, diverged", [(2.0, False), (9.9, True)])
def test_a_finite_run_far_above_the_ceiling_writes_no_model(tmp_path, value, diverged):
    live = tmp_path / "dvclive"
    t = toy(epochs=2, val=value, monitor="val/loss", ceiling=(4.6, "twice chance"), hint="lower lr (lr: 10)")
    if not diverged:
        fit(t, tmp_path, live)
        assert (tmp_path / "model.pt").exists() and (live / "metrics.json").exists()
        return
    with pytest.raises(StageError, match=r"training diverged: the best val/loss \(9.9 nats, epoch 1\) is far above "
                                         r"twice chance \(limit 4.6 nats\); no model file was written; lower lr \(lr: 10\)"):
        fit(t, tmp_path, live)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "checkpoint.pt").exists() and not live.exists()


def test_without_validation_the_divergence_guard_reads_the_train_loss(tmp_path):
    t = toy(epochs=1, evaluate=None, ceiling=(1e-9, "nothing"), hint="lower lr")
    with pytest.raises(StageError, match=r"training diverged: the best train/loss \(.* nats, epoch 1\)"):
        fit(t, tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_same_weights_same_bytes_for_a_straight_and_a_resumed_run(tmp_path):
    """model.pt is byte-reproducible: the atomic write's random temporary name must not end up inside
    the zip archive, so an uninterrupted run and a resumed one (other folders) hash the same."""
    def run(folder, stop):
        folder.mkdir(exist_ok=True)
        torch.manual_seed(0)
        return fit(toy(epochs=3, stop=stop), folder)

    run(tmp_path / "straight", None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", None)
    assert files.digest(tmp_path / "straight/model.pt", "md5") == files.digest(tmp_path / "resumed/model.pt", "md5")


def test_the_explicit_lr_of_each_step_is_what_lambdalr_gave():
    """The loop sets every group's lr itself from one schedule function (no LambdaLR); at step k it must
    be what LambdaLR stepped k times gave, so the CNN and LSTM metrics stay what they were."""
    schedule = train.lr_schedule("onecycle", 40, warmup_fraction=0.2, initial_lr_factor=0.1, final_lr_factor=0.05)
    params = [nn.Parameter(torch.zeros(1)) for _ in range(3)]

    def groups():
        return [{"params": [params[0]], "lr": 0.3}, {"params": [params[1]], "lr": 0.3 * 64},
                {"params": [params[2]], "lr": 0.3, "frozen_after": 12}]

    old = torch.optim.SGD(groups(), lr=0.3, momentum=0.9)
    lambdalr = torch.optim.lr_scheduler.LambdaLR(old, [schedule, schedule, lambda s: schedule(s) if s < 12 else 0.0])
    new = train.make_optimizer(groups(), "sgd", 0.3, momentum=0.9)
    for step in range(45):
        train.set_lr(new, schedule, step)
        assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in old.param_groups], step
        old.step()  # (no gradients: moves nothing; LambdaLR expects it first)
        lambdalr.step()
    assert new.param_groups[2]["lr"] == 0.0 and new.param_groups[0]["lr"] == pytest.approx(0.3 * 0.05)


def test_the_loop_steps_at_the_lr_of_the_schedule(tmp_path):
    seen = []
    t = toy(steps=4, epochs=2, lr=0.5, lr_factor=lambda step: 1 / (step + 1))
    inner = t.loss

    def loss(model, batch, carry):
        seen.append(t.optimizer.param_groups[0]["lr"])
        return inner(model, batch, carry)

    fit(t._replace(loss=loss), tmp_path)
    assert seen == [0.5 / (step + 1) for step in range(8)]  # the step count runs on across epochs


def run_toy(tmp_path, name, stop=None, **fields):
    torch.manual_seed(0)
    folder = tmp_path / name
    result = fit(toy(epochs=5, stop=stop, momentum=0.9, **fields), folder)
    return result, torch.load(folder / "model.pt", weights_only=True)["state_dict"]


def test_checkpoint_every_n_epochs_resumes_exactly(tmp_path, capsys):
    reference, ref_state = run_toy(tmp_path, "ref")
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path, "cut", stop=4, checkpoint_every=2)  # checkpoints after epochs 2 and 4 only
    saved = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 3  # 0-based: the checkpoint of epoch 4; the kill came in epoch 5
    assert train.CHECKPOINT_KEYS <= saved.keys()
    result, state = run_toy(tmp_path, "cut", checkpoint_every=2)
    assert "resuming from" in capsys.readouterr().out
    assert [r["train/loss"] for r in result.history] == [r["train/loss"] for r in reference.history]
    assert all(torch.equal(ref_state[k], v) for k, v in state.items())
    assert not (tmp_path / "cut/checkpoint.pt").exists()


def test_early_stopping_keeps_the_best_epochs_weights(tmp_path, capsys):
    # val/loss 3, 1, 2, 2, 2: best at epoch 2, patience 2 -> epochs 3 and 4 do not improve, 5 never runs
    t = toy(epochs=5, val=lambda i: [3.0, 1.0, 2.0, 2.0, 2.0][i], monitor="val/loss", patience=2)
    weights = []
    inner = t.evaluate
    t = t._replace(evaluate=lambda model: (weights.append({k: v.clone() for k, v in model.state_dict().items()}),
                                           inner(model))[1])
    result = fit(t, tmp_path)
    assert "stopped early: val/loss did not improve for 2 epochs" in capsys.readouterr().out
    assert len(result.history) == 4 and result.best["epoch"] == 1 and result.best["val/loss"] == 1.0
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in weights[1].items())
    assert not all(torch.equal(saved[k], v) for k, v in weights[3].items())


def test_no_validation_without_evaluate(tmp_path):
    t = toy(evaluate=None)
    result = fit(t, tmp_path)
    assert toy.calls["evaluate"] == 0 and all("val/loss" not in r for r in result.history)
    assert result.best == result.history[-1]
    assert result.train_seconds > 0 and result.other_seconds >= 0


def test_a_given_stopwatch_times_the_training_steps_on_top_of_what_it_already_timed(tmp_path):
    watch = train.Stopwatch(CPU)
    with watch.timing():
        sum(range(10**6))  # e.g. the whitening init: part of the timed region
    before = watch.seconds
    result = fit(toy(stopwatch=watch), tmp_path)
    assert result.train_seconds > before > 0 and watch.seconds == result.train_seconds


def test_an_epoch_without_batches_is_an_error_naming_it(tmp_path):
    with pytest.raises(StageError, match="epoch 1 had no training batches"):
        fit(toy(steps=0), tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_nccl_ranks_pick_their_gpu_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(train.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    assert train.setup_distributed("auto") == train.Distributed(rank=1, world_size=2, local_rank=1)
    assert calls == [("set_device", 1), ("init", "nccl")]


def test_wrap_ddp_is_a_no_op_for_one_process():
    model = nn.Linear(3, 1)
    assert train.wrap_ddp(model, CPU, train.Distributed()) is model


def test_relaunch_is_a_no_op_for_one_process_or_under_torchrun(monkeypatch):
    assert train.relaunch_under_torchrun(1, ["cnn"]) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.relaunch_under_torchrun(2, ["cnn"]) is False


# -- one loop for every kind -------------------------------------------------------------------

def test_every_kind_trains_through_the_one_loop(tmp_path, tiny_params, monkeypatch):
    """train.train hands each kind's Training to train.fit, the one loop: spied (the real fit runs)."""
    from ptpipe import kinds

    write_prepared_cifar(tmp_path, 64, 32, 32)
    write_prepared_text(tmp_path, "the quick brown fox jumps over the lazy dog. " * 20)
    real_fit, seen = train.fit, []

    def spy(t, *args, **kwargs):
        assert isinstance(t, train.Training)
        seen.append(t.config["kind"])
        return real_fit(t, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    for name in ("cnn", "lstm", "gpt"):
        result = train_model(tmp_path, name)
        assert isinstance(result, train.FitResult) and len(result.history) == 1
        assert (tmp_path / "models" / name / "model.pt").exists()
    assert seen == ["cnn", "lstm", "gpt"] == list(kinds.KINDS)


@pytest.mark.parametrize("fields", [{"monitor": "val/loss"}, {"patience": 2}], ids=["monitor", "patience"])
def test_monitoring_without_validation_is_refused_before_training(tmp_path, fields):
    # a Training with nothing to monitor would stop with a KeyError after the last epoch (monitor), or
    # never stop early (patience)
    with pytest.raises(ValueError, match="monitor/patience need validation"):
        fit(toy(evaluate=None, **fields), tmp_path)
    assert toy.calls["loss"] == 0 and not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_only_when_asked_and_one_line_per_epoch_either_way(tmp_path, capsys, progress):
    train.fit(toy(epochs=2, steps=3), tmp_path / "model.pt", None, CPU, train.Distributed(), progress=progress)
    out, err = capsys.readouterr()
    assert ("epoch 1/2" in err and "epoch 2/2" in err) is progress  # tqdm's bar, on stderr
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("train/loss=")] == ["epoch=0", "epoch=1"]
