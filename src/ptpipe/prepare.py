"""Stage `prepare`: one downloaded data set -> the compact arrays the trainers load in one read.

    python -m ptpipe.prepare cifar10 --raw data/raw/cifar10 --prepared data/prepared/cifar10

What it reads depends on the data set's format (params.yaml `datasets.<name>.format`); the layouts
it writes are two (ptpipe.data): class-labelled images, or character ids.

cifar10-python: the five training batches and the test batch of CIFAR-10's "python version"
archive, read in place (never unpacked), become uint8 N x 3 x 32 x 32 arrays; a seeded validation
split is carved from the training set, the test set is left untouched. The pickles are read with an
unpickler that only admits numpy arrays, so a tampered archive cannot run code.

image-folder: images in class folders, a folder or an archive (`ptpipe.images.read_image_folder`),
each centre-cropped and resized to `image_size` as `ptpipe predict` and `ptpipe serve` do; the
folder's own train/ and test/ split when it has one, else a seeded test split; then a seeded
validation split of the training images. Both image formats write `card.json`: class names, counts
per class per split, image size and the training split's per-channel mean/std.

text: one UTF-8 file; with `gutenberg: true` Project Gutenberg's header and footer are cut at the
`*** START OF` / `*** END OF` lines; line endings become "\\n", and the characters become ids over a
sorted vocabulary; the last `val_fraction` of the text is the validation split. `stats.json` holds
the unigram entropy (bits/char), the baseline a language model has to beat.
"""
from __future__ import annotations

import io
import math
import pickle
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from ptpipe import files, images, params as params_mod, stage
from ptpipe.stage import StageError

CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_CLASSES = 10


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


def _cifar_members(archive: Path, key: str) -> dict[str, bytes]:
    """{file name: bytes} of the regular files cifar-10-batches-py/<name> in the archive, read in place.

    Nothing is unpacked, yet a member that is absolute, climbs out with `..`, is a link or a device, or
    is named twice is refused (as the archive's own tools would be asked to write it elsewhere): the
    official archive has none, so such an archive is not the one named in params."""
    try:
        with tarfile.open(archive) as tar:
            found: dict[str, bytes] = {}
            for m in tar.getmembers():
                path = PurePosixPath(m.name)
                if path.is_absolute() or ".." in path.parts:
                    problem = "has an absolute path" if path.is_absolute() else "climbs out with '..'"
                elif not (m.isfile() or m.isdir()):
                    problem = "is a link" if (m.issym() or m.islnk()) else "is a device or special file"
                else:
                    problem = None
                if problem:
                    raise StageError(f"{archive}: member {m.name!r} {problem}: refusing the archive (CIFAR-10's "
                                     f"has only plain files); check {key}.url")
                parts = tuple(p for p in path.parts if p != ".")
                if m.isfile() and len(parts) == 2 and parts[0] == "cifar-10-batches-py":
                    if parts[1] in found:
                        raise StageError(f"{archive}: member {m.name!r} appears twice: refusing the archive; "
                                         f"check {key}.url")
                    found[parts[1]] = tar.extractfile(m).read()
            return found
    except tarfile.TarError as exc:  # (tarfile's message can span lines: the first says enough)
        reason = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
        raise StageError(f"{archive} is not a readable tar archive ({reason}): {key}.format cifar10-python takes "
                         f"CIFAR-10's cifar-10-python.tar.gz; for a folder of images use format image-folder") from None


