"""The `prepare` stage: layout and contents of the prepared data, and every refusal of bad input."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from fixtures import alice_text, cifar_archive
from ptpipe import data, prepare
from ptpipe.stage import StageError


def unpack(body: bytes, dest):
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(dest, filter="data")


@pytest.fixture
def raw_cifar(tmp_path):
    unpack(cifar_archive(per_batch=40, n_test=30), tmp_path / "raw" / "cifar10")
    return tmp_path / "raw" / "cifar10"


def test_cifar_layout_split_and_card(raw_cifar, tmp_path):
    out = tmp_path / "prepared" / "cifar10"
    card = prepare.prepare_cifar(raw_cifar, out, val_size=30, seed=0)
    train_x, train_y = data.load_cifar(out, "train")
    val_x, val_y = data.load_cifar(out, "val")
    test_x, test_y = data.load_cifar(out, "test")
    assert train_x.shape == (170, 3, 32, 32) and train_x.dtype.is_floating_point is False
    assert val_x.shape == (30, 3, 32, 32) and test_x.shape == (30, 3, 32, 32)
    assert card["counts"]["val"] == np.bincount(val_y.numpy(), minlength=10).tolist()
    assert sum(card["counts"]["train"]) == 170
    assert json.loads((out / "card.json").read_text()) == card
    # the images are the archive's, channel-major, and train + val together are the whole training set
    batch = pickle.loads((raw_cifar / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes")
    assert np.array_equal(test_x.numpy(), batch[b"data"].reshape(-1, 3, 32, 32))
    assert np.allclose(card["mean"], train_x.float().div(255).mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    # the split is a function of the seed
    other = prepare.prepare_cifar(raw_cifar, tmp_path / "other", val_size=30, seed=1)
    assert other["counts"]["val"] != card["counts"]["val"] or not np.array_equal(
        data.load_cifar(tmp_path / "other", "val")[0].numpy(), val_x.numpy())


def _rewrite_batch(raw_cifar, name, changes):
    path = raw_cifar / "cifar-10-batches-py" / name
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update(changes)
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("changes,message", [
    ({b"data": np.zeros((40, 3000), np.uint8)}, "expected N x 3072 uint8"),
    ({b"labels": [10] * 40}, r"labels outside 0..9"),
    ({b"labels": [1] * 39}, "39 labels for 40 images"),
])
def test_bad_cifar_batches_are_refused(raw_cifar, tmp_path, changes, message):
    _rewrite_batch(raw_cifar, "data_batch_3", changes)
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(StageError, match=message):
        prepare.prepare_cifar(raw_cifar, out, val_size=10, seed=0)
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("payload, message", [
    (None, "batches.meta is missing"),
    (pickle.dumps({b"num_cases_per_batch": 60}, protocol=2),
     r"batches.meta: not CIFAR-10's batches.meta \(b'label_names'\)"),
    (b"garbage", "batches.meta: not CIFAR-10's batches.meta"),
])
def test_bad_class_names_file_is_refused(raw_cifar, tmp_path, payload, message):
    meta = raw_cifar / "cifar-10-batches-py" / "batches.meta"
    meta.unlink()
    if payload is not None:
        meta.write_bytes(payload)
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(StageError, match=message):
        prepare.prepare_cifar(raw_cifar, out, val_size=10, seed=0)
    assert not out.exists()


def test_directory_replaced_in_place_keeps_nothing_of_the_old_one(tmp_path):
    from ptpipe import files

    dest = tmp_path / "prepared"
    for version in ("old", "new"):
        with files.atomic_path(dest) as staging:
            staging.mkdir()
            (staging / f"{version}.npy").write_text(version)
    assert [p.name for p in dest.iterdir()] == ["new.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary or old copy left beside it


def test_pickle_that_would_run_code_is_refused(raw_cifar, tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch pwned",))

    (raw_cifar / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(StageError, match="refusing to load"):
        prepare.prepare_cifar(raw_cifar, tmp_path / "out", val_size=10, seed=0)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("markers", [True, False])
def test_text_markers_stripped_ids_and_stats(tmp_path, markers):
    raw = tmp_path / "raw" / "alice"
    raw.mkdir(parents=True)
    (raw / "pg11.txt").write_bytes(alice_text(markers))
    stats = prepare.prepare_text(raw, tmp_path / "alice", val_fraction=0.1)
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


@pytest.mark.parametrize("content,message", [
    (b"", "holds no text"),
    (b"*** START OF X ***\n\n*** END OF X ***\n", "holds no text"),
    (b"caf\xe9 au lait", "not UTF-8"),
])
def test_bad_text_is_refused(tmp_path, content, message):
    raw = tmp_path / "raw" / "alice"
    raw.mkdir(parents=True)
    (raw / "pg11.txt").write_bytes(content)
    with pytest.raises(StageError, match=message):
        prepare.prepare_text(raw, tmp_path / "prepared" / "alice", val_fraction=0.1)
    assert not (tmp_path / "prepared").exists() or list((tmp_path / "prepared").iterdir()) == []
