"""Images from files: one image -> uint8 3 x S x S RGB (`load_image`, shared by prepare, `ptpipe predict`
and `ptpipe serve`), and a folder of class folders -> uint8 arrays per split (`read_image_folder`).

    my-pets/cat/1.jpg, my-pets/dog/2.png, ...                  classes = sorted folder names
    my-pets/{train,test}/{cat,dog}/...  (optionally val/)      the folder's own split, kept

The folder may be a folder on disk or an archive (.tar, .tar.gz, .tgz, .zip) read in place, member by
member, never extracted. One common top-level folder is stripped (`my-pets/cat/1.png` -> class `cat`);
anything below a class folder belongs to it (torchvision ImageFolder's rule). Hidden and system files
(`.DS_Store`, `._*`, `__MACOSX/`, `Thumbs.db`) and files outside class folders (a README at the root)
are skipped and counted; files that are not images, empty or unreadable are skipped and counted up to
a limit (`too_many_bad`), above which the whole read is refused.

    data = read_image_folder("data/raw/my-pets", 32, val_fraction=0.1, test_fraction=0.1, seed=0)
    data.classes                  ["cat", "dog", "fox"]
    data.images["train"]          uint8 N x 3 x 32 x 32 (also "val", "test"); data.labels["train"] uint8 N
    data.own_split, data.skipped  ("train", "test") or (); {"hidden or system file": 2, ...}

numpy + Pillow only (no torch): `ptpipe.inference` and the server import this module.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import stat
import struct
import tarfile
import zipfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ptpipe.stage import StageError

DEFAULT_SIZE = 32  # CIFAR-10's size: what `ptpipe predict`/serve feed the default CNN
# A decoded image of more pixels is refused before its pixels are decoded (its header gives the size).
# 50 MP is a 150 MB RGB buffer per worker; phone photos (12-48 MP) pass, and a big JPEG is decoded at
# 1/2..1/8 scale (draft, below) so even 100+ MP photos pass. Pillow's own guard only warns at 89 MP
# and refuses at 179 MP: a 100 MP PNG "bomb" of 100 KB would otherwise cost 300 MB+ per decode.
MAX_PIXELS = 50_000_000
# Transparent pixels are composited over white: what viewers and browsers show, and what a user sees
# when they look at their data; the colour stored under alpha 0 is arbitrary (often black or noise).
BACKGROUND = (255, 255, 255, 255)
# A JPEG at least 2 x JPEG_DRAFT_GAP x S on its short side is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
# DCT scaling) keeping >= JPEG_DRAFT_GAP x S pixels, then resized as any image. Measured (mean |difference|
# to the full decode, levels of 255, S = 32 / 64): a 512 x 600 photo 0.31 / 0.26, a 720 x 477 drawing
# 1.38 / 0, a 500 x 375 texture 3.54 / 0 -- each below what swapping bicubic for Lanczos changes (2.27 /
# 1.57, 1.95 / 2.21, 4.64 / 2.78). Pillow's thumbnail() gap of 2 changed them by 6.81, 3.72, 7.27 at S = 32:
# more than a filter swap, so not taken. benchmarks/prepare_images.py measures it on the whole JPEG set.
JPEG_DRAFT_GAP = 4
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SPLITS = ("train", "val", "test")
SYSTEM_FILES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

# Why a file was skipped (ImageSet.skipped's keys). The first three are "bad": see too_many_bad.
NOT_IMAGE, EMPTY, UNREADABLE = "not an image", "empty file", "unreadable"
OUTSIDE, HIDDEN, FOLDER_LINK = "outside class folders", "hidden or system file", "folder link (not followed)"
BAD_REASONS = (NOT_IMAGE, EMPTY, UNREADABLE)
# Bad files are refused when MORE THAN 1% of the files in class folders AND MORE THAN 10 files are bad.
# Scraped or hand-collected sets have a few broken files (a truncated download, a .txt note): skipping
# them silently-but-counted is what a user wants. 1% is where it stops being noise: a tenth of a class
# gone, a folder of HEIC/RAW files Pillow cannot read, or the wrong folder altogether -- training on
# what is left would skew the classes without anyone noticing. The "10 files" floor keeps a tiny set
# (one broken file in 50) usable.
MAX_BAD_FRACTION, MAX_BAD_FILES = 0.01, 10
CHUNK = 256  # images per task sent to a worker process: amortises the round trip (~0.1 ms)
CHUNK_BYTES = 4 << 20  # or fewer, read from an archive: <= 2 x workers + 1 chunks of bytes are held at once


class UnreadableImage(StageError):
    """A file Pillow cannot decode (not an image, truncated, unsupported): skipped by the folder reader."""


class ImageTooLarge(StageError):
    """An image over the pixel limit: refused, by the folder reader too (a bomb is never an accident)."""


# -- one image ----------------------------------------------------------------------------------

def load_image(source: str | Path | BinaryIO, size: int = DEFAULT_SIZE, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any PNG/JPEG/... (any size, mode, EXIF orientation) -> uint8 3 x size x size RGB, like CIFAR-10.

    CIFAR-10 images are square crops with the object centred: the largest centred square is cut out (no
    distortion of the aspect ratio), then resized with Pillow's antialiased bicubic filter. Raises
    UnreadableImage / ImageTooLarge (both StageError) naming the file."""
    return decode(source, size, max_pixels).transpose(2, 0, 1).copy()  # HWC -> CHW


