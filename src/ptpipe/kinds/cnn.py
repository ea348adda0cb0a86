"""Model kind `cnn`: image classifiers (CIFAR-10 or a folder of your own images) and their tensor-side
data path (training, evaluation, export).

- `LeNet`: the PyTorch tutorial's network, exactly (at 32x32; other sizes resize its first linear layer).
- `Airbench`: the airbench94 network (Keller Jordan's CIFAR-10 speedruns) with configurable widths:
  a frozen 2x2 patch-whitening conv, three conv groups (conv, pool, BN, GELU, conv, BN, GELU),
  a max-pool, a linear head and a fixed output scale.
- `build_model(arch, **model_args)`: the one way to build either from what a model file records;
  `load_model(path)`: a trained model back from models/<model>/model.pt.
- `RawImageClassifier` and `KIND`: the deployable model (raw uint8 images in, the training
  normalisation folded into the graph) and what export, validate and inference need to know.
- `EpochImages`: the whole training split as one uint8 tensor on the device; each epoch one seeded
  permutation, random translate (reflect padding) and flip as batched tensor ops over the whole set,
  normalised once; batches are contiguous slices of that tensor (views, no per-step gather).
- `normalize`, `predict` (with test-time augmentation): the same ops at evaluation and inference.
- `Recipe`, `training`: what params.yaml's recipes.cnn.<name> may say, and the parts of training that are
  this kind's (data on the device, param groups, Lookahead, torch.compile) for the loop in `ptpipe.train`.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from ptpipe import data, kinds, train
from ptpipe.data import epoch_generator
from ptpipe.params import Section
from ptpipe.stage import StageError


# -- models ---------------------------------------------------------------------------------

class LeNet(nn.Module):
    """The tutorial's net: conv 3->6 k5, pool 2, conv 6->16 k5, pool 2, fc 400->120->84->10, ReLU."""

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # after conv 5, pool 2, conv 5, pool 2: 5 at 32
        if side < 1:
            raise ValueError(f"lenet needs images of at least 16x16 (got {image_size})")
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x 3 x 32 x 32 (normalised)
        x = self.pool(F.relu(self.conv1(x)))  # B x 6 x 14 x 14
        x = self.pool(F.relu(self.conv2(x)))  # B x 16 x 5 x 5
        x = torch.flatten(x, 1)  # B x 400 (at 32x32)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # B x num_classes logits


