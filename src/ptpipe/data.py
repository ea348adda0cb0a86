"""Loading what the `prepare` stage wrote: whole splits as tensors, read in one go.

Two layouts, whatever the data set's format (params.yaml `datasets.<name>.format`):

images (cifar10-python, image-folder):
    data/prepared/<name>/{train,val,test}_images.npy   uint8  N x 3 x S x S
    data/prepared/<name>/{train,val,test}_labels.npy   uint8  N          (index into classes)
    data/prepared/<name>/card.json    classes, counts per class per split, image_size, train mean/std (0..1)
text:
    data/prepared/<name>/{train,val}_ids.npy           uint8  n_chars    (index into vocab; int32 past 256)
    data/prepared/<name>/vocab.json   {"chars": [...]}    the characters, sorted, index = id
    data/prepared/<name>/stats.json   characters, vocab size, unigram bits/char
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ptpipe import files
from ptpipe.stage import StageError


def _existing(path: Path) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run `dvc repro prepare@{path.parent.name}` first")
    return path


def _load_npy(path: Path) -> np.ndarray:
    return np.load(_existing(path), allow_pickle=False)


def load_images(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 3 x S x S, labels int64 N) of one split."""
    prepared_dir = Path(prepared_dir)
    images = torch.from_numpy(_load_npy(prepared_dir / f"{split}_images.npy"))
    labels = torch.from_numpy(_load_npy(prepared_dir / f"{split}_labels.npy")).long()
    return images, labels


def load_card(prepared_dir: str | Path) -> dict:
    return json.loads(_existing(Path(prepared_dir) / "card.json").read_text(encoding="utf-8"))


def load_stats(prepared_dir: str | Path) -> dict:
    """The prepared text's stats.json (characters, vocabulary size, unigram bits/char)."""
    return json.loads(_existing(Path(prepared_dir) / "stats.json").read_text(encoding="utf-8"))


def load_text(prepared_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids int64, val ids int64, vocabulary) of the prepared text."""
    prepared_dir = Path(prepared_dir)
    train = torch.from_numpy(_load_npy(prepared_dir / "train_ids.npy")).long()
    val = torch.from_numpy(_load_npy(prepared_dir / "val_ids.npy")).long()
    vocab = json.loads(_existing(prepared_dir / "vocab.json").read_text(encoding="utf-8"))["chars"]
    return train, val, vocab


def digest(prepared_dir: str | Path) -> str:
    """md5 over the names and md5s of every file of a prepared data set: what a model records of its data,
    so that validate and evaluate can tell the data it was trained on from other data."""
    root = Path(prepared_dir)
    h = hashlib.md5()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()} {files.digest(f, 'md5')}\n".encode())
    return h.hexdigest()


def describe(prepared_dir: str | Path, name: str, fmt: str) -> dict:
    """What a model file records of the data set it trains on: {"name", "format", "md5"}."""
    prepared_dir = Path(prepared_dir)
    layout_file = "card.json" if fmt != "text" else "vocab.json"
    if not (prepared_dir / layout_file).is_file():
        raise StageError(f"{prepared_dir} holds no prepared {fmt} data ({layout_file} is missing): "
                         f"run `dvc repro prepare@{name}` first")
    return {"name": name, "format": fmt, "md5": digest(prepared_dir)}


def check_same_data(config: dict, prepared_dir: str | Path, model_path: str | Path) -> None:
    """A StageError unless `prepared_dir` holds the data the model at `model_path` was trained on."""
    recorded = config["data"]
    if "md5" in recorded and digest(prepared_dir) != recorded["md5"]:
        raise StageError(f"{model_path} was trained on data set {recorded.get('name')!r} as prepared then, not on "
                         f"{prepared_dir} as it is now: run `dvc repro train@{Path(model_path).parent.name}`")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch `epoch` (data order, augmentation): a function of (seed, epoch)
    alone, so every rank, every device and a resumed run draw the same numbers."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def text_loss_ceiling(prepared_dir: str | Path, vocab_size: int) -> tuple[float, str]:
    """(val loss in nats, its reason) above which a finished text-model run counts as diverged: twice the
    unigram baseline of stats.json, and never below chance (an untrained model guesses uniformly)."""
    unigram_bits = load_stats(prepared_dir)["unigram_bits_per_char"]
    ceiling = max(2 * unigram_bits * math.log(2), math.log(vocab_size))
    return ceiling, (f"the larger of twice the unigram baseline ({unigram_bits:.3g} bits/char) and chance "
                     f"({math.log2(vocab_size):.3g} bits/char)")
