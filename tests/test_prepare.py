"""The `prepare` stage: layout and contents of the prepared data, and every refusal of bad input.

CIFAR-10's archive is read in place (download keeps it as it came), so the archive-safety checks
live here: members that are links, absolute, or climb out with `..` are refused, never read, and
nothing is ever written outside the prepared folder.
"""
import io
import json
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from fixtures import alice_text, cifar_archive, tool_env, write_params
from ptpipe import data, prepare
from ptpipe.stage import StageError

KEY = "datasets.cifar10"


def rebuild(body: bytes, replace: dict | None = None, add: list | None = None) -> bytes:
    """The archive `body` with members replaced (name -> bytes, or None: removed) and raw TarInfos added
    ((info, payload) pairs, added as they are: links, absolute names, ...)."""
    replace, out = replace or {}, io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(body)) as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read() if member.isfile() else b""
            if member.name in replace:
                if replace[member.name] is None:
                    continue
                payload = replace[member.name]
                member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
        for info, payload in add or []:
            dst.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture
def body():
    return cifar_archive(per_batch=40, n_test=30)


@pytest.fixture
def archive(tmp_path, body):
    """data/raw/cifar10/cifar-10-python.tar.gz as the download stage leaves it: the archive, not unpacked."""
    path = tmp_path / "raw" / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(body)
    return path


def write(archive, payload: bytes):
    archive.write_bytes(payload)
    return archive