class _BatchNorm(nn.BatchNorm2d):
    """airbench's BN: no learned scale (the next conv can scale), learned shift, tiny eps."""

    def __init__(self, num_features: int, momentum: float):
        super().__init__(num_features, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias, identity-initialised on its first in_channels outputs
    (a dirac init lets early training pass the signal straight through)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class _ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = _Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(channels_out, bn_momentum)
        self.conv2 = _Conv(channels_out, channels_out)
        self.norm2 = _BatchNorm(channels_out, bn_momentum)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooling right after conv1 (before BN) halves the cost of everything after it
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """airbench94's net; `widths` = channels of the three conv groups (airbench94: 64, 256, 256).

    Shapes for a B x 3 x 32 x 32 input: whiten -> B x 24 x 31 x 31 -> group1 -> 15 x 15
    -> group2 -> 7 x 7 -> group3 -> 3 x 3 -> max-pool (over what is left) -> B x widths[2] -> B x num_classes.
    """

    whiten_kernel = 2  # 2x2 patches: 3*2*2 = 12 dims, whitened as +/- 12 eigenvectors = 24 channels

    def __init__(self, widths: list[int] | tuple[int, int, int] = (64, 256, 256), num_classes: int = 10,
                 bn_momentum: float = 0.4, scale: float = 1 / 9, zero_whiten_bias: bool = False,
                 image_size: int = 32):
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be 3 positive channel counts, got {list(widths)}")
        side = (image_size - self.whiten_kernel + 1) // 2 // 2 // 2  # three pooling groups: 3 at 32
        if side < 1:
            raise ValueError(f"airbench needs images of at least 9x9 (got {image_size})")
        whiten_width = 2 * 3 * self.whiten_kernel**2
        self.scale = scale  # logits are scaled down: the raw head is too confident early on
        self.whiten = nn.Conv2d(3, whiten_width, self.whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by `init_whitening`, then frozen
        if zero_whiten_bias:  # airbench94 starts the (trained) whitening bias at 0; False: PyTorch's uniform
            nn.init.zeros_(self.whiten.bias)  # init, which the default recipe's measured runs used
        self.group1 = _ConvGroup(whiten_width, widths[0], bn_momentum)
        self.group2 = _ConvGroup(widths[0], widths[1], bn_momentum)
        self.group3 = _ConvGroup(widths[1], widths[2], bn_momentum)
        self.pool = nn.MaxPool2d(side)
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        x = self.pool(x).flatten(1)  # B x widths[2]
        return self.head(x) * self.scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to the ZCA-like whitening of 2x2 patches of `images` (normalised,
        N x 3 x 32 x 32; airbench uses the first 5000 training images)."""
        k = self.whiten_kernel
        c = images.shape[1]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N x 3 x 31 x 31 x k x k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # (N*31*31) x 12
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first
        filters = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).to(self.whiten.weight))


ARCHS = {"lenet": LeNet, "airbench": Airbench}


def build_model(arch: str, **model_args) -> nn.Module:
    """The model a recipe or a model file names; unknown args are a ValueError naming them."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}")
    cls = ARCHS[arch]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(model_args) - allowed)
    if unknown:
        raise ValueError(f"{arch} takes no argument {unknown[0]!r} (it takes {sorted(allowed)})")
    return cls(**model_args)


class RawImageClassifier(nn.Module):
    """A classifier behind the training normalisation: uint8 B x 3 x S x S -> logits B x classes.

    Same arithmetic as `normalize` ((x - 255 mean) * 1/(255 std)), so eager, TorchScript and ONNX
    all see exactly what evaluation fed the model."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.shift) * self.scale)


def _model_args(config: dict) -> dict:
    return {k: v for k, v in config["model_args"].items() if k != "arch"}


def build(config: dict) -> RawImageClassifier:
    """The deployable model of a saved config (weights not loaded): raw images in."""
    net = build_model(config["model_args"]["arch"], **_model_args(config))
    return RawImageClassifier(net, config["data"]["mean"], config["data"]["std"])


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(eval-mode trained net on the CPU, its config) rebuilt from a model file alone, not params.yaml.
    The net takes normalised images (`normalize`): what evaluation with test-time augmentation needs."""
    _, raw, config = kinds.load(path, "cnn")
    return raw.model, config


def example_inputs(model: nn.Module, config: dict) -> tuple[torch.Tensor, ...]:
    # batch 2: sizes 0/1 would invite the exporter to specialise the batch axis
    size = _image_size(config)
    return (torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),)


def _image_size(config: dict) -> int:
    return {**KIND.arg_defaults, **config["model_args"]}["image_size"]


def metadata(config: dict) -> dict:
    d = config["data"]
    return {"classes": d["classes"], "mean": d["mean"], "std": d["std"], "image_size": _image_size(config),
            "arch": config["model_args"]["arch"]}


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    """The first N test images (raw uint8: the files contain the normalisation), N in `batch`."""
    batches = kinds.shape_params(shapes, config["kind"], "batch")  # a kind reusing this one names its own key
    images = data.load_images(prepared_dir, "test")[0].numpy()
    if len(images) == 0:
        raise StageError(f"{prepared_dir} has no test images to validate on")
    # a small data set's test images are repeated to fill the larger batches (as text kinds repeat a short text)
    return [kinds.Case(f"batch={n}", [{"images": np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])))}])
            for n in batches]




# -- data as tensor ops ----------------------------------------------------------------------

