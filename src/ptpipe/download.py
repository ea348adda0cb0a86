"""Stage `download`: fetch one data set of params.yaml (`datasets.<name>`) into `data/raw/<name>/`.

    python -m ptpipe.download cifar10 --raw data/raw/cifar10   # datasets.cifar10.{url,md5}, download.*

The URL and md5 come from params.yaml, so a mirror or a local copy is a `-S` away:
`dvc exp run -S datasets.cifar10.url=file:///path/cifar-10-python.tar.gz -S datasets.cifar10.md5=...`.
What arrives is kept as it is, one file: an archive is not unpacked (prepare reads it in place, so
DVC tracks one file, not the 10^4-10^6 files a folder of images has). A `file://` URL may also name a
folder (your own images): it is packed into one uncompressed tar, members sorted and their times and
owners cleared, so the same folder gives the same bytes; its md5 must be left empty.

Guarantees: the body is streamed to a temporary file (a progress bar per file); a body that
breaks off is resumed with a Range request (or restarted when the server ignores Range),
never kept; connection resets, timeouts and HTTP 5xx are retried with exponential backoff;
a host that cannot be resolved or refuses the connection fails at once (no network is not
transient). The md5 is checked before anything is unpacked or moved into place, archives are
unpacked only if every member is a plain file or folder inside the target, and the output
folder appears in one rename: after any failure it does not exist.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

import requests
import urllib3
from tqdm import tqdm

from ptpipe import files, params as params_mod, stage
from ptpipe.stage import StageError

CHUNK = 1 << 16  # a cut-off read loses at most this much of what arrived


class _Transient(Exception):
    """A failure worth retrying: reset connection, timeout, 5xx, body cut short."""


def _unreachable(exc: requests.ConnectionError) -> bool:
    """True when the host cannot be resolved or refuses connections: retrying will not help."""
    reason = exc.args[0].reason if exc.args and isinstance(exc.args[0], urllib3.exceptions.MaxRetryError) else None
    return isinstance(reason, (urllib3.exceptions.NameResolutionError, urllib3.exceptions.NewConnectionError))


def _fetch_http(url: str, dest: Path, *, retries: int, timeout_s: float, key: str) -> None:
    with requests.Session() as session, tqdm(unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=PurePosixPath(urllib.parse.urlsplit(url).path).name,
                                             dynamic_ncols=True) as bar:
        for attempt in range(retries + 1):
            have = dest.stat().st_size if dest.exists() else 0
            # identity: a Range offset counts the bytes as sent; a gzip-encoded body would be decoded
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
            try:
                with session.get(url, stream=True, timeout=timeout_s, headers=headers) as resp:
                    if resp.status_code >= 500:
                        raise _Transient(f"HTTP {resp.status_code}")
                    if resp.status_code == 416:  # our partial file is stale: start over
                        dest.unlink()
                        raise _Transient("HTTP 416 on resume")
                    if resp.status_code not in (200, 206):
                        raise StageError(f"{url} answered HTTP {resp.status_code} {resp.reason}: check {key}.url")
                    resumed = resp.status_code == 206
                    if not resumed:
                        have = 0  # the server ignored Range: restart from byte 0
                    length = resp.headers.get("Content-Length")
                    bar.total = have + int(length) if length is not None else None
                    bar.n = have
                    bar.refresh()
                    with open(dest, "ab" if resumed else "wb") as f:
                        for chunk in resp.iter_content(CHUNK):
                            f.write(chunk)
                            bar.update(len(chunk))
                    if length is not None and dest.stat().st_size < have + int(length):
                        raise _Transient(f"body cut short at {dest.stat().st_size} bytes")
                    return
            except requests.ConnectionError as exc:
                if _unreachable(exc):
                    raise StageError(_no_network_message(url, key, exc)) from None
                error = f"connection error ({type(exc).__name__})"
            except requests.Timeout:
                error = f"no answer within {timeout_s:g} s"
            except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError) as exc:
                error = f"body broke off ({type(exc).__name__})"
            except _Transient as exc:
                error = str(exc)
            if attempt == retries:
                raise StageError(f"giving up on {url} after {retries + 1} attempts; last error: {error}. "
                                 f"Raise download.retries or point {key}.url at a mirror")
            delay = min(2.0 ** attempt, 30.0)
            bar.write(f"{error}; retrying in {delay:g} s (attempt {attempt + 2}/{retries + 1})")
            time.sleep(delay)


def _no_network_message(url: str, key: str, exc: Exception) -> str:
    host = urllib.parse.urlsplit(url).netloc
    return (f"cannot reach {host} for {url} (no network, or the host is down). To use a mirror or a local "
            f"copy, set {key}.url (http://, https:// or file://) and {key}.md5, e.g. "
            f"dvc exp run -S {key}.url=file:///path/to/file -S {key}.md5=<md5 of that file>")


def _local_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _pack_folder(src: Path, dest: Path) -> None:
    """`src` as an uncompressed tar at `dest`, members under src's name, in sorted order with times, owners
    and modes cleared: the same folder gives the same bytes (and the same DVC hash)."""
    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isfile() or info.isdir()):
            return None  # links and devices: not data (prepare would refuse them in an archive)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    paths = sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix())
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in tqdm(paths, desc=f"packing {src.name}", unit="file", dynamic_ncols=True, mininterval=0.5):
            tar.add(path, arcname=f"{src.name}/{path.relative_to(src).as_posix()}", recursive=False, filter=plain)


def _fetch_file(url: str, dest: Path, key: str) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise StageError(f"{src} does not exist: check {key}.url")
    with open(src, "rb") as fin, open(dest, "wb") as fout, tqdm.wrapattr(
            fin, "read", total=src.stat().st_size, desc=src.name, unit="B", unit_scale=True) as wrapped:
        shutil.copyfileobj(wrapped, fout, CHUNK)


def fetch(url: str, md5: str, out_dir: Path, *, retries: int, timeout_s: float, key: str) -> Path:
    """Download `url` (a folder behind file://: packed), verify `md5`, place it in `out_dir` atomically."""
    local = _local_path(url) if url.startswith("file://") else None
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    if local is not None and local.is_dir():
        if md5:
            raise StageError(f"{key}.md5 is set but {key}.url names a folder ({local}): leave md5 empty "
                             f"(it checks one downloaded file)")
        name += ".tar"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(out_dir.parent, f".{out_dir.name}-download-")  # a killed run's partial download
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-download-") as tmp:
        partial = Path(tmp) / name
        if local is not None and local.is_dir():
            _pack_folder(local, partial)
        elif local is not None:
            _fetch_file(url, partial, key)
        else:
            _fetch_http(url, partial, retries=retries, timeout_s=timeout_s, key=key)
        actual = files.digest(partial, "md5")
        if md5 and actual != md5:
            raise StageError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}. "
                             f"Nothing was kept. If this is a mirror, set {key}.md5={actual}")
        with files.atomic_path(out_dir) as staging:
            staging.mkdir()
            os.replace(partial, staging / name)
        # the temporary folder goes away here: only out_dir remains
    print(f"{key}: md5 {actual} -> {out_dir / name}")
    return out_dir


def download(name: str, raw_dir: str | Path, params_file: str | Path = params_mod.PARAMS_FILE) -> Path:
    """datasets.<name> of `params_file` -> raw_dir/<the file's name>."""
    p = params_mod.load(params_file)
    if name not in p.datasets:
        raise StageError(f"no data set {name!r} in {params_file}'s datasets (there are {', '.join(p.datasets)})")
    source = p.datasets[name]
    return fetch(source.url, source.md5, Path(raw_dir), retries=p.download.retries,
                 timeout_s=p.download.timeout_s, key=f"datasets.{name}")


def main() -> None:
    ap = stage.parser(__doc__, "raw")
    ap.add_argument("name", help="the data set: a key of params.yaml's datasets")
    args = ap.parse_args()
    stage.run(download, args.name, args.raw, args.params)


if __name__ == "__main__":
    main()
