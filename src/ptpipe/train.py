"""Stage `train`: train one model of params.yaml (`models.<name>`) through the one training loop.

    python -m ptpipe.train cnn --data data/prepared/cifar10 --model models/cnn/model.pt \
        --live dvclive/cnn --metrics metrics/cnn/train.json

The model's kind (`ptpipe.kinds.<kind>.KIND.training`) supplies what differs between models as
plain values and functions (a `Training`): the model and its optimizer, the lr schedule, the
batches of an epoch, the loss of a batch, the validation metrics. `fit` below is the loop, read top
to bottom: resume -> per epoch: the steps (lr -> forward -> loss -> backward -> clip -> step) ->
validate -> keep the best -> checkpoint -> finish. Around it, a few helpers: device and processes
(DistributedDataParallel under torchrun when `train.nproc` > 1), the optimizer and lr schedule
every kind builds from, checkpoint/resume, the deferred non-finite check, DVCLive.

Resume contract: a run killed at any moment and started again with the same config continues from
the last checkpoint and, on CPU with a fixed seed, ends with exactly the metrics of an
uninterrupted run: the batches of epoch e are a function of (seed, epoch), and all RNG states,
the optimizer and the step count are restored from the checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ptpipe import files, params as params_mod, stage
from ptpipe.stage import StageError


class Training(NamedTuple):
    """What a kind hands the loop (`KIND.training(recipe, data_dir, device, ddp, key, default_lr)`)."""

    model: nn.Module  # initialised (seeded), on the device; under DDP already wrapped
    optimizer: torch.optim.Optimizer  # groups hold "initial_lr" (the peak) and optionally "frozen_after" (a step)
    lr_factor: Callable[[int], float] | None  # optimizer step -> multiple of each group's peak lr; None: constant
    batches: Callable[[int], Iterable[Any]]  # epoch -> this rank's batches, a function of (seed, epoch)
    loss: Callable[[nn.Module, Any, Any], tuple[torch.Tensor, int, Any]]  # (model, batch, carry) -> (mean loss,
    # items in the batch, carry for the next batch: the LSTM's detached state; None otherwise; reset each epoch)
    evaluate: Callable[[nn.Module], dict[str, float]] | None  # validation metrics (eval mode, no_grad); None: none
    config: dict  # what model.pt records: {kind, model_args, params, data}
    epochs: int
    checkpoint_every: int  # epochs between checkpoints (a kill loses at most this many)
    clip: float | None  # max global gradient norm
    patience: int | None  # epochs without a better `monitor` before stopping early
    monitor: str | None  # "val/loss": the best epoch's weights are kept; None: the last epoch's
    ceiling: tuple[float, str]  # (val/loss in nats above which the kept epoch counts as diverged, what it is)
    hint: str  # what to change when the loss blows up, naming the params keys in effect
    unit: str = "item"  # what the throughput counts: "img", "char"
    steps_per_epoch: int | None = None  # the progress bar's length, when known
    autocast_dtype: torch.dtype | None = None
    stopwatch: "Stopwatch | None" = None  # a kind that times more than the steps (the CNN's whitening) passes its own
    facts: dict | None = None  # what else metrics/<model>/train.json records (the CNN's compile facts)


class FitResult(NamedTuple):
    history: list[dict[str, float]]  # one dict of metrics per finished epoch
    best: dict[str, float]  # the epoch whose weights were kept
    train_seconds: float  # the stopwatch: training steps of this process (resumed epochs excluded)
    other_seconds: float  # wall time of the rest of the loop: validation, checkpoints, logging, model file


# Steps between host<->device syncs (loss check, progress bar). Per step the loop only keeps a
# reference to the detached loss: no tensor allocation, no .item(), no device sync.
SYNC_EVERY = 50


def fit(t: Training, model_path: Path, live_dir: Path | None, device: torch.device,
        ddp: "Distributed", progress: bool = True) -> FitResult:
    """Train `t.model`, write model_path = {state_dict, config} once at the end (the checkpoint beside it
    each `checkpoint_every` epochs, removed then). A run that fails leaves no DVCLive folder behind (its
    params and metrics would look like a finished run's); a resumed run rebuilds it from its history."""
    if t.evaluate is None and (t.monitor is not None or t.patience is not None):  # a kind's mistake, not a user's
        raise ValueError("monitor/patience need validation: a Training without evaluate keeps the last epoch")
    model, optimizer, watch = wrap_ddp(t.model, device, ddp), t.optimizer, t.stopwatch or Stopwatch(device)
    checkpoint_path = model_path.with_name("checkpoint.pt")
    # the config records the data's md5 (ptpipe.data.describe): other data, no resume
    run_key = {"config": t.config, "device": device.type, "world_size": ddp.world_size}
    # -- resume: only a run of the same config, data, device type and process count ------------
    state = _resume(checkpoint_path, run_key, model, optimizer, ddp)
    history, step = state["history"], state["step"]
    live = _open_live(live_dir, t.config, history) if ddp.is_main else None
    try:
        loop_start, timed_before = time.perf_counter(), watch.seconds
        for epoch in range(state["epoch"], t.epochs):
            if t.patience is not None and state["bad_epochs"] >= t.patience:
                _say(ddp, f"stopped early: {t.monitor} did not improve for {t.patience} epochs")
                break
            # -- the steps: lr -> forward -> loss -> backward -> clip -> step ----------------------
            model.train()
            pending, loss_sum, steps, items, carry = [], torch.zeros((), device=device), 0, 0, None
            bar = tqdm(t.batches(epoch), desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False,
                       total=t.steps_per_epoch, disable=not (progress and ddp.is_main), dynamic_ncols=True,
                       mininterval=0.5)
            t0 = time.perf_counter()
            with watch.timing():
                for batch in bar:
                    set_lr(optimizer, t.lr_factor, step)
                    with autocast(device, t.autocast_dtype):
                        loss, n, carry = t.loss(model, batch, carry)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if t.clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), t.clip)
                    optimizer.step()
                    step, steps, items = step + 1, steps + 1, items + n
                    pending.append(loss.detach())
                    if steps % SYNC_EVERY == 0:  # the deferred non-finite check: exact step, one sync per 50
                        loss_sum = _add_finite(pending, loss_sum, steps, epoch, t.hint)
                        bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}",
                                        **{f"{t.unit}/s": f"{items * ddp.world_size / (time.perf_counter() - t0):,.0f}"})
                if steps == 0:
                    raise StageError(f"epoch {epoch + 1} had no training batches: the training split is "
                                     f"smaller than one batch")
                train_loss = _add_finite(pending, loss_sum, steps, epoch, t.hint) / steps
            if ddp.world_size > 1:
                dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
            row = {"train/loss": train_loss.item(),
                   f"train/{t.unit}_per_s": items * ddp.world_size / (time.perf_counter() - t0)}
            # -- validate; keep the weights of the best epoch -------------------------------------
            if t.evaluate is not None:
                model.eval()
                with torch.no_grad(), autocast(device, t.autocast_dtype):
                    row.update(t.evaluate(unwrap(model)))
            row["epoch"] = epoch
            history.append(row)
            if t.monitor is None or state["best_value"] is None or row[t.monitor] < state["best_value"]:
                state.update(best_value=row.get(t.monitor), bad_epochs=0,
                             best_state=None if t.monitor is None else _cpu_copy(unwrap(model)))
            else:
                state["bad_epochs"] += 1
            # -- log, checkpoint -------------------------------------------------------------------
            if live is not None:
                _log_epoch(live, row)
            if ddp.is_main and (epoch + 1) % t.checkpoint_every == 0:
                _save_checkpoint(checkpoint_path, run_key, epoch, model, optimizer, step, history, state)
            _say(ddp, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

        # -- finish: the kept weights, unless the run diverged ---------------------------------------
        best = history[-1] if t.monitor is None else min(history, key=lambda r: r[t.monitor])
        _check_not_diverged(best, t, checkpoint_path)
        if ddp.is_main:
            files.save_torch(model_path, {"state_dict": state["best_state"] or _cpu_copy(unwrap(model)),
                                          "config": t.config})
            checkpoint_path.unlink(missing_ok=True)
            if live is not None:
                live.end()
    except BaseException:
        if live is not None:
            shutil.rmtree(live_dir, ignore_errors=True)
        raise
    if ddp.world_size > 1:
        dist.barrier()
    train_seconds = watch.seconds
    other = max(0.0, time.perf_counter() - loop_start - (train_seconds - timed_before))
    return FitResult(history, best, train_seconds, other)


def _say(ddp: "Distributed", line: str) -> None:
    if ddp.is_main:
        print(line)


def _cpu_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _add_finite(pending: list[torch.Tensor], loss_sum: torch.Tensor, steps: int, epoch: int, hint: str
                ) -> torch.Tensor:
    """`loss_sum` plus the pending losses (one stack, one host sync); a non-finite one is a StageError naming
    its step (1-based, within the epoch): at most SYNC_EVERY - 1 steps ran after it. Empties `pending`."""
    if not pending:
        return loss_sum
    losses = torch.stack(pending).float()  # the losses of steps steps-k+1 .. steps
    pending.clear()
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        first = steps - len(losses) + int((~finite).nonzero()[0, 0])
        raise StageError(f"non-finite training loss at epoch {epoch + 1}, step {first + 1}: training stopped "
                         f"and no model file was written; {hint}")
    return loss_sum + losses.sum()


def _check_not_diverged(best: dict, t: Training, checkpoint_path: Path) -> None:
    """Stop, writing no model, when the kept epoch's val/loss (train/loss without validation) is above the
    ceiling: a finite loss can still be a diverged run, far worse than always guessing the baseline."""
    metric = "val/loss" if "val/loss" in best else "train/loss"
    limit, reason = t.ceiling
    if best[metric] <= limit:
        return
    checkpoint_path.unlink(missing_ok=True)  # a finished run, not one to resume
    raise StageError(f"training diverged: the best {metric} ({best[metric]:.4g} nats, epoch {best['epoch'] + 1}) "
                     f"is far above {reason} (limit {limit:.4g} nats); no model file was written; {t.hint}")


# -- checkpoint / resume ---------------------------------------------------------------------------

# What a checkpoint holds; a file without all of them is ignored like an unreadable one.
CHECKPOINT_KEYS = frozenset({"run_key", "epoch", "model", "optimizer", "step", "rng", "history",
                             "best_state", "best_value", "bad_epochs"})


def _resume(path: Path, run_key: dict, model: nn.Module, optimizer, ddp: "Distributed") -> dict:
    """The loop's state: restored from the checkpoint at `path` when it was written by a run of `run_key`
    (model, optimizer and RNG states loaded in place), else a fresh start (saying why a file was ignored)."""
    state = {"epoch": 0, "step": 0, "history": [], "best_state": None, "best_value": None, "bad_epochs": 0}
    if not path.exists():
        return state
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
            raise ValueError("not a checkpoint written by this loop")
    except Exception as exc:  # noqa: BLE001 - any unreadable file: start afresh, say why
        _say(ddp, f"ignoring {path}: unreadable ({type(exc).__name__}: {exc})"[:300])
        return state
    if ckpt["run_key"] != run_key:
        _say(ddp, f"ignoring {path}: it was written with other params, data, device or process count")
        return state
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"])
    _say(ddp, f"resuming from {path} after epoch {ckpt['epoch'] + 1}")
    return {"epoch": ckpt["epoch"] + 1, "step": ckpt["step"], "history": ckpt["history"],
            "best_state": ckpt["best_state"], "best_value": ckpt["best_value"], "bad_epochs": ckpt["bad_epochs"]}


def _save_checkpoint(path: Path, run_key: dict, epoch: int, model: nn.Module, optimizer, step: int,
                     history: list, state: dict) -> None:
    files.save_torch(path, {"run_key": run_key, "epoch": epoch, "model": unwrap(model).state_dict(),
                            "optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state(),
                            "history": history, "best_state": state["best_state"],
                            "best_value": state["best_value"], "bad_epochs": state["bad_epochs"]})


def _rng_state() -> dict:
    # Plain tuples and tensors only, so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- DVCLive ---------------------------------------------------------------------------------------

def _open_live(live_dir: Path | None, config: dict, history: list[dict]):
    """DVCLive in `live_dir` (None: no logging), the resumed epochs logged again: DVC wiped the stage's
    outputs before this run. dvcyaml=None: plots and metrics are declared in dvc.yaml by hand."""
    if live_dir is None:
        return None
    from dvclive import Live

    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    live.log_params(config)
    for row in history:
        _log_epoch(live, row)
    return live


def _log_epoch(live, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            live.log_metric(key, value)
    live.next_step()


# -- the optimizer and its learning-rate schedule, for every kind ---------------------------------

def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, nesterov: bool = False,
                   beta2: float = 0.999, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` (sgd | adam | adamw | rmsprop) over param `groups` ({"params", optional "lr",
    "weight_decay", "frozen_after": the step from which the group's lr is 0}). `momentum` is SGD/RMSprop
    momentum and Adam's beta1; `fused`: torch's fused SGD/Adam kernels (None = torch's default).
    Each group's peak lr is kept as "initial_lr": `set_lr` scales it every step."""
    if name == "sgd":
        if nesterov and momentum == 0:
            raise StageError("nesterov needs momentum > 0: set momentum or nesterov: false")
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    elif name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=lr, betas=(momentum, beta2), fused=fused)
    elif name == "rmsprop":
        opt = torch.optim.RMSprop(groups, lr=lr, momentum=momentum, foreach=True)
    else:
        raise StageError(f"unknown optimizer {name!r}: choose sgd, adam, adamw or rmsprop")
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def lr_schedule(name: str, total_steps: int, warmup_fraction: float = 0.0, initial_lr_factor: float = 1.0,
                final_lr_factor: float = 0.0) -> Callable[[int], float]:
    """step -> multiplier of the peak lr at optimizer step `step` (0-based) of `total_steps`: constant, or a
    linear warm-up from `initial_lr_factor` over `warmup_fraction` of the steps, then a linear (onecycle)
    or cosine decay to `final_lr_factor`, held there past the end."""
    if name not in ("constant", "onecycle", "cosine"):
        raise StageError(f"unknown schedule {name!r}: choose constant, onecycle or cosine")
    warm = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warm:
            return initial_lr_factor + (1 - initial_lr_factor) * step / warm
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        if name == "onecycle":
            return 1 + (final_lr_factor - 1) * frac
        return final_lr_factor + (1 - final_lr_factor) * 0.5 * (1 + math.cos(math.pi * frac))

    return factor


def set_lr(optimizer: torch.optim.Optimizer, factor: Callable[[int], float] | None, step: int) -> None:
    """Every group's lr for optimizer step `step`: its peak lr x factor(step), 0 once the group is frozen
    (`frozen_after`). No factor: the lr stays what the optimizer was built with."""
    if factor is None:
        return
    f = factor(step)
    for group in optimizer.param_groups:
        frozen = group.get("frozen_after") is not None and step >= group["frozen_after"]
        group["lr"] = 0.0 if frozen else group.setdefault("initial_lr", group["lr"]) * f


def text_hint(key: str, lr: float, clip: float | None, weight_decay: float, optimizer: str | None = None) -> str:
    """What to change when a text model's loss blows up or diverges, naming recipe `key`'s keys in effect."""
    optimizer_key = f", {key}.optimizer: {optimizer}" if optimizer else ""
    changes = [f"lower the learning rate ({key}.lr: {lr:g}{optimizer_key})",
               f"set a gradient clip ({key}.clip)" if clip is None else f"lower {key}.clip ({clip:g})"]
    if weight_decay > 0:
        changes.append(f"lower {key}.weight_decay ({weight_decay:g})")
    return alternatives(changes)


def alternatives(changes: list[str]) -> str:
    """["a", "b", "c"] -> "a, b or c": a hint listing what the user can change."""
    return changes[0] if len(changes) == 1 else ", ".join(changes[:-1]) + " or " + changes[-1]


# -- device, threads, processes --------------------------------------------------------------------

class Distributed(NamedTuple):
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    backend = "nccl" if device_name != "cpu" and torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl" and local_rank < torch.cuda.device_count():
        # before NCCL's init: otherwise every rank's communicator and first allocations land on GPU 0
        # (a more-ranks-than-GPUs run is refused by resolve_device with a message naming train.nproc)
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def relaunch_under_torchrun(nproc: int, argv: list[str] | None = None) -> bool:
    """Run `python -m ptpipe.train ARGV` as `nproc` processes on this machine, when `train.nproc` asks for it.

    Returns False (and does nothing) for nproc == 1 or when already launched by torchrun, e.g. a
    multi-node `torchrun --nnodes ... --rdzv-endpoint ...` started by hand. Otherwise it runs
    torchrun in standalone mode and waits: torchrun ends every rank as soon as one fails, so a
    crashing rank brings the job down with its error instead of leaving the others hanging.
    """
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", "-m", "ptpipe.train", *(sys.argv[1:] if argv is None else argv)]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise StageError(f"distributed training ({nproc} processes) failed with exit status {code}: "
                         f"the failing rank's error is printed above")
    return True


def resolve_device(name: str, ddp: Distributed = Distributed()) -> torch.device:
    """`auto` picks cuda > mps > cpu; a forced device that is missing is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise StageError("train.device is 'cuda' but no CUDA GPU is visible: set train.device=auto or cpu")
        if ddp.local_rank >= torch.cuda.device_count():
            raise StageError(f"train.nproc asks for {ddp.world_size} processes but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): lower train.nproc")
        return torch.device("cuda", ddp.local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise StageError("train.device is 'mps' but MPS is not available: set train.device=auto or cpu")
    return torch.device(name)


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads for torch ops (0: torch's default, one per physical core, the
    params' default). On a CPU shared with another busy process a multi-threaded op waits for its
    descheduled thread at every barrier (measured 4-10x slower per step on 2 cores,
    benchmarks/README.md): runs side by side (`dvc queue start -j N`) want 1."""
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, inside a DistributedDataParallel wrapper or not: what is saved and evaluated."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device, ddp: Distributed) -> nn.Module:
    """The model under DistributedDataParallel when there are several processes (once: a wrapped
    model is returned as it is). A kind that compiles wraps first and warms up through the
    wrapper, so that dynamo traces inside DDP's forward and splits the graph at DDP's gradient
    buckets (DDPOptimizer): the all-reduce then overlaps the backward pass."""
    if ddp.world_size == 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of training and validation (none for dtype None): warm-ups use it too."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stopwatch:
    """Seconds of the work inside `with watch.timing():` blocks, summed. On a GPU they are CUDA
    events (what the device did between the two points, as airbench times its runs: no host sync
    inside the block, one at the first read of `seconds`); elsewhere perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextlib.contextmanager
    def timing(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0

    @property
    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        return self._seconds


def warm_up(model: nn.Module, batches: Iterable[Any], loss: Callable, evaluate: Callable | None,
            device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    """Run, untimed, what the timed epochs will run, so that torch.compile's graphs (one per shape
    and mode: dynamo guards on them), cuDNN's autotuning and the libraries' start-up happen now:
    a forward + backward for each distinct batch shape of `batches` (epoch 0's; the last, partial
    batch too), in train mode under autocast, and `evaluate` as `fit` calls it. No optimizer step
    is taken; the weights, the BN statistics, the gradients and every RNG state are as before.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    inner = unwrap(model)
    saved, rng = {k: v.detach().clone() for k, v in inner.state_dict().items()}, _rng_state()
    try:
        shapes = {}
        for batch in batches:
            shapes.setdefault(tuple(tuple(x.shape) for x in batch), batch)
        model.train()
        for batch in shapes.values():
            with autocast(device, autocast_dtype):
                value, _, _ = loss(model, batch, None)
            value.backward()
        del shapes
        if evaluate is not None:
            model.eval()
            with torch.no_grad(), autocast(device, autocast_dtype):
                evaluate(inner)
    finally:
        model.zero_grad(set_to_none=True)
        model.train()
        inner.load_state_dict(saved)
        _set_rng_state(rng)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# -- the stage ------------------------------------------------------------------------------------

def train(name: str, data_dir: str | Path, model_path: str | Path, live_dir: str | Path | None,
          metrics_path: str | Path | None, params_file: str | Path = params_mod.PARAMS_FILE,
          progress: bool = True) -> FitResult:
    """Train models.<name> of `params_file` on the prepared data in `data_dir`; write `model_path`
    ({state_dict, config}), DVCLive's `live_dir` and `metrics_path` (the kept epoch and the timings)."""
    from ptpipe import data, kinds

    t_start = time.perf_counter()
    p = params_mod.load(params_file)  # before anything is written
    if name not in p.models:
        raise StageError(f"no model {name!r} in {params_file}'s models (there are {', '.join(p.models)})")
    model, recipe = p.models[name], p.recipe(name)
    kind, key = kinds.get(model.kind, params_file), f"recipes.{model.kind}.{model.recipe}"
    data_dir, model_path = Path(data_dir), Path(model_path)
    facts = data.describe(data_dir, model.data, p.datasets[model.data].format)
    set_threads(recipe.threads)
    ddp = setup_distributed(p.train.device)
    device = resolve_device(p.train.device, ddp)
    t = kind.training(recipe, data_dir, device, ddp, key=key, default_lr=p.lr)
    t = t._replace(config={**t.config, "data": {**facts, **t.config["data"]}})
    setup_seconds = time.perf_counter() - t_start - (t.facts or {}).get("warmup_seconds", 0.0)
    facts = dict(t.facts or {})
    graphs = dynamo_counts()[0] if "graphs" in facts else None  # a kind that compiled says how many graphs
    result = fit(t, model_path, Path(live_dir) if live_dir is not None else None, device, ddp, progress)
    if graphs is not None:
        facts["recompiles"] = dynamo_counts()[0] - graphs  # graphs compiled inside the timed epochs
        if facts["recompiles"]:
            print(f"warning: torch.compile compiled {facts['recompiles']} more graph(s) during training (a shape "
                  f"or mode the warm-up did not cover): those epochs include compile time", file=sys.stderr)
    if ddp.is_main and metrics_path is not None:
        files.write_json(metrics_path, {
            **{k.replace("/", "_"): v for k, v in result.best.items() if k != "epoch" and "_per_s" not in k},
            "best_epoch": result.best["epoch"] + 1, "epochs_run": len(result.history),
            "train_seconds": round(result.train_seconds, 3),  # the timed steps (CUDA events on a GPU)
            "other_seconds": round(result.other_seconds, 3),  # validation, checkpoints, logging, model file
            "setup_seconds": round(setup_seconds, 3),  # loading the data, building the model
            "parameters": sum(x.numel() for x in unwrap(t.model).parameters()),
            "device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, **facts,
        })
    _say(ddp, f"{name}: best epoch {result.best['epoch'] + 1} of {len(result.history)}; "
              f"{result.train_seconds:.0f} s training; wrote {model_path}")
    return result


def dynamo_counts() -> tuple[int, int]:
    """(graphs, graph breaks) dynamo has compiled in this process so far (its counters are never reset by
    torch._dynamo.reset: take differences)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def main() -> None:
    ap = stage.parser(__doc__, "data", "model", "live", "metrics")
    ap.add_argument("name", help="the model: a key of params.yaml's models")
    args = ap.parse_args()
    nproc = stage.run(lambda: params_mod.load(args.params).train.nproc)
    if not stage.run(relaunch_under_torchrun, nproc):
        stage.run(train, args.name, args.data, args.model, args.live, args.metrics, args.params)


if __name__ == "__main__":
    main()