def normalize(images: torch.Tensor, mean: list[float], std: list[float], dtype=torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W (0..255) -> `dtype`, per channel (x/255 - mean) / std."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    inv_std = 1 / (torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255)
    return ((images.float() - mean_t) * inv_std).to(dtype)


def _translate(padded: torch.Tensor, shifts: torch.Tensor, pad: int, size: int) -> torch.Tensor:
    """Crop each image of `padded` (N x C x size+2pad x size+2pad) at its own (dy, dx) in -pad..pad:
    one masked copy per distinct shift ((2pad+1)^2 of them), no per-image Python."""
    out = torch.empty(padded.shape[:2] + (size, size), dtype=padded.dtype, device=padded.device)
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[mask] = padded[mask, :, pad + dy: pad + dy + size, pad + dx: pad + dx + size]
    return out


class EpochImages:
    """The training split, augmented and batched per epoch; a pure function of (seed, epoch).

    `flip`: "none", "random" (each image with p=1/2 each epoch) or "alternate" (airbench:
    a seeded random half is flipped in even epochs, the other half in odd epochs, so every image
    is seen both ways in any two consecutive epochs). `translate`: max shift in pixels (reflect
    padding), 0 = none. `drop_last`: leave out each epoch's last, incomplete batch (airbench94 does).

    Under DistributedDataParallel (`world_size` > 1) every rank builds the same epoch and takes
    every `world_size`-th image of each global batch of `batch_size`: the ranks' half-batches are
    disjoint and together are the single-process batch, so the global batch, and the averaged
    gradient, stay the same. The last incomplete global batch is dropped so all ranks take the
    same number of steps.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int,
                 mean: list[float], std: list[float], flip: str, translate: int,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if batch_size % world_size:  # unequal shards would weight the ranks' mean losses unequally
            raise StageError(f"batch_size {batch_size} does not divide among train.nproc={world_size} processes: "
                             f"make the recipe's batch_size a multiple of {world_size}")
        self.images, self.labels = images, labels  # uint8 N x 3 x S x S and int64 N, on the device
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last or world_size > 1
        self.mean, self.std, self.flip, self.translate = mean, std, flip, translate
        self.dtype, self.channels_last = dtype, channels_last
        base = torch.Generator().manual_seed(seed)
        self.base_flip = torch.rand(len(images), generator=base) < 0.5  # for "alternate"
        self._plain = None  # normalised un-augmented set, reused when there is no augmentation

    def __len__(self) -> int:  # batches per epoch; the last one may be smaller (single process, drop_last off)
        if self.drop_last:
            return len(self.images) // self.batch_size
        return -(-len(self.images) // self.batch_size)

    def _batch_starts(self) -> range:
        return range(0, len(self) * self.batch_size, self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        gen = epoch_generator(self.seed, epoch)  # CPU RNG: same on every device, rank and resume
        perm = torch.randperm(len(self.images), generator=gen)
        if self.translate == 0 and self.flip == "none":
            # nothing to augment: normalise once, gather each batch from that (a 50,000-image
            # float gather per epoch costs about as much as 200 LeNet steps)
            if self._plain is None:
                self._plain = self._finish(self.images)
            perm = perm.to(device)
            for i in self._batch_starts():
                idx = perm[i: i + self.batch_size][self.rank::self.world_size]
                yield self._plain[idx], self.labels[idx]  # B x 3 x S x S (keeps channels_last), B
            return
        else:
            x = self.images[perm.to(device)]  # uint8: augment before the 4x larger float copy
            if self.translate > 0:
                p = self.translate
                shifts = torch.randint(-p, p + 1, (len(x), 2), generator=gen).to(device)
                padded = F.pad(x.float(), (p,) * 4, mode="reflect").to(torch.uint8)  # reflect needs float
                x = _translate(padded, shifts, p, x.shape[-1])
            if self.flip != "none":
                if self.flip == "random":
                    mask = torch.rand(len(x), generator=gen) < 0.5
                else:
                    mask = self.base_flip[perm] ^ bool(epoch % 2)
                x = torch.where(mask.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
            x = self._finish(x)
        y = self.labels[perm.to(device)]
        r, w = self.rank, self.world_size
        for i in self._batch_starts():
            yield x[i: i + self.batch_size][r::w], y[i: i + self.batch_size][r::w]  # views: no copy per step

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.mean, self.std, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# -- inference -------------------------------------------------------------------------------

def _tta_logits(model: nn.Module, x: torch.Tensor, tta: int) -> torch.Tensor:
    """tta 0: plain; 1: average with the mirror image; 2: also with 1-pixel translations (airbench)."""
    logits = model(x)
    if tta == 0:
        return logits
    logits = 0.5 * logits + 0.5 * model(x.flip(-1))
    if tta == 1:
        return logits
    padded = F.pad(x, (1,) * 4, mode="reflect")
    size = x.shape[-1]
    shifted = [padded[:, :, 0:size, 0:size], padded[:, :, 2:size + 2, 2:size + 2]]
    translated = torch.stack([0.5 * model(s) + 0.5 * model(s.flip(-1)) for s in shifted]).mean(0)
    return 0.5 * logits + 0.5 * translated


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad)
def predict(model: nn.Module, images: torch.Tensor, *, tta: int = 0, batch_size: int = 1000) -> torch.Tensor:
    """Logits (float32, N x classes) of normalised images N x 3 x S x S, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([_tta_logits(model, images[i: i + batch_size], tta).float()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


# -- training (the loop itself is ptpipe.train.fit) ----------------------------------------------

class Recipe(Section):
    """One recipe, `recipes.cnn.<name>` in params.yaml; units and reasons are written there."""

    arch: Literal["lenet", "airbench"]
    model_args: dict[str, Union[bool, int, float, list[int]]]  # checked against the arch by build_model
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=2, le=65536)
    drop_last: bool  # drop each epoch's last, partial batch (airbench94 does)
    train_split: Literal["train", "train+val"]
    validation: Literal["auto", "always", "never"]  # per-epoch validation; auto = when train_split holds val out
    checkpoint_every: int = Field(ge=1, le=1000)  # epochs between checkpoints
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"]
    lr: Optional[Annotated[float, Field(gt=0, le=10, strict=False)]]  # null: the top-level lr
    momentum: Annotated[float, Field(ge=0, lt=1, strict=False)]
    nesterov: bool
    weight_decay: Annotated[float, Field(ge=0, lt=1, strict=False)]
    bias_lr_scale: Annotated[float, Field(gt=0, le=1000, strict=False)]
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1, strict=False)]
    initial_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    final_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1, strict=False)]
    lookahead: bool
    lookahead_every: int = Field(ge=1)
    lookahead_start_epoch: int = Field(ge=0)
    whiten_bias_epochs: int = Field(ge=0)
    translate: int = Field(ge=0, le=8)
    flip: Literal["none", "random", "alternate"]
    mean: Optional[list[Annotated[float, Field(ge=0, le=1, strict=False)]]] = Field(min_length=3, max_length=3)
    std: Optional[list[Annotated[float, Field(gt=0, le=1, strict=False)]]] = Field(min_length=3, max_length=3)
    tta: int = Field(ge=0, le=2)
    compile: Literal["auto", "always", "never"]
    autocast: Literal["auto", "bfloat16", "none"]  # auto = bfloat16 on a GPU, none (float32) elsewhere
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    seed: int


