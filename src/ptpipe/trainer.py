"""The one training loop both trainers share.

What the CNN and the LSTM have in common lives here and nowhere else: device choice,
checkpoint/resume (every `checkpoint_every` epochs, atomically, RNG states included), the
non-finite-loss guard, DVCLive logging, early stopping on a validation metric (or no validation
at all, when nothing is held out), DistributedDataParallel, and the timing of the training
steps apart from everything else (`Stopwatch`: CUDA events on a GPU).
What differs (data, loss, metrics) comes in through a `Task`.

Resume contract: a run killed at any moment and started again with the same config
continues from the last finished epoch and, on CPU with a fixed seed, ends with exactly
the metrics of an uninterrupted run, because the data order of epoch e is a pure
function of (seed, epoch) and all RNG states are restored from the checkpoint.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ptpipe import files
from ptpipe.stage import StageError


class Task(Protocol):
    """What a trainer supplies: its data, its loss and its validation metrics."""

    unit: str  # what the throughput counts: "img", "char"
    # optional: `steps_per_epoch` (int), the progress bar's length

    def train_batches(self, epoch: int) -> Iterable[Any]:
        """This rank's training batches for `epoch`; the order is a function of (seed, epoch)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Forward pass: (mean loss, number of items in the batch)."""

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Metrics on the validation split (the model is already in eval mode)."""


@dataclass(frozen=True)
class Distributed:
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


def relaunch_under_torchrun(nproc: int, module: str, argv: list[str] | None = None) -> bool:
    """Run `python -m module` as `nproc` processes on this machine, when `train.nproc` asks for it.

    Returns False (and does nothing) for nproc == 1 or when already launched by torchrun, e.g. a
    multi-node `torchrun --nnodes ... --rdzv-endpoint ...` started by hand. Otherwise it runs
    torchrun in standalone mode and waits: torchrun ends every rank as soon as one fails, so a
    crashing rank brings the job down with its error instead of leaving the others hanging.
    """
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", "-m", module, *(sys.argv[1:] if argv is None else argv)]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise StageError(f"distributed training ({nproc} processes) failed with exit status {code}: "
                         f"the failing rank's error is printed above")
    return True


def run_stage(module: str, main, params_file: str = "params.yaml", argv: list[str] | None = None) -> None:
    """The `python -m ptpipe.train_*` entry point: under torchrun when `train.nproc` > 1, else in-process."""
    from ptpipe import params

    if not relaunch_under_torchrun(params.load(params_file).train.nproc, module, argv=argv):
        main()


def resolve_device(name: str, ddp: Distributed = Distributed()) -> torch.device:
    """`auto` picks cuda > mps > cpu; a forced device that is missing is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
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


def _rng_state() -> dict:
    # Plain tuples and tensors only, so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
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


# -- the optimizer and its learning-rate schedule, for every trainer ---------------------------------

