"""Stage `train_cnn`: train the CIFAR-10 classifier of the selected `cnn.recipes.<name>`.

Reads data/prepared/cifar10, writes models/cnn/model.pt ({state_dict, config}) through the shared
loop `ptpipe.trainer.fit` (checkpoint every `checkpoint_every` epochs + resume, non-finite guard,
DVCLive in dvclive/cnn), and metrics/cnn_train.json (what ran and how long each part took). The
whole training split sits on the device as one uint8 tensor; augmentation and normalisation are
batched tensor ops (`ptpipe.kinds.cnn`). channels_last on every device (oneDNN's convolutions are faster
on it on CPU too); on a GPU also bf16 autocast, cuDNN autotuning, and torch.compile when `compile`
allows it. Before the timed epochs a warm-up runs every batch shape of training and validation
under the contexts `fit` uses, so compilation and cuDNN/cuBLAS start-up stay out of them; the
timed region (CUDA events on a GPU) is the whitening init plus the training steps, as airbench's.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import data, files, params as params_mod, stage, trainer
from ptpipe.kinds.cnn import EpochImages, build_model, normalize, predict
from ptpipe.params import CnnRecipe
from ptpipe.stage import StageError

EVAL_BATCH = 1000  # images per forward pass at validation: memory only, no effect on results
# torch.compile's backend. The tests set "aot_eager" (dynamo + AOTAutograd, the same graphs and
# guards, no code generation): inductor's C++ code generation takes minutes on a small shared CPU.
COMPILE_BACKEND = "inductor"
AUTOCAST = {"bfloat16": torch.bfloat16, "none": None}  # the recipe's `autocast` (auto: bfloat16 on a GPU)


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
    """airbench94's Lookahead: from epoch `start_epochs` (0-based) on, every `k` optimizer steps
    the weights (and BN statistics) move to an EMA of themselves, with an EMA rate that ramps up as
    (step/total)^3; the EMA starts as a copy of the weights at the first such step, and is copied
    into the model at the end of every epoch and at the last step (airbench's `update(decay=1.0)`).
    Wraps the optimizer so the shared loop sees an ordinary one."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, total_steps: int,
                 steps_per_epoch: int, k: int = 5, start_epochs: int = 3):
        self.optimizer, self.total_steps, self.k = optimizer, total_steps, k
        self.steps_per_epoch, self.start_epochs = steps_per_epoch, start_epochs
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # share storage
        self.ema: list[torch.Tensor] | None = None
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
        epoch = (self.steps - 1) // self.steps_per_epoch
        if epoch >= self.start_epochs and self.steps % self.k == 0:
            if self.ema is None:
                self.ema = [t.detach().clone() for t in self.tensors]
            else:
                decay = 0.95**5 * (self.steps / self.total_steps) ** 3
                for ema, t in zip(self.ema, self.tensors):
                    ema.lerp_(t, 1 - decay)
                    t.copy_(ema)
        if self.ema is not None and (self.steps % self.steps_per_epoch == 0 or self.steps == self.total_steps):
            for ema, t in zip(self.ema, self.tensors):
                t.copy_(ema)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema = None if state["ema"] is None else [
            saved.to(t.device, copy=True) for saved, t in zip(state["ema"], self.tensors)]
        self.steps = state["steps"]


def make_optimizer(model: nn.Module, r: CnnRecipe, lr: float, steps_per_epoch: int):
    """(optimizer, schedule) of the recipe, from the shared factory: param groups with BN biases at
    `bias_lr_scale` x lr and the whitening bias frozen after `whiten_bias_epochs`; Lookahead around it."""
    total = r.epochs * steps_per_epoch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    whiten = [p for n, p in named if n.startswith("whiten.")]
    norm_biases = [p for n, p in named if ".norm" in n]
    other = [p for n, p in named if not n.startswith("whiten.") and ".norm" not in n]
    groups = []
    if other:
        groups.append({"params": other, "lr": lr, "weight_decay": r.weight_decay})
    if norm_biases:  # airbench: biases learn faster (x bias_lr_scale) with as much decay per step
        groups.append({"params": norm_biases, "lr": lr * r.bias_lr_scale,
                       "weight_decay": r.weight_decay / r.bias_lr_scale})
    if whiten:
        groups.append({"params": whiten, "lr": lr, "weight_decay": r.weight_decay,
                       "frozen_after": r.whiten_bias_epochs * steps_per_epoch})
    device_ok = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    try:
        opt = trainer.make_optimizer(groups, r.optimizer, lr, momentum=r.momentum, nesterov=r.nesterov,
                                     fused=device_ok or None)
    except StageError as err:
        raise StageError(f"cnn recipe: {err}") from None
    # a constant lr without a whitening group needs no schedule: setting the same lr every step is overhead
    constant = r.schedule == "constant" and not whiten
    schedule = None if constant else trainer.lr_schedule(r.schedule, total, r.warmup_fraction,
                                                         r.initial_lr_factor, r.final_lr_factor)
    wrapped = Lookahead(opt, model, total, steps_per_epoch) if r.lookahead else opt
    return wrapped, schedule


