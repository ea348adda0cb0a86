"""Model kind `cnn`: the CIFAR-10 classifiers and their tensor-side data path (training, evaluation, export).

- `LeNet`: the PyTorch tutorial's network, exactly.
- `Airbench`: the airbench94 network (Keller Jordan's CIFAR-10 speedruns) with configurable widths:
  a frozen 2x2 patch-whitening conv, three conv groups (conv, pool, BN, GELU, conv, BN, GELU),
  a max-pool, a linear head and a fixed output scale.
- `build_model(arch, **model_args)`: the one way to build either from what a model file records;
  `load_model(path)`: a trained model back from models/cnn/model.pt.
- `RawImageClassifier` and `KIND`: the deployable model (raw uint8 images in, the training
  normalisation folded into the graph) and what export, validate and inference need to know.
- `EpochImages`: the whole training split as one uint8 tensor on the device; each epoch one seeded
  permutation, random translate (reflect padding) and flip as batched tensor ops over the whole set,
  normalised once; batches are contiguous slices of that tensor (views, no per-step gather).
- `normalize`, `predict` (with test-time augmentation): the same ops at evaluation and inference.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import kinds
from ptpipe.data import epoch_generator, load_cifar
from ptpipe.stage import StageError


# -- models ---------------------------------------------------------------------------------

class LeNet(nn.Module):
    """The tutorial's net: conv 3->6 k5, pool 2, conv 6->16 k5, pool 2, fc 400->120->84->10, ReLU."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x 3 x 32 x 32 (normalised)
        x = self.pool(F.relu(self.conv1(x)))  # B x 6 x 14 x 14
        x = self.pool(F.relu(self.conv2(x)))  # B x 16 x 5 x 5
        x = torch.flatten(x, 1)  # B x 400
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
    -> group2 -> 7 x 7 -> group3 -> 3 x 3 -> max-pool -> B x widths[2] -> B x num_classes.
    """

    whiten_kernel = 2  # 2x2 patches: 3*2*2 = 12 dims, whitened as +/- 12 eigenvectors = 24 channels

    def __init__(self, widths: list[int] | tuple[int, int, int] = (64, 256, 256), num_classes: int = 10,
                 bn_momentum: float = 0.4, scale: float = 1 / 9, zero_whiten_bias: bool = False):
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be 3 positive channel counts, got {list(widths)}")
        whiten_width = 2 * 3 * self.whiten_kernel**2
        self.scale = scale  # logits are scaled down: the raw head is too confident early on
        self.whiten = nn.Conv2d(3, whiten_width, self.whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by `init_whitening`, then frozen
        if zero_whiten_bias:  # airbench94 starts the (trained) whitening bias at 0; False: PyTorch's uniform
            nn.init.zeros_(self.whiten.bias)  # init, which the default recipe's measured runs used
        self.group1 = _ConvGroup(whiten_width, widths[0], bn_momentum)
        self.group2 = _ConvGroup(widths[0], widths[1], bn_momentum)
        self.group3 = _ConvGroup(widths[1], widths[2], bn_momentum)
        self.pool = nn.MaxPool2d(3)
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
IMAGE_SIZE = 32


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
    """A CIFAR model behind the training normalisation: uint8 B x 3 x 32 x 32 -> logits B x classes.

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
    return (torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8),)


def metadata(config: dict) -> dict:
    d = config["data"]
    return {"classes": d["classes"], "mean": d["mean"], "std": d["std"], "image_size": IMAGE_SIZE,
            "arch": config["model_args"]["arch"]}


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    """The first N test images (raw uint8: the files contain the normalisation), N in `batch`."""
    batches = kinds.shape_params(shapes, "cnn", "batch")
    images, _ = load_cifar(prepared_dir, "test")
    if len(images) < max(batches):
        raise StageError(f"{prepared_dir}: {len(images)} test images, validate.shapes.cnn.batch needs {max(batches)}")
    return [kinds.Case(f"batch={n}", [{"images": np.ascontiguousarray(images[:n].numpy())}]) for n in batches]


KIND = kinds.ModelKind(
    name="cnn", task="image-classification", train_stage="train_cnn", prepared="cifar10",
    inputs=(kinds.TensorSpec("images", "uint8", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "num_classes")),),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
    trained_part=lambda module: module.model,
)


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
        self.images, self.labels = images, labels  # uint8 N x 3 x 32 x 32 and int64 N, on the device
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
                yield self._plain[idx], self.labels[idx]  # B x 3 x 32 x 32 (keeps channels_last), B
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
    """Logits (float32, N x classes) of normalised images N x 3 x 32 x 32, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([_tta_logits(model, images[i: i + batch_size], tta).float()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out