def test_cifar_layout_split_and_card_read_from_the_archive_in_place(archive, body, tmp_path):
    out = tmp_path / "prepared" / "cifar10"
    card = prepare.prepare_cifar(archive, out, val_size=30, seed=0, key=KEY)
    assert [p.name for p in archive.parent.iterdir()] == ["cifar-10-python.tar.gz"]  # nothing unpacked beside it
    train_x, train_y = data.load_images(out, "train")
    val_x, val_y = data.load_images(out, "val")
    test_x, test_y = data.load_images(out, "test")
    assert train_x.shape == (170, 3, 32, 32) and train_x.dtype.is_floating_point is False
    assert val_x.shape == (30, 3, 32, 32) and test_x.shape == (30, 3, 32, 32)
    assert card["counts"]["val"] == np.bincount(val_y.numpy(), minlength=10).tolist()
    assert sum(card["counts"]["train"]) == 170 and card["image_size"] == 32
    assert card["classes"][:2] == ["airplane", "automobile"] and len(card["classes"]) == 10
    assert json.loads((out / "card.json").read_text()) == card
    # the images are the archive's, channel-major, and train + val together are the whole training set
    batch = pickle.loads(members(body)["cifar-10-batches-py/test_batch"], encoding="bytes")
    assert np.array_equal(test_x.numpy(), batch[b"data"].reshape(-1, 3, 32, 32))
    assert np.array_equal(test_y.numpy(), np.asarray(batch[b"labels"]))
    assert np.allclose(card["mean"], train_x.float().div(255).mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    # the split is a function of the seed
    other = prepare.prepare_cifar(archive, tmp_path / "other", val_size=30, seed=1, key=KEY)
    assert other["counts"]["val"] != card["counts"]["val"] or not np.array_equal(
        data.load_images(tmp_path / "other", "val")[0].numpy(), val_x.numpy())


def _batch_with(body, name, changes):
    batch = pickle.loads(members(body)[f"cifar-10-batches-py/{name}"], encoding="bytes")
    batch.update(changes)
    return rebuild(body, {f"cifar-10-batches-py/{name}": pickle.dumps(batch, protocol=2)})


@pytest.mark.parametrize("changes,message", [
    ({b"data": np.zeros((40, 3000), np.uint8)}, "expected N x 3072 uint8"),
    ({b"labels": [10] * 40}, r"labels outside 0..9"),
    ({b"labels": [1] * 39}, "39 labels for 40 images"),
])
def test_bad_cifar_batches_are_refused(archive, body, tmp_path, changes, message):
    write(archive, _batch_with(body, "data_batch_3", changes))
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(StageError, match=message):
        prepare.prepare_cifar(archive, out, val_size=10, seed=0, key=KEY)
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("payload, message", [
    (None, "batches.meta is missing"),
    (pickle.dumps({b"num_cases_per_batch": 60}, protocol=2),
     r"batches.meta: not CIFAR-10's batches.meta \(b'label_names'\)"),
    (b"garbage", "batches.meta: not CIFAR-10's batches.meta"),
    (pickle.dumps({b"label_names": [b"cat", b"dog", b"fox"]}, protocol=2),
     "3 class names, CIFAR-10 has 10 .*format: image-folder"),
])
def test_bad_class_names_file_is_refused(archive, body, tmp_path, payload, message):
    write(archive, rebuild(body, {"cifar-10-batches-py/batches.meta": payload}))
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(StageError, match=message):
        prepare.prepare_cifar(archive, out, val_size=10, seed=0, key=KEY)
    assert not out.exists()


def test_a_missing_batch_and_a_file_that_is_no_archive_say_what_to_do(archive, body, tmp_path):
    write(archive, rebuild(body, {"cifar-10-batches-py/data_batch_2": None}))
    with pytest.raises(StageError, match=r"cifar-10-batches-py/data_batch_2 is missing: .*format: image-folder"):
        prepare.prepare_cifar(archive, tmp_path / "out", val_size=10, seed=0, key=KEY)
    write(archive, b"<html>a login page, not an archive</html>")
    with pytest.raises(StageError, match=r"not a readable tar archive .*datasets.cifar10.format cifar10-python"):
        prepare.prepare_cifar(archive, tmp_path / "out", val_size=10, seed=0, key=KEY)
    assert not (tmp_path / "out").exists()


def test_val_size_that_leaves_no_training_images_names_the_key(archive, tmp_path):
    with pytest.raises(StageError, match=r"datasets.cifar10.val_size=200 leaves no training images \(200 in all\)"):
        prepare.prepare_cifar(archive, tmp_path / "out", val_size=200, seed=0, key=KEY)
    assert not (tmp_path / "out").exists()


def _info(name, **attrs):
    info = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("info, payload, reason", [
    (_info("../cifar-10-batches-py/data_batch_1", size=1), b"x", "climbs out with '..'"),
    (_info("cifar-10-batches-py/../../evil", size=1), b"x", "climbs out with '..'"),
    (_info("/cifar-10-batches-py/data_batch_1", size=1), b"x", "has an absolute path"),
    (_info("/etc/evil", size=1), b"x", "has an absolute path"),
    (_info("cifar-10-batches-py/readme", type=tarfile.SYMTYPE, linkname="/etc/passwd"), None, "is a link"),
    (_info("hard", type=tarfile.LNKTYPE, linkname="cifar-10-batches-py/test_batch"), None, "is a link"),
    (_info("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None, "is a device or special file"),
    (_info("cifar-10-batches-py/test_batch", size=1), b"x", "appears twice"),
])
def test_unsafe_archive_members_are_refused_and_nothing_is_written(archive, body, tmp_path, info, payload, reason):
    write(archive, rebuild(body, add=[(info, payload)]))
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(StageError, match=f"member '{info.name}' {reason}: refusing the archive"):
        prepare.prepare_cifar(archive, out, val_size=10, seed=0, key=KEY)
    assert not out.exists() and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_batch_that_is_a_link_is_never_read(archive, body, tmp_path):
    """A link standing in for a batch (whatever it points at) is refused, never followed."""
    link = _info("cifar-10-batches-py/data_batch_1", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    write(archive, rebuild(body, {"cifar-10-batches-py/data_batch_1": None}, add=[(link, None)]))
    with pytest.raises(StageError, match="member 'cifar-10-batches-py/data_batch_1' is a link"):
        prepare.prepare_cifar(archive, tmp_path / "out", val_size=10, seed=0, key=KEY)


def test_directory_replaced_in_place_keeps_nothing_of_the_old_one(tmp_path):
    from ptpipe import files

    dest = tmp_path / "prepared"
    for version in ("old", "new"):
        with files.atomic_path(dest) as staging:
            staging.mkdir()
            (staging / f"{version}.npy").write_text(version)
    assert [p.name for p in dest.iterdir()] == ["new.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary or old copy left beside it


def test_pickle_that_would_run_code_is_refused(archive, body, tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    write(archive, rebuild(body, {"cifar-10-batches-py/data_batch_1": pickle.dumps({b"data": Evil()}, protocol=2)}))
    with pytest.raises(StageError, match="refusing to load posix.system|refusing to load os.system"):
        prepare.prepare_cifar(archive, tmp_path / "out", val_size=10, seed=0, key=KEY)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("markers", [True, False])
def test_text_markers_stripped_ids_and_stats(tmp_path, markers):
    source = tmp_path / "raw" / "alice" / "pg11.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(alice_text(markers))
    stats = prepare.prepare_text(source, tmp_path / "alice", gutenberg=True, val_fraction=0.1, key="datasets.alice")
    train, val, vocab = data.load_text(tmp_path / "alice")
    text = "".join(vocab[i] for i in train.tolist() + val.tolist())
    assert text.startswith("Alice was beginning") and "\r" not in text
    assert "Project Gutenberg" not in text and "Licence" not in text
    assert vocab == sorted(set(text))
    assert stats["val_characters"] == len(val) == int(len(text) * 0.1)
    assert text.endswith("conversations?'\n")  # validation is the contiguous end of the book
    counts = np.bincount(train.numpy(), minlength=len(vocab))
    p = counts[counts > 0] / counts.sum()
    assert stats["unigram_bits_per_char"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-4)
    assert stats["unigram_val_bits_per_char"] > 0


def test_gutenberg_false_keeps_the_header_and_footer(tmp_path):
    source = tmp_path / "book.txt"
    source.write_bytes(alice_text(markers=True))
    prepare.prepare_text(source, tmp_path / "out", gutenberg=False, val_fraction=0.1, key="datasets.book")
    train, val, vocab = data.load_text(tmp_path / "out")
    text = "".join(vocab[i] for i in train.tolist() + val.tolist())
    assert text.startswith("The Project Gutenberg eBook") and "Licence text" in text


@pytest.mark.parametrize("content,message", [
    (b"", "holds no text"),
    (b"*** START OF X ***\n\n*** END OF X ***\n", "holds no text after cutting the Project Gutenberg header"),
    (b"caf\xe9 au lait", r"not UTF-8 .*datasets.alice \(format text\) takes UTF-8"),
])
def test_bad_text_is_refused(tmp_path, content, message):
    source = tmp_path / "raw" / "alice" / "pg11.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(content)
    with pytest.raises(StageError, match=message):
        prepare.prepare_text(source, tmp_path / "prepared" / "alice", gutenberg=True, val_fraction=0.1,
                             key="datasets.alice")
    assert not (tmp_path / "prepared").exists() or list((tmp_path / "prepared").iterdir()) == []


# -- the stage: params.yaml's datasets.<name>, the one file download@<name> left ----------------------

def test_prepare_reads_the_data_set_from_params_and_the_one_raw_file(in_tmp, body):
    (in_tmp / "data/raw/cifar10").mkdir(parents=True)
    (in_tmp / "data/raw/cifar10/cifar-10-python.tar.gz").write_bytes(body)
    write_params(in_tmp, **{"datasets.cifar10.val_size": 25, "datasets.cifar10.seed": 3})
    card = prepare.prepare("cifar10", "data/raw/cifar10", "data/prepared/cifar10")
    assert sum(card["counts"]["val"]) == 25 and card["seed"] == 3
    (in_tmp / "data/raw/alice").mkdir(parents=True)
    (in_tmp / "data/raw/alice/pg11.txt").write_bytes(alice_text())
    stats = prepare.prepare("alice", "data/raw/alice", "data/prepared/alice")
    assert stats == json.loads((in_tmp / "data/prepared/alice/stats.json").read_text())
    assert stats["characters"] == len(alice_text(False).decode().replace("\r\n", "\n"))  # markers cut
    with pytest.raises(StageError, match=r"no data set 'nope' in params.yaml's datasets \(there are cifar10, alice\)"):
        prepare.prepare("nope", "data/raw/nope", "data/prepared/nope")
    (in_tmp / "data/raw/alice/extra.txt").write_text("a second file")
    with pytest.raises(StageError, match=r"data/raw/alice should hold the one file `dvc repro download@alice` "
                                         r"writes \(found 2\)"):
        prepare.prepare("alice", "data/raw/alice", "data/prepared/other")
    assert not (in_tmp / "data/prepared/other").exists()


def test_prepare_command_bad_params_are_one_line_before_anything_is_written(in_tmp, body):
    (in_tmp / "data/raw/cifar10").mkdir(parents=True)
    (in_tmp / "data/raw/cifar10/c.tar.gz").write_bytes(body)
    write_params(in_tmp, **{"datasets.cifar10.val_size": 0})
    result = subprocess.run([sys.executable, "-m", "ptpipe.prepare", "cifar10", "--raw", "data/raw/cifar10",
                             "--prepared", "data/prepared/cifar10"], cwd=in_tmp, env=tool_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "params.yaml: datasets.cifar10.val_size: Input should be greater than or equal to 1" in result.stderr
    assert not (in_tmp / "data/prepared").exists()
    missing = subprocess.run([sys.executable, "-m", "ptpipe.prepare", "cifar10", "--raw", "data/raw/cifar10"],
                             cwd=in_tmp, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--prepared" in missing.stderr  # the paths are dvc.yaml's: required