def decode(source: str | Path | BinaryIO, size: int, max_pixels: int = MAX_PIXELS, name: str | None = None
           ) -> np.ndarray:
    """load_image's transform, H x W x 3 (a view the caller copies into place); `name` for messages."""
    name = name or str(source)
    try:
        with Image.open(source) as img:
            _draft_if_large(img, size)
            w, h = img.size  # from the header (after draft: the size that will be decoded)
            if w * h > max_pixels:
                raise ImageTooLarge(f"{name}: image too large: {w} x {h} = {w * h:,} pixels, above the limit of "
                                    f"{max_pixels:,} (a decompression bomb, or a scan far larger than needed): "
                                    f"shrink or remove it")
            ImageOps.exif_transpose(img, in_place=True)  # in place: an upright image is not copied
            img = _to_rgb(img)
    except Image.DecompressionBombError as exc:  # not an OSError: Pillow's guard against huge images
        raise ImageTooLarge(f"{name}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        # (the last three: what Pillow's decoders let through on some corrupt files, seen by fuzzers)
        raise UnreadableImage(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if img.size != (size, size):  # an image of the target size is its own crop (CIFAR, `ptpipe serve`'s usual case)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _draft_if_large(img: Image.Image, size: int) -> None:
    """Let libjpeg decode a large JPEG at 1/2..1/8 scale, keeping >= JPEG_DRAFT_GAP x size pixels on the
    short side: 3-10x less decoding, and the bicubic resize that follows sees enough pixels."""
    keep = JPEG_DRAFT_GAP * size
    if img.format == "JPEG" and min(img.size) >= 2 * keep:
        img.draft(img.mode, (keep, keep))


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as CIFAR-10's: 16-bit grey scaled down (Pillow's convert would clip it to white),
    transparency composited onto BACKGROUND, palette/CMYK/1-bit/LA through Pillow's converters."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG grey
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND)
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# -- listing a folder or an archive ---------------------------------------------------------------

@dataclass
class Listing:
    """What a source holds: {member name: byte size} of regular files, folder names, and skips so far."""

    kind: str  # "folder", "tar" or "zip"
    path: Path
    files: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    skipped: Counter = field(default_factory=Counter)
    offsets: dict[str, int] | None = None  # uncompressed tar: where each file's bytes start (read in place)