def non_finite_hint(p: params_mod.Params, lr: float) -> str:
    """What to change when the loss blows up, naming the params keys in effect."""
    r, key = p.cnn.selected, f"cnn.recipes.{p.cnn.recipe}"
    changes = [f"lower the learning rate ({'lr' if r.lr is None else f'{key}.lr'}: {lr:g}, "
               f"{key}.optimizer: {r.optimizer})"]
    if r.weight_decay > 0:
        changes.append(f"lower {key}.weight_decay ({r.weight_decay:g})")
    if r.bias_lr_scale != 1:
        changes.append(f"lower {key}.bias_lr_scale ({r.bias_lr_scale:g})")
    return trainer.alternatives(changes)


def _dynamo_counts() -> dict[str, int]:
    """What dynamo has compiled in this process so far (torch._dynamo's counters: never reset by
    torch._dynamo.reset, so a run takes differences)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def wants_compile(mode: str, device: torch.device) -> bool:
    """The recipe's `compile`: always, never, or auto = on a GPU (on a CPU it does not pay: benchmarks/README.md)."""
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def compile_and_warm_up(model: nn.Module, task: CnnTask, spec: trainer.Fit, device: torch.device,
                        mode: str, key: str) -> dict:
    """torch.compile the model when `mode` asks for it (always; auto = on a GPU), then the warm-up
    (`trainer.warm_up`: compiles every graph the timed epochs need). Eager on a GPU gets the warm-up
    too (cuDNN autotuning, cuBLAS/cuDNN handles). Under DDP `model` is the wrapper: the inner module
    is compiled and warmed up through it (PyTorch's advice: compile the module DDP wraps).

    A failed compile is a StageError under `always`; under `auto` a loud warning and eager training.
    Returns what happened, for metrics/cnn_train.json."""
    facts = {"compile": mode, "compiled": False, "compile_error": None, "warmup_seconds": 0.0}
    if wants_compile(mode, device):
        torch._dynamo.reset()  # a fresh cache per run: several runs in one process (benchmarks) would hit its limit
        inner = trainer.unwrap(model)
        try:
            inner.compile(dynamic=False, backend=COMPILE_BACKEND)  # in place: the state_dict keeps its keys
            facts["warmup_seconds"] = trainer.warm_up(model, task, spec, device)
            facts["compiled"] = True
        except Exception as err:  # noqa: BLE001 - whatever the compiler raised: recorded, then `mode` decides
            inner._compiled_call_impl = None  # nn.Module.compile's attribute: None = eager again
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
            if mode == "always":
                raise StageError(f"torch.compile failed ({error}): cnn.recipes.{key}.compile is 'always'; "
                                 f"set it to auto (falls back to eager) or never") from None
            facts["compile_error"] = error
            warnings.warn(f"torch.compile FAILED, training EAGERLY (slower): {error}", RuntimeWarning, stacklevel=2)
            print(f"\n{'!' * 78}\n!! torch.compile failed: training eagerly (cnn.recipes.{key}.compile: auto)\n"
                  f"!! {error}\n{'!' * 78}", file=sys.stderr, flush=True)
    if not facts["compiled"] and device.type == "cuda":
        facts["warmup_seconds"] = trainer.warm_up(model, task, spec, device)
    return facts


def _runtime() -> dict:
    """torch, CUDA and GPU of this run: a timing means little without them."""
    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}


