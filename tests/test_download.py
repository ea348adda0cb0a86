"""The `download` stage against a real loopback server: success, retries, resume, and every refusal.

What arrives is kept as it came, one file (an archive is not unpacked: prepare reads it in place;
the archive-safety checks are in tests/test_prepare.py). A file:// folder is packed into one tar.
"""
import hashlib
import io
import subprocess
import sys
import tarfile

import pytest

from fixtures import alice_text, cifar_archive, md5, tool_env, write_params
from ptpipe import download
from ptpipe.stage import StageError


def fetch(url, md5sum, out, **kw):
    kw.setdefault("retries", 3)
    kw.setdefault("timeout_s", 5)
    return download.fetch(url, md5sum, out, key="datasets.test", **kw)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """No backoff waits; the delays asked for are recorded (one per retry)."""
    asked = []
    monkeypatch.setattr(download.time, "sleep", asked.append)
    return asked


def test_archive_is_verified_and_kept_as_one_file(server, tmp_path):
    body = cifar_archive(per_batch=5, n_test=5)
    # what a killed earlier run leaves: a partial download and a staging folder
    (tmp_path / "raw" / ".cifar10-download-x1y2").mkdir(parents=True)
    (tmp_path / "raw" / ".cifar10-download-x1y2" / "c.tar.gz").write_bytes(body[:100])
    (tmp_path / "raw" / ".cifar10.abc.tmp").mkdir()
    (tmp_path / "raw" / ".alice.keep.tmp").mkdir()  # another output's: not this run's to delete
    out = fetch(server.add("/c.tar.gz", body), md5(body), tmp_path / "raw" / "cifar10")
    assert [p.name for p in out.iterdir()] == ["c.tar.gz"]  # not unpacked: prepare reads it in place
    assert (out / "c.tar.gz").read_bytes() == body
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [".alice.keep.tmp", "cifar10"]  # ours: gone


def test_text_kept_as_file_and_empty_md5_skips_check(server, tmp_path):
    out = fetch(server.add("/pg11.txt", alice_text()), "", tmp_path / "alice")
    assert [p.name for p in out.iterdir()] == ["pg11.txt"]
    assert (out / "pg11.txt").read_bytes() == alice_text()


def test_a_second_download_replaces_the_first_whole(server, tmp_path):
    out = tmp_path / "raw" / "alice"
    fetch(server.add("/old.txt", b"old text\n"), "", out)
    fetch(server.add("/pg11.txt", alice_text()), "", out)
    assert [p.name for p in out.iterdir()] == ["pg11.txt"]  # the old file is not left beside the new one


def test_wrong_checksum_names_both_and_leaves_nothing(server, tmp_path):
    body = cifar_archive(per_batch=5, n_test=5)
    with pytest.raises(StageError) as err:
        fetch(server.add("/c.tar.gz", body), "0" * 32, tmp_path / "raw" / "cifar10")
    assert f"expected md5 {'0' * 32}, got {md5(body)}" in str(err.value)
    assert f"set datasets.test.md5={md5(body)}" in str(err.value)
    assert list((tmp_path / "raw").iterdir()) == []


def test_5xx_is_retried_with_backoff_then_succeeds(server, tmp_path, sleeps):
    url = server.add("/pg11.txt", alice_text())
    server.fail("/pg11.txt", 2, 503)
    fetch(url, md5(alice_text()), tmp_path / "alice")
    assert len(server.requests) == 3
    assert sleeps == [1.0, 2.0]  # exponential backoff


def test_5xx_forever_gives_up_with_clear_error(server, tmp_path):
    url = server.add("/pg11.txt", alice_text())
    server.fail("/pg11.txt", 10, 500)
    with pytest.raises(StageError, match=r"giving up .* after 3 attempts; last error: HTTP 500. "
                                         r"Raise download.retries or point datasets.test.url at a mirror"):
        fetch(url, "", tmp_path / "alice", retries=2)
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried(server, tmp_path, sleeps):
    with pytest.raises(StageError, match="HTTP 404.*datasets.test.url"):
        fetch(server.url + "/missing.txt", "", tmp_path / "alice")
    assert len(server.requests) == 1 and sleeps == []


