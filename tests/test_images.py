"""ptpipe.images: load_image (every mode, sizes, limits) and read_image_folder (folder / .tar.gz / .zip,
own split, skips, errors). Tiny images written here; the whole file runs in a few seconds."""
from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptpipe import images, inference
from ptpipe.images import ImageTooLarge, UnreadableImage, load_image, read_image_folder, split_indices
from ptpipe.stage import StageError

RNG = np.random.default_rng(0)


def _pixels(w: int, h: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _image(path: Path, w: int = 20, h: int = 14) -> Path:
    return _save(path, Image.fromarray(_pixels(w, h)))


def _pets(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    """root/{classes}/{i}.{png,jpg} of mixed sizes and modes."""
    modes = ["RGB", "L", "RGBA", "P"]
    for c in classes:
        for i in range(per_class):
            mode = modes[i % len(modes)]
            img = Image.fromarray(_pixels(12 + 5 * i % 30, 40 - 3 * i % 30, {"RGB": 3, "L": 1, "RGBA": 4, "P": 1}[mode]),
                                  "L" if mode == "P" else mode)
            img = img.convert("P") if mode == "P" else img
            _save(root / c / f"{i}.{'jpg' if mode in ('RGB', 'L') else 'png'}", img)
    return root


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as archive:
        archive.add(src, arcname=arcname)
    return dest


def _zip(src: Path, dest: Path, arcname: str) -> Path:
    with zipfile.ZipFile(dest, "w") as archive:
        for path in sorted(src.rglob("*")):
            archive.write(path, f"{arcname}/{path.relative_to(src).as_posix()}")
    return dest


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, StageError)
    return message


# -- load_image ------------------------------------------------------------------------------------

def test_inference_uses_the_shared_transform():
    assert inference.load_image is images.load_image


def test_every_mode_becomes_8_bit_rgb(tmp_path):
    grey = np.full((20, 30), 77, np.uint8)
    clear = np.zeros((16, 16, 4), np.uint8)
    clear[..., 1] = 200  # green hidden under alpha 0
    palette = Image.fromarray((np.arange(1024) % 256).astype(np.uint8).reshape(32, 32), "L").convert("P")
    palette.info["transparency"] = 0
    deep = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    cases = {
        "grey.png": (Image.fromarray(grey), lambda x: (x == 77).all()),
        "grey_alpha.png": (Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), "LA"), lambda x: (x == 255).all()),
        "clear.png": (Image.fromarray(clear, "RGBA"), lambda x: (x == 255).all()),  # white, not the hidden green
        "palette.png": (palette, lambda x: x[0, 0, 0] == 255 and x[0, 0, 1] == 1),  # index 0 (black) is transparent
        "cmyk.jpg": (Image.new("CMYK", (40, 40), (0, 255, 255, 0)), lambda x: x[0].mean() > 200 > 50 > x[1].mean()),
        "deep.png": (Image.fromarray(deep), lambda x: 100 < x.mean() < 155 and x.min() < 10),  # 16 bit, scaled
        "bilevel.png": (Image.new("1", (33, 33), 1), lambda x: (x == 255).all()),
    }
    for name, (img, check) in cases.items():
        _save(tmp_path / name, img)
        x = load_image(tmp_path / name)
        assert x.shape == (3, 32, 32) and x.dtype == np.uint8, name
        assert check(x), name
        assert (x[0] == x[1]).all() or name == "cmyk.jpg", f"{name}: grey should stay grey"


