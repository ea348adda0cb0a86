"""Stage `train_cnn`: train the CIFAR-10 classifier of the selected `cnn.recipes.<name>`.

Reads data/prepared/cifar10, writes models/cnn/model.pt ({state_dict, config}) through the shared
loop `ptpipe.trainer.fit` (checkpoint each epoch + resume, non-finite guard, DVCLive in dvclive/cnn),
and metrics/cnn_train.json (training and compile seconds). The whole training split sits on the
device as one uint8 tensor; augmentation and normalisation are batched tensor ops (`ptpipe.cnn`).
channels_last on every device (oneDNN's convolutions are faster on it on CPU too); on a GPU
also bf16 autocast, and torch.compile when `compile` allows it (warm-up timed apart from training).
"""
from __future__ import annotations

import argparse
import sys
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import data, files, params as params_mod, stage, trainer
from ptpipe.kinds.cnn import EpochImages, build_model, normalize, predict
from ptpipe.params import CnnRecipe
from ptpipe.stage import StageError

EVAL_BATCH = 1000  # images per forward pass at validation: memory only, no effect on results


class CnnTask:
    """The CNN's part of the shared loop: batches from `EpochImages`, cross-entropy, val accuracy."""

    unit = "img"

    def __init__(self, train: EpochImages, val_x: torch.Tensor, val_y: torch.Tensor, label_smoothing: float):
        self.train, self.val_x, self.val_y = train, val_x, val_y
        self.label_smoothing = label_smoothing

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def train_batches(self, epoch: int):
        return self.train.epoch(epoch)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # B x 3 x 32 x 32 normalised, B labels
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), len(y)

    def validate(self, model: nn.Module) -> dict[str, float]:
        logits = predict(model, self.val_x, batch_size=EVAL_BATCH)
        return {"val/loss": F.cross_entropy(logits, self.val_y).item(),
                "val/acc": (logits.argmax(1) == self.val_y).float().mean().item()}