MIN_IMAGE_SIZE = {"lenet": 16, "airbench": 9}  # what the convolutions and pools leave at least one pixel of


def check_data(recipe: Recipe, dataset) -> str | None:
    """Why this recipe cannot train on `dataset` (params.yaml datasets.<name>), or None: checked with the
    params, before any stage writes anything."""
    size = getattr(dataset, "image_size", 32)
    if size < MIN_IMAGE_SIZE[recipe.arch]:
        return (f"image_size {size} is too small for arch {recipe.arch} (at least {MIN_IMAGE_SIZE[recipe.arch]}): "
                f"raise the data set's image_size or choose another recipe")
    return None


EVAL_BATCH = 1000  # images per forward pass at validation: memory only, no effect on results
# torch.compile's backend. The tests set "aot_eager" (dynamo + AOTAutograd, the same graphs and
# guards, no code generation): inductor's C++ code generation takes minutes on a small shared CPU.
COMPILE_BACKEND = "inductor"
AUTOCAST = {"bfloat16": torch.bfloat16, "none": None}  # the recipe's `autocast` (auto: bfloat16 on a GPU)


class Lookahead:
    """airbench94's Lookahead around the optimizer: from epoch `start_epoch` (0-based) on, every `every`
    steps the weights (and BN statistics) move to an EMA of themselves at a rate that ramps up as
    (step/total)^3; the EMA starts as a copy of the weights and is copied into the model at the end of
    every epoch and at the last step (airbench's `update(decay=1.0)`). Its state is checkpointed with it."""

    def __init__(self, optimizer, model: nn.Module, total: int, per_epoch: int, every: int, start_epoch: int):
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # share storage
        self.total, self.per_epoch, self.every, self.start_epoch = total, per_epoch, every, start_epoch
        self.ema, self.steps = None, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        if (self.steps - 1) // self.per_epoch >= self.start_epoch and self.steps % self.every == 0:
            if self.ema is None:
                self.ema = [t.detach().clone() for t in self.tensors]
            decay = 0.95**5 * (self.steps / self.total) ** 3
            for ema, t in zip(self.ema, self.tensors):
                ema.lerp_(t, 1 - decay)
                t.copy_(ema)
        if self.ema is not None and (self.steps % self.per_epoch == 0 or self.steps == self.total):
            torch._foreach_copy_(self.tensors, self.ema)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema = state["ema"] and [saved.to(t.device, copy=True) for saved, t in zip(state["ema"], self.tensors)]
        self.steps = state["steps"]


