"""Stage `prepare`: raw downloads -> the compact arrays the trainers load in one read.

    python -m ptpipe.prepare cifar10   # data/raw/cifar10 -> data/prepared/cifar10 (layout: ptpipe.data)
    python -m ptpipe.prepare alice     # data/raw/alice   -> data/prepared/alice

CIFAR-10: the five training batches and the test batch of the official "python version"
become uint8 N x 3 x 32 x 32 arrays; a seeded validation split is carved from the training
set, the test set is left untouched, and `card.json` records counts per class per split and
the training split's per-channel mean/std. The pickles are read with an unpickler that only
admits numpy arrays, so a tampered archive cannot run code.

Text: the Project Gutenberg header and footer are cut at the `*** START OF` / `*** END OF`
lines when present, line endings become "\\n", and the characters become ids over a sorted
vocabulary; the last `val_fraction` of the text is the validation split. `stats.json` holds the
unigram entropy (bits/char), the baseline the language model has to beat.
"""
from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np

from ptpipe import files, params, stage
from ptpipe.stage import StageError, run

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
NUM_CLASSES = 10


class _ArrayUnpickler(pickle.Unpickler):
    """Admits exactly what CIFAR-10 pickles contain: dicts, lists, strings, numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2: harmless
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (images uint8 N x 3 x 32 x 32, labels uint8 N), validated."""
    if not path.is_file():
        raise StageError(f"{path} is missing: the archive is not the CIFAR-10 python version")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise StageError(f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected N x 3072 uint8")
    if labels.shape != (data.shape[0],):
        raise StageError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise StageError(f"{path}: labels outside 0..9 (found {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _class_names(batches_dir: Path) -> list[str]:
    path = batches_dir / "batches.meta"
    if not path.is_file():
        raise StageError(f"{path} is missing: the archive is not the CIFAR-10 python version")
    try:
        with open(path, "rb") as f:
            meta = _ArrayUnpickler(f, encoding="bytes").load()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{path}: not CIFAR-10's batches.meta ({exc})") from None
    if len(names) != NUM_CLASSES:
        raise StageError(f"{batches_dir / 'batches.meta'}: {len(names)} class names, expected 10")
    return names


def prepare_cifar(raw_dir: Path, out_dir: Path, val_size: int, seed: int) -> dict:
    batches_dir = raw_dir / "cifar-10-batches-py"
    train = [_read_batch(batches_dir / name) for name in CIFAR_TRAIN_BATCHES]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    test_x, test_y = _read_batch(batches_dir / "test_batch")
    classes = _class_names(batches_dir)
    if val_size >= len(train_x):
        raise StageError(f"prepare.cifar10.val_size={val_size} leaves no training images ({len(train_x)} in all)")

    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x, test_y),
    }
    # One channel at a time in float32: a float64 copy of the whole split would double peak memory.
    channels = [splits["train"][0][:, c].astype(np.float32) / 255.0 for c in range(3)]
    card = {
        "classes": classes,
        "counts": {split: np.bincount(y, minlength=NUM_CLASSES).tolist() for split, (_, y) in splits.items()},
        "mean": [round(float(ch.mean(dtype=np.float64)), 6) for ch in channels],
        "std": [round(float(ch.std(dtype=np.float64)), 6) for ch in channels],
        "val_size": val_size,
        "seed": seed,
    }
    with files.atomic_path(out_dir) as staging:
        staging.mkdir()
        for split, (x, y) in splits.items():
            np.save(staging / f"{split}_images.npy", np.ascontiguousarray(x))
            np.save(staging / f"{split}_labels.npy", y)
        files.write_json(staging / "card.json", card)
    return card


def clean_text(raw: bytes, source: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StageError(f"{source} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is not None or end is not None:
        lines = lines[(start + 1 if start is not None else 0):(end if end is not None else len(lines))]
    text = "\n".join(lines).strip("\n") + "\n"
    if not text.strip():
        raise StageError(f"{source} holds no text (after removing the Gutenberg header and footer)")
    return text


def _entropy_bits(counts: Counter, total: int) -> float:
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def prepare_text(raw_dir: Path, out_dir: Path, val_fraction: float) -> dict:
    sources = sorted(p for p in raw_dir.iterdir() if p.is_file()) if raw_dir.is_dir() else []
    if len(sources) != 1:
        raise StageError(f"{raw_dir} should hold exactly one text file (found {len(sources)}): run `dvc repro download@alice`")
    text = clean_text(sources[0].read_bytes(), sources[0])
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.array([index[ch] for ch in text], dtype=np.uint8 if len(vocab) <= 256 else np.int32)
    n_val = max(1, int(len(ids) * val_fraction))
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]

    train_counts = Counter(train_ids.tolist())
    # Add-one smoothing so a character unseen in training does not make the baseline infinite.
    total = len(train_ids) + len(vocab)
    val_counts = Counter(val_ids.tolist())
    val_cross_entropy = -sum(c * math.log2((train_counts[i] + 1) / total) for i, c in val_counts.items()) / len(val_ids)
    stats = {
        "characters": len(text),
        "train_characters": int(len(train_ids)),
        "val_characters": int(len(val_ids)),
        "vocab_size": len(vocab),
        "unigram_bits_per_char": round(_entropy_bits(train_counts, len(train_ids)), 4),
        "unigram_val_bits_per_char": round(val_cross_entropy, 4),
    }
    with files.atomic_path(out_dir) as staging:
        staging.mkdir()
        np.save(staging / "train_ids.npy", train_ids)
        np.save(staging / "val_ids.npy", val_ids)
        files.write_json(staging / "vocab.json", {"chars": vocab})
        files.write_json(staging / "stats.json", stats)
    return stats


def main(name: str, raw_dir: Path = RAW_DIR, prepared_dir: Path = PREPARED_DIR,
         params_file: str | Path = params.PARAMS_FILE) -> dict:
    p = params.load(params_file).prepare
    raw, out = Path(raw_dir) / name, Path(prepared_dir) / name
    if name == "cifar10":
        result = prepare_cifar(raw, out, p.cifar10.val_size, p.cifar10.seed)
    else:
        result = prepare_text(raw, out, p.alice.val_fraction)
    print(f"prepare {name} -> {out}")
    return result


def cli() -> None:
    parser = stage.parser(__doc__, raw=str(RAW_DIR), prepared=str(PREPARED_DIR))  # RAW/<name> -> PREPARED/<name>
    parser.add_argument("name", choices=["cifar10", "alice"], help="which data set (a key of params.yaml's prepare)")
    args = parser.parse_args()
    run(main, args.name, args.raw, args.prepared, args.params)


if __name__ == "__main__":
    cli()