def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, nesterov: bool = False,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` (sgd | adam | adamw | rmsprop) over param `groups` ({"params", "lr",
    "weight_decay", optional "frozen_after": the step from which the group's lr is 0}). `momentum` is
    SGD/RMSprop momentum and Adam's beta1; `fused`: torch's fused SGD/Adam kernels (None = torch's default).
    Each group's peak lr is kept as "initial_lr": `set_lr` scales it every step."""
    if name == "sgd":
        if nesterov and momentum == 0:
            raise StageError("nesterov needs momentum > 0: set momentum or nesterov: false")
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    elif name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
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

    if name not in ("constant", "onecycle", "cosine"):
        raise StageError(f"unknown schedule {name!r}: choose constant, onecycle or cosine")
    return factor


def set_lr(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float] | None, step: int) -> None:
    """Every group's lr for optimizer step `step`: its peak lr x schedule(step), 0 once the group is frozen
    (`frozen_after`). No schedule: the lr stays what the optimizer was built with."""
    if schedule is None:
        return
    factor = schedule(step)
    for group in optimizer.param_groups:
        frozen = group.get("frozen_after") is not None and step >= group["frozen_after"]
        group["lr"] = 0.0 if frozen else group.setdefault("initial_lr", group["lr"]) * factor


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


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one dict of metrics per finished epoch
    best: dict[str, float]  # the epoch whose weights were kept
    train_seconds: float  # the stopwatch: training steps of this process (resumed epochs excluded)
    other_seconds: float = 0.0  # wall time of the rest of the loop: validation, checkpoints, logging, model file


@dataclass
class Fit:
    """How to run the loop; paths are the stage's outputs."""

    epochs: int
    model_path: Path  # the final state_dict (with model_args and params), written once at the end
    checkpoint_path: Path  # written each epoch, removed once the model file is in place
    config: dict  # resolved params + model args: saved in both files; a mismatch means no resume
    checkpoint_every: int = 1  # epochs between checkpoints (a kill loses at most this many epochs)
    validate: bool = True  # False: no per-epoch validation (nothing held out); then `monitor` must be None
    stopwatch: Stopwatch | None = None  # times the training steps; pass one to time more (e.g. set-up) with them
    inputs: tuple[Path, ...] = ()  # the data it trains on: a checkpoint made from other data is not resumed
    live_dir: Path | None = None  # DVCLive directory (None: no logging, e.g. in benchmarks)
    clip_grad_norm: float | None = None
    non_finite_hint: str = "lower the learning rate"  # what to change if the loss blows up, naming the params keys
    # val/loss (nats) above which the kept epoch counts as diverged: no model is written (None: no check)
    loss_ceiling: float | None = None
    loss_ceiling_reason: str = ""  # what the ceiling is, e.g. "2 x the unigram baseline (4.1 bits/char)"
    monitor: str | None = None  # validation metric deciding the kept weights, e.g. "val/loss"
    monitor_mode: str = "min"
    patience: int | None = None  # epochs without improvement before stopping early
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU
    progress: bool = True
    extra_state: dict = field(default_factory=dict)


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _fingerprint(paths: tuple[Path, ...]) -> dict[str, str]:
    """{file: md5} of every file under `paths` (a few hundred MB of prepared arrays: well under a second)."""
    found = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return {str(f): files.digest(f, "md5") for f in found}


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, inside a DistributedDataParallel wrapper or not: what is saved and evaluated."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device, ddp: Distributed) -> nn.Module:
    """The model under DistributedDataParallel when there are several processes (once: a wrapped
    model is returned as it is). A trainer that compiles wraps first and warms up through the
    wrapper, so that dynamo traces inside DDP's forward and splits the graph at DDP's gradient
    buckets (DDPOptimizer): the all-reduce then overlaps the backward pass."""
    if ddp.world_size == 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# What `fit` saves each epoch; a file without all of them is ignored like an unreadable one.
CHECKPOINT_KEYS = frozenset({"run_key", "config", "epoch", "model", "optimizer", "step", "rng", "history",
                             "best_state", "best_value", "bad_epochs"})


def fit(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float] | None, spec: Fit, device: torch.device,
        ddp: Distributed = Distributed()) -> FitResult:
    """Train `model` on `task` as `spec` says, on `device`; `schedule` (from `lr_schedule`, or None for a
    constant lr) sets every group's lr before each optimizer step. A run that fails leaves no DVCLive
    directory behind (its params.yaml and metrics would look like a finished run's); a resumed
    run rebuilds it from the checkpoint's history."""
    try:
        return _fit(model, task, optimizer, schedule, spec, device, ddp)
    except BaseException:
        if spec.live_dir is not None and ddp.is_main:
            shutil.rmtree(spec.live_dir, ignore_errors=True)
        raise


def _fit(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float] | None,
    spec: Fit,
    device: torch.device,
    ddp: Distributed = Distributed(),
) -> FitResult:
    start_epoch, history, best_state, best_value, bad_epochs = 0, [], None, None, 0
    step = 0  # optimizer steps taken: the schedule's clock (an LSTM epoch can be a step shorter)
    if not spec.validate and (spec.monitor is not None or spec.patience is not None):
        raise ValueError("Fit: monitor/patience need validation (validate=True)")
    watch = spec.stopwatch or Stopwatch(device)

    # -- resume: only a run of the same config, data, device type and process count --------
    run_key = {"config": spec.config, "inputs": _fingerprint(spec.inputs), "device": device.type,
               "world_size": ddp.world_size}
    if spec.checkpoint_path.exists():
        try:
            ckpt = torch.load(spec.checkpoint_path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
                raise ValueError("not a checkpoint written by this loop")
        except Exception as exc:  # noqa: BLE001 - any unreadable file: start afresh, say why
            ckpt = {}
            if ddp.is_main:
                print(f"ignoring {spec.checkpoint_path}: unreadable ({type(exc).__name__}: {exc})"[:300])
        if ckpt.get("run_key") == run_key:
            unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = ckpt["step"]
            _set_rng_state(ckpt["rng"])
            start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
            best_state, best_value, bad_epochs = ckpt["best_state"], ckpt["best_value"], ckpt["bad_epochs"]
            if ddp.is_main:
                print(f"resuming from {spec.checkpoint_path} after epoch {start_epoch}")
        elif ckpt and ddp.is_main:
            print(f"ignoring {spec.checkpoint_path}: it was written with other params, data, device or process count")

    live = None
    if spec.live_dir is not None and ddp.is_main:
        from dvclive import Live

        # dvcyaml=None: metrics and plots are declared in dvc.yaml by hand, not rewritten by DVCLive.
        live = Live(dir=str(spec.live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        live.log_params(spec.config)
        for row in history:  # the stage's outputs were wiped by DVC before this resumed run
            _log_epoch(live, row)

    model = wrap_ddp(model, device, ddp)

    loop_start, timed_before = time.perf_counter(), watch.seconds
    stopped_early = False
    for epoch in range(start_epoch, spec.epochs):
        if spec.patience is not None and bad_epochs >= spec.patience:
            stopped_early = True
            break
        with watch.timing():
            row, step = _train_epoch(model, task, optimizer, schedule, step, spec, device, ddp, epoch)

        # -- validate; keep the weights of the best epoch --------------------------------
        if spec.validate:
            model.eval()
            with torch.no_grad(), autocast(device, spec.autocast_dtype):
                row.update(task.validate(unwrap(model)))
            model.train()
        row["epoch"] = epoch
        history.append(row)
        if spec.monitor is None:
            best_state = None  # the last epoch's weights: copied to the CPU once, at the end
        elif _improved(row[spec.monitor], best_value, spec.monitor_mode):
            best_value = row[spec.monitor]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1

        if ddp.is_main and live is not None:
            _log_epoch(live, row)
        if ddp.is_main and (epoch + 1) % spec.checkpoint_every == 0:
            files.save_torch(spec.checkpoint_path, {
                "run_key": run_key,
                "config": spec.config,
                "epoch": epoch,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "rng": _rng_state(),
                "history": history,
                "best_state": best_state,
                "best_value": best_value,
                "bad_epochs": bad_epochs,
            })
        if ddp.is_main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    best = history[-1] if spec.monitor is None else min(
        history, key=lambda r: r[spec.monitor] if spec.monitor_mode == "min" else -r[spec.monitor])
    if stopped_early and ddp.is_main:
        print(f"stopped early: {spec.monitor} did not improve for {spec.patience} epochs; "
              f"keeping epoch {best['epoch']}")
    if best_state is None:
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
    _check_not_diverged(best, spec)
    if ddp.is_main:
        files.save_torch(spec.model_path, {"state_dict": best_state, "config": spec.config, **spec.extra_state})
        spec.checkpoint_path.unlink(missing_ok=True)
        if live is not None:
            live.end()
    if ddp.world_size > 1:
        dist.barrier()
    train_seconds = watch.seconds
    other_seconds = max(0.0, time.perf_counter() - loop_start - (train_seconds - timed_before))
    return FitResult(history=history, best=best, train_seconds=train_seconds, other_seconds=other_seconds)


def non_finite_hint(section: str, lr: float, clip: float | None, weight_decay: float,
                    optimizer: str | None = None) -> str:
    """What to change when a text model's loss blows up or diverges, naming `section`'s keys in effect."""
    optimizer_key = f", {section}.optimizer: {optimizer}" if optimizer else ""
    changes = [f"lower the learning rate ({section}.lr: {lr:g}{optimizer_key})",
               f"set a gradient clip ({section}.clip)" if clip is None else f"lower {section}.clip ({clip:g})"]
    if weight_decay > 0:
        changes.append(f"lower {section}.weight_decay ({weight_decay:g})")
    return alternatives(changes)


def alternatives(changes: list[str]) -> str:
    """["a", "b", "c"] -> "a, b or c": a hint listing what the user can change."""
    return changes[0] if len(changes) == 1 else ", ".join(changes[:-1]) + " or " + changes[-1]


def _check_not_diverged(best: dict, spec: Fit) -> None:
    """Stop, without writing a model, when the kept epoch's val/loss (train/loss in a run without
    validation) is above `spec.loss_ceiling`: a finite loss can still be a diverged run, far worse
    than always guessing the baseline."""
    metric = "val/loss" if "val/loss" in best else "train/loss"
    if spec.loss_ceiling is None or best[metric] <= spec.loss_ceiling:
        return
    spec.checkpoint_path.unlink(missing_ok=True)  # a finished run, not one to resume
    raise StageError(
        f"training diverged: the best {metric} ({best[metric]:.4g} nats, epoch {best['epoch'] + 1}) is far "
        f"above {spec.loss_ceiling_reason} (limit {spec.loss_ceiling:.4g} nats); no model file was written; "
        f"{spec.non_finite_hint}")


def _batch_shape(batch: Any) -> tuple:
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts)


def warm_up(model: nn.Module, task: Task, spec: Fit, device: torch.device) -> float:
    """Run, untimed, what the timed epochs will run, so that torch.compile's graphs (one per shape
    and mode: dynamo guards on them), cuDNN's autotuning and the libraries' start-up happen now:
    a forward + backward for each distinct batch shape of epoch 0 (the last, partial batch too),
    in train mode under `spec`'s autocast, and the validation as `fit` calls it (eval mode,
    no_grad, autocast), when `spec.validate`. No optimizer step is taken; the weights, the BN
    statistics, the gradients and every RNG state are as before. Returns the seconds it took."""
    t0 = time.perf_counter()
    inner = unwrap(model)
    state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    rng = _rng_state()
    try:
        batches = {}
        for batch in task.train_batches(0):
            batches.setdefault(_batch_shape(batch), batch)
        model.train()
        for batch in batches.values():
            with autocast(device, spec.autocast_dtype):
                loss, _ = task.loss(model, batch)
            loss.backward()
        del batches
        if spec.validate:
            model.eval()
            with torch.no_grad(), autocast(device, spec.autocast_dtype):
                task.validate(inner)
    finally:
        model.zero_grad(set_to_none=True)
        model.train()
        inner.load_state_dict(state)
        _set_rng_state(rng)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of training and validation (none for dtype None): warm-ups use it too."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Steps between host<->device syncs (loss check, progress bar). Per step the loop only keeps a
# reference to the detached loss: no tensor allocation, no .item(), no device sync.
SYNC_EVERY = 50


def _train_epoch(model, task, optimizer, schedule, step: int, spec: Fit, device, ddp: Distributed, epoch: int
                 ) -> tuple[dict, int]:
    """One pass over the task's training batches; returns (metrics, optimizer steps taken so far)."""
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    pending: list[torch.Tensor] = []  # detached scalar losses since the last sync, in step order
    steps, items = 0, 0
    show = spec.progress and ddp.is_main
    batches = task.train_batches(epoch)
    # the postfix (loss, throughput) changes once per sync; mininterval caps redraws at 2 per second
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{spec.epochs}", unit="batch", leave=False,
               total=getattr(task, "steps_per_epoch", None),  # a bar with an end and an ETA when known
               disable=not show, dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    for batch in bar:
        set_lr(optimizer, schedule, step)
        with autocast(device, spec.autocast_dtype):
            loss, n = task.loss(model, batch)  # forward -> loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad_norm)
        optimizer.step()
        step += 1
        pending.append(loss.detach())
        steps += 1
        items += n
        # non-finite guard + log, once per SYNC_EVERY steps: the step that is reported is still the
        # exact first bad one (its loss is in `pending`); at most SYNC_EVERY - 1 more steps ran after it
        if steps % SYNC_EVERY == 0:
            loss_sum = _sync(pending, loss_sum, steps, epoch, spec.non_finite_hint)
            if show:
                rate = items * ddp.world_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}", **{f"{task.unit}/s": f"{rate:,.0f}"})
    if steps == 0:
        raise StageError(f"epoch {epoch + 1} had no training batches: the training split is smaller than one batch")
    loss_sum = _sync(pending, loss_sum, steps, epoch, spec.non_finite_hint)
    train_loss = loss_sum / steps
    if ddp.world_size > 1:
        dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
    seconds = time.perf_counter() - t0
    return {"train/loss": train_loss.item(), f"train/{task.unit}_per_s": items * ddp.world_size / seconds}, step


def _sync(pending: list[torch.Tensor], loss_sum: torch.Tensor, steps: int, epoch: int, hint: str) -> torch.Tensor:
    """Add the pending losses (one stack, one host sync) to `loss_sum`; a non-finite one is a StageError
    naming its step (1-based, within the epoch). Empties `pending`."""
    if not pending:
        return loss_sum
    losses = torch.stack(pending).float()  # k = len(pending): the losses of steps steps-k+1 .. steps
    pending.clear()
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        step = steps - len(losses) + first
        raise StageError(
            f"non-finite training loss at epoch {epoch + 1}, step {step + 1}: training stopped and no model "
            f"file was written; {hint}")
    return loss_sum + losses.sum()


def _log_epoch(live, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            live.log_metric(key, value)
    live.next_step()
