"""The `download` stage against a real loopback server: success, retries, resume, and every refusal."""
import hashlib
import io
import tarfile
import time

import pytest

from fixtures import alice_text, cifar_archive, md5, write_params
from ptpipe import download
from ptpipe.stage import StageError


def fetch(url, md5sum, out, **kw):
    kw.setdefault("retries", 3)
    kw.setdefault("timeout_s", 5)
    return download.fetch(url, md5sum, out, key="download.test", **kw)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)


def test_archive_is_verified_and_unpacked(server, tmp_path):
    body = cifar_archive(per_batch=5, n_test=5)
    # what a killed earlier run leaves: a partial download and an unpacked temporary
    (tmp_path / "raw" / ".cifar10-download-x1y2").mkdir(parents=True)
    (tmp_path / "raw" / ".cifar10-download-x1y2" / "c.tar.gz").write_bytes(body[:100])
    (tmp_path / "raw" / ".cifar10.abc.tmp").mkdir()
    (tmp_path / "raw" / ".alice.keep.tmp").mkdir()  # another output's: not this run's to delete
    out = fetch(server.add("/c.tar.gz", body), md5(body), tmp_path / "raw" / "cifar10")
    assert sorted(p.name for p in (out / "cifar-10-batches-py").iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [".alice.keep.tmp", "cifar10"]  # ours: gone


def test_text_kept_as_file_and_empty_md5_skips_check(server, tmp_path):
    out = fetch(server.add("/pg11.txt", alice_text()), "", tmp_path / "alice")
    assert (out / "pg11.txt").read_bytes() == alice_text()


def test_wrong_checksum_names_both_and_leaves_nothing(server, tmp_path):
    body = cifar_archive(per_batch=5, n_test=5)
    with pytest.raises(StageError) as err:
        fetch(server.add("/c.tar.gz", body), "0" * 32, tmp_path / "raw" / "cifar10")
    assert f"expected md5 {'0' * 32}, got {md5(body)}" in str(err.value)
    assert list((tmp_path / "raw").iterdir()) == []


def test_5xx_is_retried_then_succeeds(server, tmp_path):
    url = server.add("/pg11.txt", alice_text())
    server.fail("/pg11.txt", 2, 503)
    fetch(url, md5(alice_text()), tmp_path / "alice")
    assert len(server.requests) == 3


def test_5xx_forever_gives_up_with_clear_error(server, tmp_path):
    url = server.add("/pg11.txt", alice_text())
    server.fail("/pg11.txt", 10, 500)
    with pytest.raises(StageError, match=r"giving up .* after 3 attempts; last error: HTTP 500"):
        fetch(url, "", tmp_path / "alice", retries=2)
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(StageError, match="HTTP 404.*download.test.url"):
        fetch(server.url + "/missing.txt", "", tmp_path / "alice")
    assert len(server.requests) == 1


def test_body_cut_short_is_resumed_with_range(server, tmp_path):
    body = cifar_archive(per_batch=20, n_test=20)
    url = server.add("/c.tar.gz", body)
    server.drop("/c.tar.gz", 1, after=len(body) // 3)
    out = fetch(url, md5(body), tmp_path / "cifar10")
    assert (out / "cifar-10-batches-py" / "test_batch").is_file()
    # the second request asks only for what was missing
    path, range_header = server.requests[1]
    assert range_header is not None and 0 < int(range_header[6:-1]) <= len(body) // 3


def test_body_cut_short_every_time_is_never_kept(server, tmp_path):
    body = alice_text()
    url = server.add("/pg11.txt", body)
    server.drop("/pg11.txt", 10, after=100)
    with pytest.raises(StageError, match="after 2 attempts; last error: body (broke off|cut short)"):
        fetch(url, "", tmp_path / "alice", retries=1)
    assert list(tmp_path.iterdir()) == []


def _tar_with(name, **attrs) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        for k, v in attrs.items():
            setattr(info, k, v)
        tar.addfile(info, io.BytesIO(b"x" if info.isfile() else b""))
        if info.isfile():
            pass
    return buf.getvalue()


@pytest.mark.parametrize("name,attrs,reason", [
    ("../evil", {"size": 1}, "outside the target"),
    ("/etc/evil", {"size": 1}, "outside the target"),
    ("cifar-10-batches-py/../../evil", {"size": 1}, "outside the target"),
    ("link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "is a link"),
    ("hard", {"type": tarfile.LNKTYPE, "linkname": "other"}, "is a link"),
    ("dev", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "device or special"),
])
def test_unsafe_members_are_refused(server, tmp_path, name, attrs, reason):
    body = _tar_with(name, **attrs)
    with pytest.raises(StageError, match=reason):
        fetch(server.add("/evil.tar.gz", body), md5(body), tmp_path / "raw" / "cifar10")
    assert list((tmp_path / "raw").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_connection_refused_fails_fast_with_mirror_hint(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    t0 = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch(f"http://127.0.0.1:{port}/pg11.txt", "", tmp_path / "alice", retries=5)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/pg11.txt" in message and "download.test.url" in message
    assert "download.test.md5" in message
    assert list(tmp_path.iterdir()) == []


def test_unresolvable_host_as_a_command_gives_one_line_no_traceback(in_tmp):
    write_params(in_tmp, **{"download.alice.url": "http://no-such-host.invalid/pg11.txt"})
    import subprocess
    import sys

    from fixtures import tool_env

    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ptpipe.download", "alice"], cwd=in_tmp, env=tool_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in result.stderr
    assert "error: cannot reach no-such-host.invalid" in result.stderr
    assert "download.alice.url" in result.stderr
    assert not (in_tmp / "data" / "raw" / "alice").exists()


def test_file_url(tmp_path):
    src = tmp_path / "pg11.txt"
    src.write_bytes(alice_text())
    out = download.fetch(src.as_uri(), md5(alice_text()), tmp_path / "out" / "alice",
                         retries=0, timeout_s=1, key="download.alice")
    assert (out / "pg11.txt").read_bytes() == alice_text()


def test_main_reads_params(server, in_tmp):
    body = alice_text()
    write_params(in_tmp, **{"download.alice.url": server.add("/pg11.txt", body), "download.alice.md5": md5(body)})
    out = download.main("alice")
    assert hashlib.md5((out / "pg11.txt").read_bytes()).hexdigest() == md5(body)
