"""Stage `download`: fetch one data set (CIFAR-10 or the Alice text) into `data/raw/<name>/`.

    python -m ptpipe.download cifar10     # reads params.yaml: download.cifar10.{url,md5}, retries, timeout_s

The URL and md5 come from params.yaml, so a mirror or a local copy is a `-S` away:
`dvc exp run -S download.cifar10.url=file:///path/cifar-10-python.tar.gz -S download.cifar10.md5=...`.

Guarantees: the body is streamed to a temporary file (a progress bar per file); a body that
breaks off is resumed with a Range request (or restarted when the server ignores Range),
never kept; connection resets, timeouts and HTTP 5xx are retried with exponential backoff;
a host that cannot be resolved or refuses the connection fails at once (no network is not
transient). The md5 is checked before anything is unpacked or moved into place, archives are
unpacked only if every member is a plain file or folder inside the target, and the output
folder appears in one rename: after any failure it does not exist.
"""
from __future__ import annotations

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

from ptpipe import files, params, stage
from ptpipe.stage import StageError, run

RAW_DIR = Path("data/raw")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
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


def _fetch_file(url: str, dest: Path, key: str) -> None:
    src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not src.is_file():
        raise StageError(f"{src} does not exist: check {key}.url")
    with open(src, "rb") as fin, open(dest, "wb") as fout, tqdm.wrapattr(
            fin, "read", total=src.stat().st_size, desc=src.name, unit="B", unit_scale=True) as wrapped:
        shutil.copyfileobj(wrapped, fout, CHUNK)


def check_members(archive: tarfile.TarFile, url: str) -> None:
    """Refuse any member that could write outside the target or is not a plain file/folder."""
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise StageError(f"refusing to unpack {url}: member {member.name!r} points outside the target folder")
        if member.issym() or member.islnk():
            raise StageError(f"refusing to unpack {url}: member {member.name!r} is a link")
        if not (member.isfile() or member.isdir()):
            raise StageError(f"refusing to unpack {url}: member {member.name!r} is a device or special file")


def fetch(url: str, md5: str, out_dir: Path, *, retries: int, timeout_s: float, key: str) -> Path:
    """Download `url`, verify `md5`, and place it (unpacked, for archives) at `out_dir` atomically."""
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(out_dir.parent, f".{out_dir.name}-download-")  # a killed run's partial download
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-download-") as tmp:
        partial = Path(tmp) / name
        if url.startswith("file://"):
            _fetch_file(url, partial, key)
        else:
            _fetch_http(url, partial, retries=retries, timeout_s=timeout_s, key=key)
        actual = files.digest(partial, "md5")
        if md5 and actual != md5:
            raise StageError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}. "
                             f"Nothing was kept. If this is a mirror, set {key}.md5={actual}")
        with files.atomic_path(out_dir) as staging:
            staging.mkdir()
            if name.endswith(ARCHIVE_SUFFIXES):
                try:
                    with tarfile.open(partial) as archive:
                        check_members(archive, url)
                        archive.extractall(staging, filter="data")
                except tarfile.TarError as exc:
                    raise StageError(f"{url} is not a readable tar archive ({exc})") from None
            else:
                shutil.copyfile(partial, staging / name)
        # the temporary folder (and the downloaded file in it) goes away here: only out_dir remains
    print(f"{key}: md5 {actual} -> {out_dir}")
    return out_dir


def main(name: str, raw_dir: Path = RAW_DIR, params_file: str | Path = params.PARAMS_FILE) -> Path:
    p = params.load(params_file)
    source = getattr(p.download, name)
    return fetch(source.url, source.md5, Path(raw_dir) / name,
                 retries=p.download.retries, timeout_s=p.download.timeout_s, key=f"download.{name}")


def cli() -> None:
    parser = stage.parser(__doc__, raw=str(RAW_DIR))  # writes RAW/<name>
    parser.add_argument("name", choices=["cifar10", "alice"], help="which data set (a key of params.yaml's download)")
    args = parser.parse_args()
    run(main, args.name, args.raw, args.params)


if __name__ == "__main__":
    cli()