class Lookahead:
    """airbench's Lookahead: every `k` optimizer steps, the weights (and BN statistics) move to an
    EMA of themselves, with an EMA rate that ramps up as (step/total)^3; the last step copies the
    EMA into the model. Wraps the optimizer so the shared loop sees an ordinary one."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, total_steps: int, k: int = 5):
        self.optimizer, self.total_steps, self.k = optimizer, total_steps, k
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # share storage
        self.ema = [t.detach().clone() for t in self.tensors]
        self.steps = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k == 0 or self.steps == self.total_steps:
            decay = 1.0 if self.steps == self.total_steps else 0.95**5 * (self.steps / self.total_steps) ** 3
            for ema, t in zip(self.ema, self.tensors):
                ema.lerp_(t, 1 - decay)
                t.copy_(ema)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for ema, saved in zip(self.ema, state["ema"]):
            ema.copy_(saved)
        self.steps = state["steps"]


def lr_factor(step: int, total: int, r: CnnRecipe) -> float:
    """Multiplier of the peak lr at optimizer step `step` of `total`: linear warm-up from
    `initial_lr_factor` over `warmup_fraction`, then linear (onecycle) or cosine decay to `final_lr_factor`."""
    if r.schedule == "constant":
        return 1.0
    warm = int(total * r.warmup_fraction)
    if step < warm:
        return r.initial_lr_factor + (1 - r.initial_lr_factor) * step / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    if r.schedule == "onecycle":
        return 1 + (r.final_lr_factor - 1) * frac
    return r.final_lr_factor + (1 - r.final_lr_factor) * 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(model: nn.Module, r: CnnRecipe, lr: float, steps_per_epoch: int):
    """Param groups (BN biases at `bias_lr_scale` x lr, the whitening bias frozen after
    `whiten_bias_epochs`), the optimizer by name, and a per-step LambdaLR schedule."""
    total = r.epochs * steps_per_epoch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    whiten = [p for n, p in named if n.startswith("whiten.")]
    norm_biases = [p for n, p in named if ".norm" in n]
    other = [p for n, p in named if not n.startswith("whiten.") and ".norm" not in n]
    groups, lambdas = [], []
    sched = lambda step: lr_factor(step, total, r)  # noqa: E731
    if other:
        groups.append({"params": other, "lr": lr, "weight_decay": r.weight_decay})
        lambdas.append(sched)
    if norm_biases:  # airbench: biases learn faster (x bias_lr_scale) with as much decay per step
        groups.append({"params": norm_biases, "lr": lr * r.bias_lr_scale,
                       "weight_decay": r.weight_decay / r.bias_lr_scale})
        lambdas.append(sched)
    if whiten:
        stop = r.whiten_bias_epochs * steps_per_epoch
        groups.append({"params": whiten, "lr": lr, "weight_decay": r.weight_decay})
        lambdas.append(lambda step: sched(step) if step < stop else 0.0)
    device_ok = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if r.optimizer == "sgd":
        if r.nesterov and r.momentum == 0:
            raise StageError("cnn recipe: nesterov needs momentum > 0: set momentum or nesterov: false")
        opt = torch.optim.SGD(groups, lr=lr, momentum=r.momentum, nesterov=r.nesterov, fused=device_ok or None)
    elif r.optimizer in ("adam", "adamw"):  # momentum = beta1
        cls = torch.optim.Adam if r.optimizer == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=lr, betas=(r.momentum, 0.999), fused=device_ok or None)
    else:
        opt = torch.optim.RMSprop(groups, lr=lr, momentum=r.momentum, foreach=True)
    # a constant lr without a whitening group needs no scheduler: its per-step call would be pure overhead
    constant = r.schedule == "constant" and not whiten
    scheduler = None if constant else torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    wrapped = Lookahead(opt, model, total) if r.lookahead else opt
    return wrapped, scheduler


def _warm_up_compile(model: nn.Module, task: CnnTask, batch_size: int) -> float:
    """Compile now, on the shapes training and validation will use, so compile time is not
    counted as training time; the model's state is restored afterwards (no step is taken)."""
    t0 = time.perf_counter()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = next(iter(task.train.epoch(0)))
    n = len(task.train.images)
    for size in {batch_size, n % batch_size or batch_size}:
        task.loss(model, (x[:size], y[:size]))[0].backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        predict(model, task.val_x[:EVAL_BATCH], batch_size=EVAL_BATCH)
    model.train()
    model.load_state_dict(state)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(params_file: str | Path = params_mod.PARAMS_FILE, prepared_dir: str | Path = "data/prepared/cifar10",
         model_path: str | Path = "models/cnn/model.pt", live_dir: str | Path | None = "dvclive/cnn",
         metrics_path: str | Path = "metrics/cnn_train.json", progress: bool = True) -> trainer.FitResult:
    p = params_mod.load(params_file)  # before anything is written
    r = p.cnn.selected
    trainer.set_threads(r.threads)
    lr = r.lr if r.lr is not None else p.lr
    model_path = Path(model_path)

    # -- data: whole splits as tensors, on the device ---------------------------------------
    ddp = trainer.setup_distributed(p.train.device)
    device = trainer.resolve_device(p.train.device, ddp)
    card = data.load_card(prepared_dir)
    classes = card["classes"]
    mean, std = r.mean or card["mean"], r.std or card["std"]  # the recipe's own, e.g. the tutorial's 0.5
    train_x, train_y = data.load_cifar(prepared_dir, "train")
    val_x, val_y = data.load_cifar(prepared_dir, "val")
    if r.train_split == "train+val":
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32

    model_args = {**r.model_args, "num_classes": len(classes)}
    trainer.seed_everything(r.seed)
    try:
        model = build_model(r.arch, **model_args)  # seeded init on the CPU: same weights on every device
    except (TypeError, ValueError) as err:
        raise StageError(f"cnn.recipes.{p.cnn.recipe}.model_args: {err}") from None
    # channels_last everywhere: mkldnn's convs and max-pools run ~10% faster on it on CPU too,
    # LeNet included (measured at batch 32, benchmarks/README.md)
    model = model.to(device, memory_format=torch.channels_last)
    train_set = EpochImages(train_x.to(device), train_y.to(device), batch_size=r.batch_size, seed=r.seed,
                            mean=mean, std=std, flip=r.flip, translate=r.translate, dtype=dtype,
                            channels_last=True, rank=ddp.rank, world_size=ddp.world_size)
    val_norm = normalize(val_x.to(device), mean, std, dtype).contiguous(memory_format=torch.channels_last)
    task = CnnTask(train_set, val_norm, val_y.to(device), r.label_smoothing)
    if hasattr(model, "init_whitening"):  # from the first 5000 training images, as airbench does
        model.init_whitening(normalize(train_x[:5000].to(device), mean, std))

    optimizer, scheduler = make_optimizer(model, r, lr, len(train_set))

    # -- torch.compile where it pays (a GPU), with a fallback to eager -----------------------
    compile_seconds = 0.0
    if r.compile == "always" or (r.compile == "auto" and on_gpu):
        try:
            model.compile(dynamic=False)
            compile_seconds = _warm_up_compile(model, task, r.batch_size)
            print(f"torch.compile warm-up: {compile_seconds:.1f} s (not counted as training time)")
        except Exception as err:  # noqa: BLE001 - any compiler failure: train eagerly instead
            print(f"torch.compile unavailable ({type(err).__name__}: {err}); training eagerly")
            model._compiled_call_impl = None

    config = {  # the self-describing shape every trainer saves (ptpipe.kinds)
        "kind": "cnn", "model_args": {"arch": r.arch, **model_args},
        "params": {"recipe": p.cnn.recipe, **r.model_dump(), "lr": lr},  # lr resolved
        "data": {"classes": classes, "mean": mean, "std": std},
    }
    spec = trainer.Fit(
        epochs=r.epochs, model_path=model_path, checkpoint_path=model_path.with_name("checkpoint.pt"),
        config=config, inputs=(Path(prepared_dir),), live_dir=Path(live_dir) if live_dir is not None else None,
        autocast_dtype=torch.bfloat16 if on_gpu else None, progress=progress,
        non_finite_hint=f"lower the learning rate ({'lr' if r.lr is None else f'cnn.recipes.{p.cnn.recipe}.lr'}: {lr:g})",
    )
    result = trainer.fit(model, task, optimizer, scheduler, spec, device, ddp)
    if ddp.is_main and metrics_path is not None:
        files.write_json(metrics_path, {
            "train_seconds": round(result.train_seconds, 3), "compile_seconds": round(compile_seconds, 3),
            "epochs": r.epochs, "device": device.type, "recipe": p.cnn.recipe,
            "val_acc": result.best["val/acc"], "val_loss": result.best["val/loss"],
        })
    return result


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=params_mod.PARAMS_FILE, help="params file (default: %(default)s)")
    ap.add_argument("--prepared", default="data/prepared/cifar10", help="prepared CIFAR-10 dir (default: %(default)s)")
    ap.add_argument("--model", default="models/cnn/model.pt", help="model file to write (default: %(default)s)")
    ap.add_argument("--live", default="dvclive/cnn", help="DVCLive directory (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/cnn_train.json", help="timing metrics (default: %(default)s)")
    args = ap.parse_args()
    stage.run(trainer.run_stage, "ptpipe.train_cnn",
              lambda: main(args.params, args.prepared, args.model, args.live, args.metrics),
              args.params, sys.argv[1:])


if __name__ == "__main__":
    _cli()