def list_source(source: Path) -> Listing:
    """The files of a folder or an archive, refusing archive members that are links, devices, absolute
    or climb out with `..` (what download.check_members refuses before unpacking). A folder holding
    nothing but one archive is read as that archive (what the download stage leaves)."""
    if source.is_dir():
        entries = [p for p in source.iterdir() if not _hidden(p.name)]
        if len(entries) == 1 and entries[0].is_file() and entries[0].name.endswith(ARCHIVE_SUFFIXES):
            source = entries[0]
        else:
            return _list_folder(source)
    if not source.exists():
        raise StageError(f"{source} does not exist: point the data set at a folder of class folders or an archive")
    if source.name.endswith(".zip"):
        return _list_zip(source)
    if source.name.endswith(ARCHIVE_SUFFIXES):
        return _list_tar(source)
    raise StageError(f"{source} is a file, not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _list_folder(root: Path) -> Listing:
    # File links are followed (DVC's symlink/hardlink cache types make every file one); folder links
    # are not (a link to an ancestor would loop), and are counted.
    listing = Listing("folder", root)
    for folder, dirnames, filenames in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for d in dirnames:
            (listing.skipped.update([FOLDER_LINK]) if os.path.islink(os.path.join(folder, d))
             else listing.dirs.add(prefix + d))
        for f in filenames:
            try:
                listing.files[prefix + f] = os.stat(os.path.join(folder, f)).st_size
            except OSError:  # a dangling link: a file that cannot be read
                listing.files[prefix + f] = -1
    return listing


def _safe_name(name: str, source: Path) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise StageError(f"refusing to read {source}: member {name!r} points outside the archive's folder")
    return path.as_posix()


def _list_tar(path: Path) -> Listing:
    with open(path, "rb") as f:
        compressed = f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))  # gzip, bzip2, xz
    # compressed: a stream, read once front to back; plain: seekable, so the listing skips over the data and
    # workers later read each member's bytes themselves (tarfile's ~100 us per member is then paid once)
    listing = Listing("tar", path, offsets=None if compressed else {})
    try:
        with tarfile.open(path, "r|*" if compressed else "r:") as archive:
            while (member := archive.next()) is not None:
                name = _safe_name(member.name, path)
                if member.issym() or member.islnk():
                    raise StageError(f"refusing to read {path}: member {member.name!r} is a link")
                if member.isdir():
                    listing.dirs.add(name)
                elif member.isfile():
                    listing.files[name] = member.size
                    if member.issparse():  # its bytes in the archive are not the file's: read it through tarfile
                        listing.offsets = None
                    if listing.offsets is not None:
                        listing.offsets[name] = member.offset_data
                else:
                    raise StageError(f"refusing to read {path}: member {member.name!r} is a device or special file")
                archive.members.clear()  # tarfile keeps every TarInfo read: 60k of them are ~30 MB
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StageError(f"{path} is not a readable tar archive ({exc.__class__.__name__}: {exc})") from None
    return listing