def _read_batch(members: dict[str, bytes], name: str, archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (images uint8 N x 3 x 32 x 32, labels uint8 N), validated."""
    path = f"{archive}: cifar-10-batches-py/{name}"
    if name not in members:
        raise StageError(f"{path} is missing: the archive is not CIFAR-10's python version (for your own images "
                         f"in class folders, use format: image-folder, docs/own-data.md)")
    try:
        batch = _ArrayUnpickler(io.BytesIO(members[name]), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise StageError(f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected N x 3072 uint8")
    if labels.shape != (data.shape[0],):
        raise StageError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR_CLASSES):
        raise StageError(f"{path}: labels outside 0..9 (found {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _class_names(members: dict[str, bytes], archive: Path) -> list[str]:
    path = f"{archive}: cifar-10-batches-py/batches.meta"
    if "batches.meta" not in members:
        raise StageError(f"{path} is missing: the archive is not CIFAR-10's python version")
    try:
        meta = _ArrayUnpickler(io.BytesIO(members["batches.meta"]), encoding="bytes").load()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{path}: not CIFAR-10's batches.meta ({exc})") from None
    if len(names) != CIFAR_CLASSES:
        raise StageError(f"{path}: {len(names)} class names, CIFAR-10 has 10 (for your own classes use "
                         f"format: image-folder, docs/own-data.md)")
    return names


def prepare_cifar(archive: Path, out_dir: Path, val_size: int, seed: int, key: str) -> dict:
    members = _cifar_members(archive, key)
    train = [_read_batch(members, name, archive) for name in CIFAR_TRAIN_BATCHES]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    test_x, test_y = _read_batch(members, "test_batch", archive)
    classes = _class_names(members, archive)
    del members
    if val_size >= len(train_x):
        raise StageError(f"{key}.val_size={val_size} leaves no training images ({len(train_x)} in all)")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    splits = {"train": (train_x[train_idx], train_y[train_idx]), "val": (train_x[val_idx], train_y[val_idx]),
              "test": (test_x, test_y)}
    return write_images(out_dir, splits, classes, {"val_size": val_size, "seed": seed})


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale, 6 decimals) of uint8 N x 3 x S x S, in chunks of images: a float
    copy of the whole split would be 4-8x the arrays' size (the prepare stage's peak memory)."""
    n = np.zeros(3)
    total, squares = np.zeros(3), np.zeros(3)
    for i in range(0, len(images), chunk):
        x = images[i: i + chunk].astype(np.float64) / 255.0  # chunk x 3 x S x S
        total += x.sum(axis=(0, 2, 3))
        squares += (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def write_images(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 extra: dict) -> dict:
    """The images layout (ptpipe.data) in one atomic rename: arrays per split and card.json."""
    mean, std = channel_stats(splits["train"][0])
    card = {
        "classes": classes,
        "counts": {split: np.bincount(y, minlength=len(classes)).tolist() for split, (_, y) in splits.items()},
        "image_size": int(splits["train"][0].shape[-1]),
        "mean": mean,
        "std": std,
        **extra,
    }
    with files.atomic_path(out_dir) as staging:
        staging.mkdir()
        for split, (x, y) in splits.items():
            np.save(staging / f"{split}_images.npy", np.ascontiguousarray(x))
            np.save(staging / f"{split}_labels.npy", y.astype(images.label_dtype(len(classes)), copy=False))
        files.write_json(staging / "card.json", card)
    return card


def clean_text(raw: bytes, source: Path, gutenberg: bool, key: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StageError(f"{source} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}): "
                         f"{key} (format text) takes UTF-8; convert it, e.g. iconv -f latin1 -t utf-8") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if gutenberg:
        start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
        end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
        lines = lines[(start + 1 if start is not None else 0):(end if end is not None else len(lines))]
    text = "\n".join(lines).strip("\n") + "\n"
    if not text.strip():
        cut = " after cutting the Project Gutenberg header and footer" if gutenberg else ""
        raise StageError(f"{source} holds no text{cut}")
    return text


def _entropy_bits(counts: Counter, total: int) -> float:
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def prepare_text(source: Path, out_dir: Path, gutenberg: bool, val_fraction: float, key: str) -> dict:
    text = clean_text(source.read_bytes(), source, gutenberg, key)
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


def prepare_image_folder(source: Path, out_dir: Path, d: params_mod.ImageFolderDataset, key: str) -> dict:
    from tqdm import tqdm


    with tqdm(desc=f"decoding {source.name}", unit="img", dynamic_ncols=True, mininterval=0.5) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            found = images.read_image_folder(source, d.image_size, val_fraction=d.val_fraction,
                                             test_fraction=d.test_fraction, seed=d.seed, progress=progress)
        except StageError as err:
            raise StageError(f"{key}: {err}") from None
    splits = {split: (found.images[split], found.labels[split]) for split in ("train", "val", "test")}
    for reason, count in found.skipped.items():
        print(f"skipped {count} file(s): {reason} (e.g. {', '.join(found.examples.get(reason, []))})")
    return write_images(out_dir, splits, found.classes, {
        "split": "own: " + "/".join(found.own_split) if found.own_split else f"seeded ({d.seed})",
        "skipped": found.skipped, "skipped_examples": found.examples})


def _raw_file(raw_dir: Path, name: str) -> Path:
    """The one file the download stage left in raw_dir."""
    found = sorted(p for p in raw_dir.iterdir() if p.is_file()) if raw_dir.is_dir() else []
    if len(found) != 1:
        raise StageError(f"{raw_dir} should hold the one file `dvc repro download@{name}` writes "
                         f"(found {len(found)}): run it first")
    return found[0]


def prepare(name: str, raw_dir: str | Path, prepared_dir: str | Path,
            params_file: str | Path = params_mod.PARAMS_FILE) -> dict:
    """datasets.<name> of `params_file`: raw_dir (what download@<name> wrote) -> prepared_dir."""
    p = params_mod.load(params_file)
    if name not in p.datasets:
        raise StageError(f"no data set {name!r} in {params_file}'s datasets (there are {', '.join(p.datasets)})")
    d, key, out = p.datasets[name], f"datasets.{name}", Path(prepared_dir)
    source = _raw_file(Path(raw_dir), name)
    if d.format == "cifar10-python":
        result = prepare_cifar(source, out, d.val_size, d.seed, key)
    elif d.format == "image-folder":
        result = prepare_image_folder(source, out, d, key)
    else:
        result = prepare_text(source, out, d.gutenberg, d.val_fraction, key)
    print(f"prepare {name} ({d.format}) -> {out}")
    return result


def main() -> None:
    ap = stage.parser(__doc__, "raw", "prepared")
    ap.add_argument("name", help="the data set: a key of params.yaml's datasets")
    args = ap.parse_args()
    stage.run(prepare, args.name, args.raw, args.prepared, args.params)


if __name__ == "__main__":
    main()