def test_body_cut_short_is_resumed_with_range(server, tmp_path):
    body = cifar_archive(per_batch=20, n_test=20)
    url = server.add("/c.tar.gz", body)
    server.drop("/c.tar.gz", 1, after=len(body) // 3)
    out = fetch(url, md5(body), tmp_path / "cifar10")
    assert (out / "c.tar.gz").read_bytes() == body
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


def test_connection_refused_fails_at_once_with_mirror_hint(tmp_path, sleeps):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with pytest.raises(StageError) as err:
        fetch(f"http://127.0.0.1:{port}/pg11.txt", "", tmp_path / "alice", retries=5)
    assert sleeps == []  # no network is not transient: no retry, no backoff
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/pg11.txt" in message and "datasets.test.url" in message
    assert "datasets.test.md5" in message and "dvc exp run -S datasets.test.url=file://" in message
    assert list(tmp_path.iterdir()) == []


def test_unresolvable_host_as_a_command_gives_one_line_no_traceback(in_tmp):
    write_params(in_tmp, **{"datasets.alice.url": "http://no-such-host.invalid/pg11.txt"})
    result = subprocess.run([sys.executable, "-m", "ptpipe.download", "alice", "--raw", "data/raw/alice"],
                            cwd=in_tmp, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "retrying" not in result.stdout + result.stderr  # failed at once, no retries
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach no-such-host.invalid"), result.stderr
    assert "datasets.alice.url" in lines[0]
    assert not (in_tmp / "data" / "raw" / "alice").exists()


def test_file_url(tmp_path):
    src = tmp_path / "pg11.txt"
    src.write_bytes(alice_text())
    out = download.fetch(src.as_uri(), md5(alice_text()), tmp_path / "out" / "alice",
                         retries=0, timeout_s=1, key="datasets.alice")
    assert (out / "pg11.txt").read_bytes() == alice_text()
    with pytest.raises(StageError, match=r"nope.txt does not exist: check datasets.alice.url"):
        download.fetch((tmp_path / "nope.txt").as_uri(), "", tmp_path / "out" / "nope", retries=0, timeout_s=1,
                       key="datasets.alice")
    assert not (tmp_path / "out" / "nope").exists()


def _my_pets(root):
    """A folder of images in class folders (bytes stand in for images: download does not look inside)."""
    for cls, names in (("cat", ["b.png", "a.png"]), ("dog", ["x.jpg"]), ("fox", ["1.png", "2.png", "3.png"])):
        (root / cls).mkdir(parents=True)
        for name in names:
            (root / cls / name).write_bytes(f"{cls}/{name}".encode() * 10)
    return root


def test_a_file_url_naming_a_folder_is_packed_into_one_deterministic_tar(tmp_path):
    import os
    import time

    pets = _my_pets(tmp_path / "my-pets")
    out = download.fetch(pets.as_uri(), "", tmp_path / "raw" / "pets", retries=0, timeout_s=1,
                         key="datasets.pets")
    assert [p.name for p in out.iterdir()] == ["my-pets.tar"]
    first = (out / "my-pets.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        listed = tar.getmembers()
        assert [m.name for m in listed] == ["my-pets/cat", "my-pets/cat/a.png", "my-pets/cat/b.png", "my-pets/dog",
                                            "my-pets/dog/x.jpg", "my-pets/fox", "my-pets/fox/1.png",
                                            "my-pets/fox/2.png", "my-pets/fox/3.png"]
        assert tar.extractfile("my-pets/fox/2.png").read() == b"fox/2.png" * 10
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in listed)
    # the same folder, touched and copied elsewhere under the same name: the same bytes, the same md5
    later = time.time() + 1000
    for path in pets.rglob("*"):
        os.utime(path, (later, later))
    (pets / "dog" / "x.jpg").chmod(0o600)
    again = download.fetch(pets.as_uri(), "", tmp_path / "raw" / "again", retries=0, timeout_s=1,
                           key="datasets.pets")
    assert hashlib.md5((again / "my-pets.tar").read_bytes()).hexdigest() == md5(first)
    # a changed file changes it
    (pets / "cat" / "a.png").write_bytes(b"another cat")
    changed = download.fetch(pets.as_uri(), "", tmp_path / "raw" / "changed", retries=0, timeout_s=1,
                             key="datasets.pets")
    assert md5((changed / "my-pets.tar").read_bytes()) != md5(first)


def test_a_symlink_in_the_folder_is_not_packed(tmp_path):
    pets = _my_pets(tmp_path / "my-pets")
    (tmp_path / "secret").write_text("not data")
    (pets / "cat" / "link.png").symlink_to(tmp_path / "secret")
    out = download.fetch(pets.as_uri(), "", tmp_path / "raw", retries=0, timeout_s=1, key="datasets.pets")
    with tarfile.open(out / "my-pets.tar") as tar:
        assert "my-pets/cat/link.png" not in tar.getnames() and all(m.isfile() or m.isdir() for m in tar)


def test_md5_set_for_a_folder_is_a_one_line_error_naming_the_key(in_tmp):
    pets = _my_pets(in_tmp / "my-pets")
    write_params(in_tmp, **{"datasets.alice.url": pets.as_uri(), "datasets.alice.md5": "0" * 32})
    result = subprocess.run([sys.executable, "-m", "ptpipe.download", "alice", "--raw", "data/raw/alice"],
                            cwd=in_tmp, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: datasets.alice.md5 is set but datasets.alice.url names a folder")
    assert "leave md5 empty" in lines[0]
    assert not (in_tmp / "data").exists()


def test_download_reads_the_data_set_from_params(server, in_tmp):
    body = alice_text()
    write_params(in_tmp, **{"datasets.alice.url": server.add("/pg11.txt", body), "datasets.alice.md5": md5(body)})
    out = download.download("alice", "data/raw/alice")
    assert hashlib.md5((out / "pg11.txt").read_bytes()).hexdigest() == md5(body)
    with pytest.raises(StageError, match=r"no data set 'nope' in params.yaml's datasets \(there are cifar10, alice\)"):
        download.download("nope", "data/raw/nope")
    assert not (in_tmp / "data/raw/nope").exists()


def test_the_command_downloads_and_validates_params_first(server, in_tmp):
    body = alice_text()
    write_params(in_tmp, **{"datasets.alice.url": server.add("/pg11.txt", body), "datasets.alice.md5": md5(body)})
    ok = subprocess.run([sys.executable, "-m", "ptpipe.download", "alice", "--raw", "data/raw/alice"],
                        cwd=in_tmp, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (in_tmp / "data/raw/alice/pg11.txt").read_bytes() == body
    write_params(in_tmp, **{"datasets.alice.url": "ftp://example.com/pg11.txt"})
    bad = subprocess.run([sys.executable, "-m", "ptpipe.download", "alice", "--raw", "data/raw/other"],
                         cwd=in_tmp, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "params.yaml: datasets.alice.url: Value error, must start with http://, https:// or file://" in bad.stderr
    assert not (in_tmp / "data/raw/other").exists()
    assert len(server.requests) == 1