def test_any_size_is_cropped_to_its_centre_square_then_resized(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # only the centre square is white: the crop keeps it, the sides go
    _save(tmp_path / "wide.png", Image.fromarray(wide))
    assert (load_image(tmp_path / "wide.png", size=8) == 255).all()
    for size in (8, 16, 48):
        for w, h in ((7, 50), (64, 64), (100, 3)):
            assert load_image(_image(tmp_path / f"{w}x{h}.png", w, h), size).shape == (3, size, size)
    same = _pixels(16, 16)
    _save(tmp_path / "same.png", Image.fromarray(same))
    np.testing.assert_array_equal(load_image(tmp_path / "same.png", 16), same.transpose(2, 0, 1))  # passed through


def test_a_big_jpeg_is_decoded_at_reduced_scale_changing_less_than_another_filter_would(tmp_path):
    texture = Image.fromarray(_pixels(50, 38)).resize((500, 375), Image.BICUBIC)  # detail near 32 px: the worst case
    _save(tmp_path / "photo.jpg", texture, quality=90)
    with Image.open(tmp_path / "photo.jpg") as img:
        img.draft("RGB", (128, 128))
        assert img.size == (250, 188)  # 1/2 scale: 188 >= JPEG_DRAFT_GAP (4) x 32 on the short side

    def full_decode(resample):
        img = Image.open(tmp_path / "photo.jpg").convert("RGB").crop((62, 0, 437, 375))
        return np.asarray(img.resize((32, 32), resample)).transpose(2, 0, 1).astype(int)

    bicubic, lanczos = full_decode(Image.BICUBIC), full_decode(Image.LANCZOS)
    assert 0 < np.abs(load_image(tmp_path / "photo.jpg") - bicubic).mean() < np.abs(lanczos - bicubic).mean()


def test_unreadable_and_too_large_are_one_line_errors(tmp_path):
    (tmp_path / "fake.jpg").write_text("not an image")
    with pytest.raises(UnreadableImage, match="fake.jpg: not a readable image") as err:
        load_image(tmp_path / "fake.jpg")
    _one_line(err)
    _image(tmp_path / "small.png", 40, 40)
    with pytest.raises(ImageTooLarge, match=r"small.png: image too large: 40 x 40 = 1,600 pixels, above the limit of 1,000") as err:
        load_image(tmp_path / "small.png", max_pixels=1000)
    _one_line(err)


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (the pixels would be w * h * 3 bytes) and whose data is 1 x 1."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # 8,000 x 8,000 = 64 MP: over MAX_PIXELS (50 MP), under Pillow's own guard (89 MP warning, 179 MP error)
    (tmp_path / "bomb.png").write_bytes(_bomb_png(8000, 8000))
    with pytest.raises(ImageTooLarge, match="bomb.png: image too large: 8000 x 8000 = 64,000,000 pixels, above the limit of 50,000,000"):
        load_image(tmp_path / "bomb.png")
    root = _pets(tmp_path / "pets")
    (root / "cat" / "bomb.png").write_bytes(_bomb_png(8000, 8000))
    with pytest.raises(ImageTooLarge, match="cat/bomb.png: image too large: 8000 x 8000") as err:  # refused, not skipped
        read_image_folder(root, 16)
    _one_line(err)


# -- read_image_folder -------------------------------------------------------------------------------

def test_a_folder_its_tar_its_tar_gz_and_its_zip_give_identical_arrays(tmp_path):
    root = _pets(tmp_path / "my-pets")
    sources = [root, _tar(root, tmp_path / "pets.tar.gz", "my-pets"), _zip(root, tmp_path / "pets.zip", "my-pets")]
    with tarfile.open(tmp_path / "pets.tar", "w") as archive:  # plain: members read in place, by offset
        archive.add(root, arcname="my-pets")
    sources.append(tmp_path / "pets.tar")
    read = [read_image_folder(s, 16, val_fraction=0.25, test_fraction=0.25, seed=3) for s in sources]
    for other in read[1:]:
        assert other.classes == read[0].classes == ["cat", "dog", "fox"]
        assert other.files == read[0].files
        for split in images.SPLITS:
            np.testing.assert_array_equal(other.images[split], read[0].images[split])
            np.testing.assert_array_equal(other.labels[split], read[0].labels[split])
    assert read[0].counts() == {"train": [2, 2, 2], "val": [1, 1, 1], "test": [1, 1, 1]}
    assert read[0].images["train"].shape == (6, 3, 16, 16) and read[0].own_split == ()
    assert all(f.startswith(("cat/", "dog/", "fox/")) for f in read[0].files["train"])  # my-pets/ stripped


def test_each_image_is_load_image_of_its_file(tmp_path):
    root = _pets(tmp_path / "pets")
    got = read_image_folder(root, 24, val_fraction=0, test_fraction=0)
    for x, f in zip(got.images["train"], got.files["train"]):
        np.testing.assert_array_equal(x, load_image(root / f, 24))


def test_the_seeded_split_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(3), [50, 30, 20]).astype(np.uint8)
    a, b = split_indices(labels, 0.1, 0.2, seed=0), split_indices(labels, 0.1, 0.2, seed=0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert [np.bincount(labels[a[s]]).tolist() for s in ("train", "val", "test")] == [[35, 21, 14], [5, 3, 2], [10, 6, 4]]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(100))  # a partition
    assert not np.array_equal(split_indices(labels, 0.1, 0.2, seed=1)["test"], a["test"])
    with pytest.raises(StageError, match="class 'b' has 2 images: too few") as err:
        split_indices(np.array([0, 0, 0, 1, 1]), 0.1, 0.1, 0, classes=["a", "b"])
    _one_line(err)