def make_optimizer(model: nn.Module, r: Recipe, lr: float, per_epoch: int, key: str):
    """(optimizer, lr factor) of the recipe: BatchNorm biases at `bias_lr_scale` x lr (airbench: biases learn
    faster with as much decay per step), the whitening bias frozen after `whiten_bias_epochs`; Lookahead around it."""
    total = r.epochs * per_epoch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    whiten = [p for n, p in named if n.startswith("whiten.")]
    norm_biases = [p for n, p in named if ".norm" in n]
    other = [p for n, p in named if not n.startswith("whiten.") and ".norm" not in n]
    groups = [g for g in (
        {"params": other, "lr": lr, "weight_decay": r.weight_decay},
        {"params": norm_biases, "lr": lr * r.bias_lr_scale, "weight_decay": r.weight_decay / r.bias_lr_scale},
        {"params": whiten, "lr": lr, "weight_decay": r.weight_decay, "frozen_after": r.whiten_bias_epochs * per_epoch},
    ) if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
    try:
        opt = train.make_optimizer(groups, r.optimizer, lr, momentum=r.momentum, nesterov=r.nesterov, fused=fused)
    except StageError as err:
        raise StageError(f"{key}: {err}") from None
    # a constant lr without a whitening group needs no schedule: setting the same lr every step is overhead
    factor = None if r.schedule == "constant" and not whiten else train.lr_schedule(
        r.schedule, total, r.warmup_fraction, r.initial_lr_factor, r.final_lr_factor)
    if r.lookahead:
        opt = Lookahead(opt, model, total, per_epoch, r.lookahead_every, r.lookahead_start_epoch)
    return opt, factor


def non_finite_hint(r: Recipe, key: str, lr: float) -> str:
    """What to change when the loss blows up, naming the params keys in effect."""
    changes = [f"lower the learning rate ({'lr' if r.lr is None else f'{key}.lr'}: {lr:g}, "
               f"{key}.optimizer: {r.optimizer})"]
    if r.weight_decay > 0:
        changes.append(f"lower {key}.weight_decay ({r.weight_decay:g})")
    if r.bias_lr_scale != 1:
        changes.append(f"lower {key}.bias_lr_scale ({r.bias_lr_scale:g})")
    return train.alternatives(changes)


def compile_and_warm_up(model: nn.Module, parts: dict, device: torch.device, mode: str, key: str) -> dict:
    """torch.compile the model when `mode` asks for it (always; auto = on a GPU: on a CPU it does not pay,
    benchmarks/README.md), then `train.warm_up` (every graph the timed epochs need). Eager on a GPU gets the
    warm-up too (cuDNN autotuning, cuBLAS/cuDNN handles). Under DDP `model` is the wrapper: the inner
    module is compiled and warmed up through it (PyTorch's advice: compile the module DDP wraps).
    A failed compile is a StageError under `always`; under `auto` a loud warning and eager training.
    Returns what happened, for metrics/<model>/train.json."""
    facts = {"compile": mode, "compiled": False, "compile_error": None, "warmup_seconds": 0.0}
    graphs, breaks = train.dynamo_counts()
    warm = lambda: train.warm_up(model, parts["batches"](0), parts["loss"], parts["evaluate"], device,  # noqa: E731
                                 parts["autocast_dtype"])
    if mode == "always" or (mode == "auto" and device.type == "cuda"):
        torch._dynamo.reset()  # a fresh cache per run: several runs in one process (benchmarks) would hit its limit
        inner = train.unwrap(model)
        try:
            inner.compile(dynamic=False, backend=COMPILE_BACKEND)  # in place: the state_dict keeps its keys
            facts.update(warmup_seconds=warm(), compiled=True)
        except Exception as err:  # noqa: BLE001 - whatever the compiler raised: recorded, then `mode` decides
            inner._compiled_call_impl = None  # nn.Module.compile's attribute: None = eager again
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
            if mode == "always":
                raise StageError(f"torch.compile failed ({error}): {key}.compile is 'always'; "
                                 f"set it to auto (falls back to eager) or never") from None
            facts["compile_error"] = error
            warnings.warn(f"torch.compile FAILED, training EAGERLY (slower): {error}", RuntimeWarning, stacklevel=2)
            print(f"\n{'!' * 78}\n!! torch.compile failed: training eagerly ({key}.compile: auto)\n"
                  f"!! {error}\n{'!' * 78}", file=sys.stderr, flush=True)
    if not facts["compiled"] and device.type == "cuda":
        facts["warmup_seconds"] = warm()
    graphs_now, breaks_now = train.dynamo_counts()
    facts.update(graphs=graphs_now - graphs, graph_breaks=breaks_now - breaks)
    return facts


def _splits(r: Recipe, data_dir: Path) -> tuple:
    """(classes, mean, std, (train images, labels), (val images, labels)) as the recipe trains on them."""
    card = data.load_card(data_dir)
    train_x, train_y = data.load_images(data_dir, "train")
    val_x, val_y = data.load_images(data_dir, "val")
    if r.train_split == "train+val":
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    return card["classes"], r.mean or card["mean"], r.std or card["std"], (train_x, train_y), (val_x, val_y)


def training(r: Recipe, data_dir: Path, device: torch.device, ddp, key: str, default_lr: float) -> train.Training:
    """The CNN's part of training: the whole training split on the device as one uint8 tensor,
    augmentation and normalisation as batched tensor ops (`EpochImages`), channels_last on every device
    (oneDNN's convolutions are faster on it on a CPU too), bf16 autocast, cuDNN autotuning and
    torch.compile on a GPU; the timed region is the whitening init plus the training steps, as airbench's."""
    lr = r.lr if r.lr is not None else default_lr
    classes, mean, std, (train_x, train_y), (val_x, val_y) = _splits(r, data_dir)
    on_gpu = device.type == "cuda"
    autocast_dtype = AUTOCAST[r.autocast] if r.autocast != "auto" else (torch.bfloat16 if on_gpu else None)
    dtype = autocast_dtype or torch.float32  # the images are cast once, to what the convs compute in
    torch.backends.cudnn.benchmark = on_gpu  # fixed shapes: autotune each conv once (in the warm-up)

    model_args = {**r.model_args, "num_classes": len(classes), "image_size": train_x.shape[-1]}
    train.seed_everything(r.seed)
    try:
        net = build_model(r.arch, **model_args)  # seeded init on the CPU: same weights on every device
    except (TypeError, ValueError) as err:
        raise StageError(f"{key}.model_args: {err}") from None
    net = net.to(device, memory_format=torch.channels_last)
    epochs = EpochImages(train_x.to(device), train_y.to(device), batch_size=r.batch_size, seed=r.seed, mean=mean,
                         std=std, flip=r.flip, translate=r.translate, dtype=dtype, channels_last=True,
                         rank=ddp.rank, world_size=ddp.world_size, drop_last=r.drop_last)
    if len(epochs) == 0:
        raise StageError(f"{key}: no training batch: batch_size {r.batch_size} is more than the "
                         f"{len(train_x) // ddp.world_size} training images per process and drop_last is on: "
                         f"lower batch_size or set drop_last: false")
    val_norm = normalize(val_x.to(device), mean, std, dtype).contiguous(memory_format=torch.channels_last)
    val_y = val_y.to(device)

    def loss(model, batch, carry):
        x, y = batch  # B x 3 x S x S normalised, B labels
        return F.cross_entropy(model(x).float(), y, label_smoothing=r.label_smoothing), len(y), None

    def evaluate(model):
        logits = predict(model, val_norm, batch_size=EVAL_BATCH)
        return {"val/loss": F.cross_entropy(logits, val_y).item(),
                "val/acc": (logits.argmax(1) == val_y).float().mean().item()}

    validate = r.validation == "always" or (r.validation == "auto" and r.train_split == "train")
    watch = train.Stopwatch(device)  # the timed region: whitening init + training steps (airbench's)
    if hasattr(net, "init_whitening"):  # from the first 5000 training images, as airbench does
        whiten_images = normalize(train_x[:5000].to(device), mean, std)
        if on_gpu:
            net.init_whitening(whiten_images[:64])  # cuSOLVER/cuBLAS start-up, outside the timed region
        with watch.timing():
            net.init_whitening(whiten_images)
    optimizer, factor = make_optimizer(net, r, lr, len(epochs), key)
    model = train.wrap_ddp(net, device, ddp)  # DDP first, then torch.compile of the module it wraps
    parts = {"batches": epochs.epoch, "loss": loss, "evaluate": evaluate if validate else None,
             "autocast_dtype": autocast_dtype}
    facts = compile_and_warm_up(model, parts, device, r.compile, key)
    return train.Training(
        model=model, optimizer=optimizer, lr_factor=factor, batches=epochs.epoch, loss=loss,
        evaluate=parts["evaluate"], epochs=r.epochs, checkpoint_every=r.checkpoint_every, clip=None, patience=None,
        monitor=None,  # the last epoch's weights (a onecycle schedule ends at its best)
        config={"kind": "cnn", "model_args": {"arch": r.arch, **model_args}, "params": {**r.model_dump(), "lr": lr},
                "data": {"classes": classes, "mean": mean, "std": std}},
        # twice chance: an untrained model guesses uniformly at log(classes)
        ceiling=(2 * np.log(len(classes)), f"twice chance (log {len(classes)} classes)"),
        hint=non_finite_hint(r, key, lr), unit="img", steps_per_epoch=len(epochs), autocast_dtype=autocast_dtype,
        stopwatch=watch, facts={**facts, "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype
                                else None, "epochs": r.epochs},
    )


KIND = kinds.ModelKind(
    name="cnn", task="image-classification", formats=("cifar10-python", "image-folder"),
    inputs=(kinds.TensorSpec("images", "uint8", ("batch", 3, "image_size", "image_size")),),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "num_classes")),),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
    recipe=Recipe, training=training, check_data=check_data, trained_part=lambda module: module.model,
    arg_defaults={"image_size": 32},  # model files from before own data sets: all CIFAR-10's 32 x 32
)