def main(params_file: str | Path = params_mod.PARAMS_FILE, prepared_dir: str | Path = "data/prepared/cifar10",
         model_path: str | Path = "models/cnn/model.pt", live_dir: str | Path | None = "dvclive/cnn",
         metrics_path: str | Path = "metrics/cnn_train.json", progress: bool = True) -> trainer.FitResult:
    t_start = time.perf_counter()
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
    autocast_dtype = AUTOCAST[r.autocast] if r.autocast != "auto" else (torch.bfloat16 if on_gpu else None)
    dtype = autocast_dtype or torch.float32  # the images are cast once, to what the convs compute in
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once (in the warm-up)

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
                            channels_last=True, rank=ddp.rank, world_size=ddp.world_size, drop_last=r.drop_last)
    if len(train_set) == 0:
        raise StageError(f"cnn.recipes.{p.cnn.recipe}: no training batch: batch_size {r.batch_size} is more than the "
                         f"{len(train_x) // ddp.world_size} training images per process and drop_last is on: "
                         f"lower batch_size or set drop_last: false")
    val_norm = normalize(val_x.to(device), mean, std, dtype).contiguous(memory_format=torch.channels_last)
    task = CnnTask(train_set, val_norm, val_y.to(device), r.label_smoothing)
    watch = trainer.Stopwatch(device)  # the timed region: whitening init + training steps (airbench's)
    if hasattr(model, "init_whitening"):  # from the first 5000 training images, as airbench does
        whiten_images = normalize(train_x[:5000].to(device), mean, std)
        if on_gpu:
            model.init_whitening(whiten_images[:64])  # cuSOLVER/cuBLAS start-up, outside the timed region
        with watch.timing():
            model.init_whitening(whiten_images)

    optimizer, schedule = make_optimizer(model, r, lr, len(train_set))

    config = {  # the self-describing shape every trainer saves (ptpipe.kinds)
        "kind": "cnn", "model_args": {"arch": r.arch, **model_args},
        "params": {"recipe": p.cnn.recipe, **r.model_dump(), "lr": lr},  # lr resolved
        "data": {"classes": classes, "mean": mean, "std": std},
    }
    validate = r.validation == "always" or (r.validation == "auto" and r.train_split == "train")
    spec = trainer.Fit(
        epochs=r.epochs, model_path=model_path, checkpoint_path=model_path.with_name("checkpoint.pt"),
        config=config, inputs=(Path(prepared_dir),), live_dir=Path(live_dir) if live_dir is not None else None,
        checkpoint_every=r.checkpoint_every, validate=validate, stopwatch=watch,
        autocast_dtype=autocast_dtype, progress=progress,
        non_finite_hint=non_finite_hint(p, lr),
        # twice chance: an untrained model guesses uniformly at log(classes)
        loss_ceiling=2 * math.log(len(classes)), loss_ceiling_reason=f"twice chance (log {len(classes)} classes)",
    )
    # -- DDP first, then torch.compile of the module it wraps, then the warm-up --------------
    model = trainer.wrap_ddp(model, device, ddp)
    counts = _dynamo_counts()
    facts = compile_and_warm_up(model, task, spec, device, r.compile, p.cnn.recipe)
    facts.update({k: v - counts[k] for k, v in _dynamo_counts().items()})
    counts = _dynamo_counts()
    if facts["compiled"]:
        print(f"torch.compile: {facts['graphs']} graphs, {facts['graph_breaks']} graph breaks; warm-up "
              f"{facts['warmup_seconds']:.1f} s (not counted as training time)")
    setup_seconds = time.perf_counter() - t_start - facts["warmup_seconds"] - watch.seconds

    result = trainer.fit(model, task, optimizer, schedule, spec, device, ddp)
    facts["recompiles"] = _dynamo_counts()["graphs"] - counts["graphs"]  # graphs compiled inside the timed epochs
    if facts["recompiles"]:
        print(f"warning: torch.compile compiled {facts['recompiles']} more graph(s) during training "
              f"(a shape or mode the warm-up did not cover): those epochs include compile time", file=sys.stderr)
    if ddp.is_main and metrics_path is not None:
        files.write_json(metrics_path, {
            "train_seconds": round(result.train_seconds, 3),  # whitening init + training steps (CUDA events on a GPU)
            "warmup_seconds": round(facts["warmup_seconds"], 3),  # compile + first-call start-up, not timed
            "other_seconds": round(result.other_seconds, 3),  # validation, checkpoints, logging, model file
            "setup_seconds": round(setup_seconds, 3),  # loading the data onto the device, building the model
            "epochs": r.epochs, "device": device.type, "recipe": p.cnn.recipe,
            "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
            **{k: v for k, v in facts.items() if k != "warmup_seconds"}, **_runtime(),
            "val_acc": result.best.get("val/acc"), "val_loss": result.best.get("val/loss"),
        })
    return result


def _cli() -> None:
    args = stage.parser(__doc__, prepared="data/prepared/cifar10", model="models/cnn/model.pt", live="dvclive/cnn",
                        metrics="metrics/cnn_train.json").parse_args()
    stage.run(trainer.run_stage, "ptpipe.train_cnn",
              lambda: main(args.params, args.prepared, args.model, args.live, args.metrics),
              args.params, sys.argv[1:])


if __name__ == "__main__":
    _cli()