def test_an_own_train_test_split_is_kept_and_val_carved_from_train(tmp_path):
    root = tmp_path / "data"
    _pets(root / "train", per_class=5)
    _pets(root / "test", per_class=2)
    (root / "README.md").write_text("my data")
    got = read_image_folder(root, 8, val_fraction=0.2, test_fraction=0.5, seed=0)  # test_fraction unused
    assert got.own_split == ("train", "test")
    assert got.counts() == {"train": [4, 4, 4], "val": [1, 1, 1], "test": [2, 2, 2]}
    assert all(f.startswith("test/") for f in got.files["test"]) and got.skipped == {images.OUTSIDE: 1}
    _pets(root / "val", per_class=1)
    got = read_image_folder(_tar(root, tmp_path / "d.tgz", "data"), 8)
    assert got.own_split == ("train", "val", "test") and got.counts()["val"] == [1, 1, 1]


def test_skipped_files_are_counted_by_reason(tmp_path):
    root = _pets(tmp_path / "pets", per_class=400)  # 1,200 images: 1% is 12 bad files
    for name in (".DS_Store", "cat/.DS_Store", "cat/._0.png", "__MACOSX/cat/._1.png", ".git/config"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"junk")
    (root / "README.md").write_text("outside class folders")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "fox" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    _image(root / "fox" / "deeper" / "still_fox.png")  # below a class folder: still that class
    got = read_image_folder(root, 8, val_fraction=0, test_fraction=0)
    assert got.skipped == {images.HIDDEN: 5, images.OUTSIDE: 1, images.NOT_IMAGE: 1, images.EMPTY: 1,
                           images.UNREADABLE: 1}
    assert got.examples[images.UNREADABLE] == ["fox/broken.jpg"] and got.counts()["train"] == [400, 400, 401]