def _list_zip(path: Path) -> Listing:
    listing = Listing("zip", path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = _safe_name(info.filename, path)
                mode = info.external_attr >> 16  # Unix mode bits, when a Unix tool wrote the zip
                if stat.S_ISLNK(mode):
                    raise StageError(f"refusing to read {path}: member {info.filename!r} is a link")
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise StageError(f"refusing to read {path}: member {info.filename!r} is a device or special file")
                if info.is_dir():
                    listing.dirs.add(name)
                else:
                    listing.files[name] = info.file_size
    except (zipfile.BadZipFile, OSError) as exc:
        raise StageError(f"{path} is not a readable zip archive ({exc})") from None
    return listing


def _hidden(part: str) -> bool:
    return part.startswith(".") or part in SYSTEM_FILES


# -- classes and splits from the folder names ------------------------------------------------------

@dataclass
class Layout:
    """The candidate images of a listing (member names, in (split folder, class, path) order)."""

    classes: list[str]
    own_split: tuple[str, ...]  # ("train", "test") or ("train", "val", "test") when found, else ()
    names: list[str]  # member names in the source
    paths: list[str]  # the same below the stripped top folder: class/..., or split/class/...
    labels: np.ndarray  # class index per name
    folders: list[str]  # the split folder per name ("" without an own split)
    skipped: Counter
    examples: dict[str, list[str]]  # reason -> up to 3 member names
    in_class_folders: int  # files in class folders, images or not: the denominator of the bad-file limit
    odd_suffixes: Counter  # suffix -> count of the files skipped as not an image


def find_layout(listing: Listing) -> Layout:
    """Classes (sorted folder names), the folder's own train/test(/val) split if any, and the candidate
    images; raises StageError for no images, < 2 classes, mismatched split folders, an empty class."""
    skipped, examples = Counter(listing.skipped), {}
    visible = {n: s for n, s in listing.files.items() if not _skip_if(any(map(_hidden, n.split("/"))),
                                                                     HIDDEN, n, skipped, examples)}
    strip = _common_top(visible)
    dirs = {d[len(strip):] for d in listing.dirs if d.startswith(strip) and not any(map(_hidden, d.split("/")))}
    rel = {name: name[len(strip):] for name in visible}
    tops = {r.split("/")[0] for r in rel.values() if "/" in r} | {d.split("/")[0] for d in dirs if d}
    own_split = _own_split(tops, listing.path)
    depth = 2 if own_split else 1  # folders above a class's files: (split, class) or (class,)
    class_sets = {folder: set() for folder in (own_split or ("",))}
    for parts in (d.split("/") for d in dirs if d.count("/") == depth - 1):  # class folders, maybe empty
        class_sets[parts[0] if own_split else ""].add(parts[-1])
    found, in_class, odd_suffixes = [], 0, Counter()
    for name, r in rel.items():
        parts = r.split("/")
        if _skip_if(len(parts) <= depth, OUTSIDE, name, skipped, examples):
            continue
        folder, cls = (parts[0], parts[1]) if own_split else ("", parts[0])
        class_sets[folder].add(cls)
        in_class += 1
        size = visible[name]
        suffix = PurePosixPath(r).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            odd_suffixes[suffix or "no suffix"] += 1
        if not (_skip_if(suffix not in IMAGE_SUFFIXES, NOT_IMAGE, name, skipped, examples)
                or _skip_if(size == 0, EMPTY, name, skipped, examples)
                or _skip_if(size < 0, UNREADABLE, name, skipped, examples)):  # a dangling link
            found.append((SPLITS.index(folder) if folder else 0, cls, r, name))
    classes = _check_classes(listing.path, class_sets, found, skipped)
    found.sort()
    index = {c: i for i, c in enumerate(classes)}
    layout = Layout(classes, own_split, [f[3] for f in found], [f[2] for f in found],
                    np.array([index[f[1]] for f in found], dtype=label_dtype(len(classes))),
                    [SPLITS[f[0]] if own_split else "" for f in found], skipped, examples, in_class, odd_suffixes)
    too_many_bad(layout, listing.path)
    return layout


def _skip_if(condition: bool, reason: str, name: str, skipped: Counter, examples: dict) -> bool:
    if condition:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append(name)
    return condition


def _common_top(names: Iterable[str]) -> str:
    """'my-pets/' when every file lies in that one folder and some lie two folders below it (so it holds
    class folders, not images), else ''."""
    names = list(names)
    tops = {n.split("/")[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names) and any(n.count("/") >= 2 for n in names):
        return tops.pop() + "/"
    return ""


def _own_split(tops: set[str], source: Path) -> tuple[str, ...]:
    if not tops & set(SPLITS):
        return ()
    if tops - set(SPLITS) or not {"train", "test"} <= tops:
        raise StageError(f"{source}: top-level folders {', '.join(sorted(tops))} mix split names with others: use "
                         f"train/ and test/ (optionally val/) each holding the same class folders, or class folders only")
    return tuple(s for s in SPLITS if s in tops)


def label_dtype(num_classes: int) -> type:
    """uint8 like CIFAR-10's labels, wider only past 256 classes."""
    return np.uint8 if num_classes <= 256 else np.int32


def _check_classes(source: Path, class_sets: dict[str, set[str]], found: list[tuple], skipped: Counter) -> list[str]:
    """The sorted class names, after the checks that need no decoding."""
    if not found:
        what = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "no files at all"
        raise StageError(f"{source} holds no images ({what}): expected class folders of images, e.g. cat/1.jpg, "
                         f"dog/2.png ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted(set().union(*class_sets.values()))
    lacking = [f"{folder}/ lacks {', '.join(sorted(set(classes) - have))}" for folder, have in class_sets.items()
               if set(classes) - have]
    if lacking:
        raise StageError(f"{source}: the split folders hold different classes ({'; '.join(lacking)}): "
                         f"give train/ and test/ the same class folders, or remove the class from all of them")
    if len(classes) < 2:
        raise StageError(f"{source}: found {len(classes)} class folder{'s' * (len(classes) != 1)} "
                         f"({', '.join(classes) or 'none'}): at least 2 are needed, one per class (e.g. cat/, dog/)")
    have = Counter((SPLITS[f[0]] if len(class_sets) > 1 else "", f[1]) for f in found)  # own split: >= 2 folders
    empty = [f"{folder}/{c}".lstrip("/") for folder, cs in class_sets.items() for c in sorted(cs)
             if not have[(folder, c)]]
    if empty:
        raise StageError(f"{source}: class folder {', '.join(empty)} holds no images: add images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder")
    return classes


def too_many_bad(layout: Layout, source: Path) -> None:
    """Refuse when the files skipped as not an image / empty / unreadable pass MAX_BAD_FRACTION of the
    files in class folders AND MAX_BAD_FILES (the reason is beside those constants)."""
    bad = sum(layout.skipped[r] for r in BAD_REASONS)
    if bad <= MAX_BAD_FILES or bad <= MAX_BAD_FRACTION * layout.in_class_folders:
        return
    parts = []
    for reason in BAD_REASONS:
        if layout.skipped[reason]:
            detail = (", ".join(f"{s} x{n}" for s, n in layout.odd_suffixes.most_common(3)) if reason == NOT_IMAGE
                      else "e.g. " + ", ".join(layout.examples[reason][:2]))
            parts.append(f"{layout.skipped[reason]} {reason} ({detail})")
    raise StageError(f"{source}: {bad} of {layout.in_class_folders} files in class folders are not usable images "
                     f"({'; '.join(parts)}): more than {MAX_BAD_FRACTION:.0%} and more than {MAX_BAD_FILES} files "
                     f"means the wrong folder or a format Pillow cannot read: convert or remove them")


# -- splits ---------------------------------------------------------------------------------------

def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  classes: list[str] | None = None) -> dict[str, np.ndarray]:
    """{"train", "val", "test"} -> sorted indices into `labels`: seeded and stratified (in each class,
    round(fraction x count) images, at least 1 when the fraction is > 0, go to val and to test)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [np.empty(0, np.int64)] for s in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = _share(len(members), test_fraction), _share(len(members), val_fraction)
        if n_test + n_val >= len(members):
            name = classes[label] if classes else str(label)
            raise StageError(f"class {name!r} has {len(members)} image{'s' * (len(members) != 1)}: too few for "
                             f"a val and test share and a training image; add images or lower the val/test fractions")
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def _share(count: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, round(fraction * count))


def _assign_splits(layout: Layout, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """{split: sorted indices into layout.names}. Own split folders are kept (test_fraction unused);
    without a val/ folder, val is carved from train/ (seeded, stratified)."""
    if not layout.own_split:
        return split_indices(layout.labels, val_fraction, test_fraction, seed, layout.classes)
    folders = np.array(layout.folders)
    found = {s: np.flatnonzero(folders == s) for s in SPLITS}
    if "val" not in layout.own_split:
        carved = split_indices(layout.labels[found["train"]], val_fraction, 0.0, seed, layout.classes)
        found["val"], found["train"] = found["train"][carved["val"]], found["train"][carved["train"]]
    return found


# -- decoding, in place -----------------------------------------------------------------------------

@dataclass
class ImageSet:
    """A folder of class folders, decoded: for each of "train", "val", "test", `images[split]` uint8
    N x 3 x S x S, `labels[split]` (uint8 N; int32 past 256 classes) and `files[split]` (paths below the
    stripped top folder, e.g. "cat/1.jpg" or "train/cat/1.jpg": the same for a folder and its archive)."""

    classes: list[str]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    files: dict[str, list[str]]
    own_split: tuple[str, ...]  # the split folders found, () when the split was drawn by seed
    skipped: dict[str, int]  # reason -> files skipped (NOT_IMAGE, EMPTY, UNREADABLE, OUTSIDE, HIDDEN, FOLDER_LINK)
    examples: dict[str, list[str]]  # reason -> up to 3 of those files

    def counts(self) -> dict[str, list[int]]:
        """{split: images per class}, for the data card."""
        return {s: np.bincount(y, minlength=len(self.classes)).tolist() for s, y in self.labels.items()}


def read_image_folder(source: str | Path, image_size: int, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                      seed: int = 0, workers: int = 0, max_pixels: int = MAX_PIXELS,
                      progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Read a folder of class folders (or a .tar/.tar.gz/.tgz/.zip of one) into train/val/test arrays.

    Every image goes through `load_image`'s transform (what `ptpipe predict` and serve do) straight into
    one preallocated buffer (peak memory: the arrays + ~45 MB per process). `workers` processes decode
    (0: see worker_count). `progress(done, total)` is called after each chunk. Raises StageError (one line,
    naming the source) for everything the user must fix; see find_layout, too_many_bad, ImageTooLarge."""
    source = Path(source)
    listing = list_source(source)
    layout = find_layout(listing)
    order = _assign_splits(layout, val_fraction, test_fraction, seed)
    flat = np.concatenate([order[s] for s in SPLITS])  # buffer row -> candidate, split after split
    images = np.empty((len(flat), 3, image_size, image_size), np.uint8)
    failed = _decode_into(images, listing, [layout.names[i] for i in flat], image_size,
                          worker_count(workers, len(flat)), max_pixels, progress)
    for name in failed.values():
        _skip_if(True, UNREADABLE, name, layout.skipped, layout.examples)
    too_many_bad(layout, source)
    keep = np.ones(len(flat), bool)
    keep[list(failed)] = False
    n = _compact(images, keep)
    ends = np.cumsum([len(order[s]) for s in SPLITS])
    kept = [int(keep[end - len(order[s]):end].sum()) for s, end in zip(SPLITS, ends)]
    bounds = np.cumsum([0] + kept)  # split i is rows bounds[i]:bounds[i + 1] of the compacted buffer

    def by_split(x):
        return {s: x[a:b] for s, a, b in zip(SPLITS, bounds, bounds[1:])}

    result = ImageSet(layout.classes, by_split(images[:n]), by_split(layout.labels[flat][keep]),
                      by_split([layout.paths[i] for i in flat[keep]]), layout.own_split,
                      dict(layout.skipped), layout.examples)
    _check_decoded(result, source)
    return result


def worker_count(requested: int, images: int) -> int:
    """`requested`, or for 0: one process per CPU this process may use, at most 4, when there are at
    least 4 chunks of images (a worker takes ~0.3 s to start and ~45 MB; a few hundred images decode
    faster here). Measured on 2 cores: 60k PNGs 1.5x, 10k JPEGs 2x faster with 2 (benchmarks/README.md)."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if images < 4 * CHUNK else max(1, min(4, cpus))


def _decode_into(out: np.ndarray, listing: Listing, names: list[str], size: int, workers: int, max_pixels: int,
                 progress: Callable[[int, int], None] | None) -> dict[int, str]:
    """Decode names[i] into out[i] (N x 3 x S x S); {row: name} of the unreadable ones. Chunks go to
    `workers` processes with at most 2 per worker in flight, so an archive is never read ahead into
    memory; the results land in `out` as they come back."""
    failed: dict[int, str] = {}
    done = 0

    def collect(result: tuple) -> None:
        nonlocal done
        rows, decoded, bad = result
        out[rows] = decoded
        for row, name, message, too_large in bad:
            if too_large:
                raise ImageTooLarge(f"{listing.path}: {message}")
            failed[row] = name
        done += len(rows) + len(bad)
        if progress:
            progress(done, len(names))

    chunks = _chunked(_payloads(listing, {name: row for row, name in enumerate(names)}))
    if workers <= 1:
        for chunk in chunks:
            collect(_decode_chunk(chunk, size, max_pixels))
        return failed
    # spawn, not fork: the caller (Prefect, a server) may run threads, which fork would copy mid-lock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = set()
        for chunk in chunks:
            if len(pending) >= 2 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    collect(future.result())
            pending.add(pool.submit(_decode_chunk, chunk, size, max_pixels))
        for future in pending:
            collect(future.result())
    return failed


def _decode_chunk(chunk: list[tuple[int, str, Payload]], size: int, max_pixels: int
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str, bool]]]:
    """(rows, their images k x 3 x S x S, [(row, name, message, too large?)] of the failures): the work
    of one process, sent back whole (a 32 x 32 image is 3 KB: cheaper than shared memory's setup)."""
    rows, images, failures = [], np.empty((len(chunk), 3, size, size), np.uint8), []
    for row, name, payload in chunk:
        try:
            image = decode(_opened(payload), size, max_pixels, name)
        except StageError as exc:  # UnreadableImage or ImageTooLarge
            failures.append((row, name, str(exc), isinstance(exc, ImageTooLarge)))
            continue
        images[len(rows)] = image.transpose(2, 0, 1)
        rows.append(row)
    return np.array(rows, np.int64), images[:len(rows)], failures


Payload = str | bytes | tuple[str, int, int]  # a file's path, its bytes, or (archive path, offset, size)


def _payloads(listing: Listing, rows: dict[str, int]) -> Iterator[tuple[int, str, Payload]]:
    """(row, name, payload) of every wanted member: a folder's files and a plain tar's members by where
    they are (the worker reads them), a zip's or compressed tar's members read here front to back in one
    pass (a .tar.gz cannot be read otherwise)."""
    if listing.kind == "folder":
        yield from ((row, name, str(listing.path / name)) for name, row in rows.items())
    elif listing.offsets is not None:
        yield from ((row, name, (str(listing.path), listing.offsets[name], listing.files[name]))
                    for name, row in rows.items())
    elif listing.kind == "zip":
        with zipfile.ZipFile(listing.path) as archive:
            for info in archive.infolist():
                if (row := rows.get(_safe_name(info.filename, listing.path))) is not None:
                    yield row, info.filename, archive.read(info)
    else:
        with tarfile.open(listing.path, "r|*") as archive:
            while (member := archive.next()) is not None:
                if member.isfile() and (row := rows.get(_safe_name(member.name, listing.path))) is not None:
                    yield row, member.name, archive.extractfile(member).read()
                archive.members.clear()


def _opened(payload: Payload) -> str | BinaryIO:
    if isinstance(payload, bytes):
        return io.BytesIO(payload)
    if isinstance(payload, tuple):
        archive, offset, size = payload
        with open(archive, "rb") as f:
            f.seek(offset)
            return io.BytesIO(f.read(size))
    return payload


def _chunked(items: Iterable[tuple[int, str, Payload]]) -> Iterator[list]:
    """Lists of CHUNK items, or fewer holding CHUNK_BYTES of read bytes (what a chunk holds in memory)."""
    chunk, held = [], 0
    for item in items:
        chunk.append(item)
        held += len(item[2]) if isinstance(item[2], bytes) else 0
        if len(chunk) == CHUNK or held >= CHUNK_BYTES:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def _compact(images: np.ndarray, keep: np.ndarray) -> int:
    """Move the kept rows to the front, in place (a copy would double peak memory); how many are kept.
    Safe front to back: a kept row never moves to a later place, so no row is overwritten before read."""
    rows = np.flatnonzero(keep)
    for start in range(0, len(rows), CHUNK):
        block = rows[start:start + CHUNK]
        if block[-1] != start + len(block) - 1:  # not already in place (rows before the first failure)
            images[start:start + len(block)] = images[block]
    return len(rows)


def _check_decoded(images: ImageSet, source: Path) -> None:
    """Every class keeps images in every split folder (own split) or in train (seeded), after the
    unreadable files were dropped."""
    counts = images.counts()
    for split in images.own_split or ("train",):
        empty = [c for c, n in zip(images.classes, counts[split]) if n == 0]
        if empty:
            raise StageError(f"{source}: no readable image of class {', '.join(empty)} left in {split} "
                             f"(unreadable files, e.g. {', '.join(images.examples.get(UNREADABLE, [])[:2])}): "
                             f"replace them or add images")
