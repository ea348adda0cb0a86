"""Loading what the `prepare` stage wrote: whole splits as tensors, read in one go.

Layout (written by `ptpipe.prepare`):

    data/prepared/cifar10/{train,val,test}_images.npy   uint8  N x 3 x 32 x 32
    data/prepared/cifar10/{train,val,test}_labels.npy   uint8  N          (0..9)
    data/prepared/cifar10/card.json    classes, counts per class per split, train mean/std (0..1 scale)
    data/prepared/alice/{train,val}_ids.npy             uint8  n_chars    (index into vocab)
    data/prepared/alice/vocab.json     {"chars": [...]}    the characters, sorted, index = id
    data/prepared/alice/stats.json     characters, vocab size, unigram bits/char
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ptpipe.stage import StageError


def _existing(path: Path) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run `dvc repro prepare` first")
    return path


def _load_npy(path: Path) -> np.ndarray:
    return np.load(_existing(path), allow_pickle=False)


def load_cifar(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 3 x 32 x 32, labels int64 N) of one split."""
    prepared_dir = Path(prepared_dir)
    images = torch.from_numpy(_load_npy(prepared_dir / f"{split}_images.npy"))
    labels = torch.from_numpy(_load_npy(prepared_dir / f"{split}_labels.npy")).long()
    return images, labels


def load_card(prepared_dir: str | Path) -> dict:
    return json.loads(_existing(Path(prepared_dir) / "card.json").read_text())


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