def test_too_many_bad_files_refuse_the_folder(tmp_path):
    root = _pets(tmp_path / "pets", per_class=4)
    for i in range(11):  # 11 > 10 files and 11 > 1% of 23
        (root / "cat" / f"scan{i}.heic").write_bytes(b"x")
    with pytest.raises(StageError, match=r"11 of 23 files in class folders are not usable images "
                                         r"\(11 not an image \(.heic x11\)\): more than 1% and more than 10") as err:
        read_image_folder(root, 8)
    _one_line(err)
    for i in range(10):  # unreadable ones found while decoding count too
        (root / "dog" / f"cut{i}.png").write_bytes(b"\x89PNG broken")
    (root / "cat" / "scan0.heic").unlink()
    for i in range(1, 11):
        (root / "cat" / f"scan{i}.heic").unlink()
    (root / "dog" / "cut10.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(StageError, match=r"11 unreadable \(e.g. dog/cut"):
        read_image_folder(root, 8, val_fraction=0, test_fraction=0)


@pytest.mark.parametrize("make, expected", [
    (lambda r: _pets(r, classes=("cat",)), r"found 1 class folder \(cat\): at least 2 are needed"),
    (lambda r: (_pets(r), (r / "owl").mkdir()), r"class folder owl holds no images"),
    (lambda r: (_pets(r), (r / "owl").mkdir(), (r / "owl" / "a.txt").write_text("x")), r"class folder owl holds no"),
    (lambda r: [(r / c).mkdir(parents=True) or (r / c / "a.txt").write_text("x") for c in "ab"],
     r"holds no images \(2 not an image\): expected class folders of images"),
    (lambda r: r.mkdir(), r"holds no images \(no files at all\)"),
    (lambda r: (_pets(r / "train"), _pets(r / "test", classes=("cat", "dog"))),
     r"the split folders hold different classes \(test/ lacks fox\): give train/ and test/ the same class folders"),
    (lambda r: (_pets(r / "train"), _pets(r / "val")), r"top-level folders train, val mix split names"),
    (lambda r: (_pets(r / "train"), _pets(r / "test"), _pets(r / "extra")), r"top-level folders extra, test, train mix"),
])
def test_layout_errors_are_one_line_naming_the_fix(tmp_path, make, expected):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(StageError, match=expected) as err:
        read_image_folder(root, 8)
    assert _one_line(err).startswith(str(root))


def test_an_empty_class_folder_in_an_archive_is_an_error(tmp_path):
    root = _pets(tmp_path / "pets")
    (root / "owl").mkdir()
    for archive in (_tar(root, tmp_path / "p.tar", "pets"), _zip(root, tmp_path / "p.zip", "pets")):
        with pytest.raises(StageError, match="class folder owl holds no images"):
            read_image_folder(archive, 8)


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    root = _pets(path.parent / "src")
    with tarfile.open(path, "w") as archive:
        archive.add(root, arcname="pets")
        archive.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("name, kind, expected", [
    ("pets/cat/link.png", tarfile.SYMTYPE, "is a link"),
    ("pets/cat/hard.png", tarfile.LNKTYPE, "is a link"),
    ("pets/cat/dev", tarfile.CHRTYPE, "is a device or special file"),
    ("pets/cat/fifo", tarfile.FIFOTYPE, "is a device or special file"),
    ("../escape.png", tarfile.REGTYPE, "points outside the archive's folder"),
    ("/etc/escape.png", tarfile.REGTYPE, "points outside the archive's folder"),
])
def test_unsafe_tar_members_are_refused(tmp_path, name, kind, expected):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    data = b"x" if kind == tarfile.REGTYPE else b""
    member.size = len(data)
    archive = _tar_with(tmp_path / "bad.tar", member, data)
    with pytest.raises(StageError, match=f"refusing to read .*bad.tar: member {name!r} {expected}") as err:
        read_image_folder(archive, 8)
    _one_line(err)


def test_unsafe_zip_members_are_refused(tmp_path):
    root = _pets(tmp_path / "pets")
    link = zipfile.ZipInfo("pets/cat/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP stores a symlink: the target as data
    for member, expected in ((link, "is a link"), (zipfile.ZipInfo("../up.png"), "points outside")):
        path = _zip(root, tmp_path / "bad.zip", "pets")
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(member, b"/etc/passwd")
        with pytest.raises(StageError, match=expected):
            read_image_folder(path, 8)


def test_a_folder_holding_only_an_archive_reads_the_archive(tmp_path):
    root = _pets(tmp_path / "pets")
    (tmp_path / "raw").mkdir()
    _tar(root, tmp_path / "raw" / "pets.tar.gz", "pets")
    got = read_image_folder(tmp_path / "raw", 8)
    assert got.classes == ["cat", "dog", "fox"] and sum(map(sum, got.counts().values())) == 12


def test_file_links_in_a_folder_are_followed(tmp_path):
    # DVC's symlink cache type makes every tracked file a link into .dvc/cache
    root = _pets(tmp_path / "pets")
    _image(tmp_path / "elsewhere.png").rename(tmp_path / "target.png")
    (root / "cat" / "linked.png").symlink_to(tmp_path / "target.png")
    (root / "dog" / "loop").symlink_to(root, target_is_directory=True)
    got = read_image_folder(root, 8, val_fraction=0, test_fraction=0)
    assert "cat/linked.png" in got.files["train"] and got.skipped == {images.FOLDER_LINK: 1}


def test_two_worker_processes_give_the_same_arrays_and_report_progress(tmp_path):
    root = _pets(tmp_path / "pets", per_class=100)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    seen = []
    one = read_image_folder(root, 8)
    two = read_image_folder(_tar(root, tmp_path / "p.tgz", "pets"), 8, workers=2,
                            progress=lambda done, total: seen.append((done, total)))
    for split in images.SPLITS:
        np.testing.assert_array_equal(one.images[split], two.images[split])
    assert two.skipped == one.skipped == {images.UNREADABLE: 1} and seen[-1] == (301, 301)
    assert images.worker_count(0, 300) == 1 and images.worker_count(3, 10) == 3  # a few hundred: no processes
