"""Atomic file output: every file the pipeline writes appears complete or not at all.

A stage killed at any moment (SIGKILL included) leaves either the previous file or
nothing, never a truncated file that looks complete to DVC or to the next stage.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it onto `dest`.

    Works for files and directories: whatever the body creates at the yielded path
    replaces `dest` in one rename. On an exception the temporary is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest.parent, f".{dest.name}.")  # a killed earlier write's temporary
    # Same directory as dest, so the final rename never crosses a file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.unlink()
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            # A directory cannot be renamed onto a non-empty one: move the old one aside first (one
            # rename), then the new one in, then delete the old. A kill at any point leaves either the
            # old or the new directory complete at `dest` (or none), never a half-deleted one.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def remove_leftovers(folder: Path, prefix: str) -> None:
    """Delete the temporaries (`prefix*.tmp`, `*.tmp.old`, or folders named `prefix*`) that a killed run left
    in `folder`. Only one writer per output runs at a time (DVC's repository lock, the flows' slot)."""
    for path in folder.glob(f"{glob.escape(prefix)}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith((".tmp", ".tmp.old")):
            path.unlink(missing_ok=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(dest: str | os.PathLike, obj) -> None:
    """torch.save, atomically (checkpoints, model files). Saved to memory first: torch's zip archive names
    its records after the file it is saved to, so saving to the random temporary name would put that
    name inside the file, and identical weights would give different bytes (and DVC hashes)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(dest, buf.getvalue())


def digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (archives are hundreds of MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
