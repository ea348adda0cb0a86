"""Issue 21's stories as a user types them (docs/own-data.md): a folder of their own images and a text of
their own, named in params.yaml only, through the real `dvc` (download, prepare, train, evaluate, export,
validate), `ptpipe predict/generate`, `ptpipe serve` and the registry, beside the tutorial's models.

Tiny data made here: three classes of images whose colour says the class (mixed sizes and modes), a
few KB of text. The tutorial's data sets are never downloaded: only the user's stages run.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures import ALICE_BODY, TINY_TRAINING, copy_project, sh, tool_env, write_params
from ptpipe import params, prepare
from ptpipe.stage import StageError

COLOURS = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fox": (50, 70, 210)}


def make_pets(root: Path, per_class: int = 24) -> Path:
    """my-pets/{cat,dog,fox}/ with PNGs and JPEGs of mixed sizes and modes (RGB, L, RGBA, P), a README at the
    top and a .DS_Store (both skipped): each image a noisy field of its class's colour."""
    rng = np.random.default_rng(0)
    folder = root / "my-pets"
    for cls, colour in COLOURS.items():
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = [(32, 32), (48, 40), (100, 75), (20, 28)][i % 4]
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            mode, ext = [("RGB", "png"), ("RGB", "jpg"), ("RGBA", "png"), ("P", "png")][i % 4]
            img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE)
            img.save(folder / cls / f"{i:03d}.{ext}")
    (folder / "README.txt").write_text("my pets\n")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0\1")
    return folder


def user_project(tmp_path: Path) -> Path:
    repo = copy_project(tmp_path / "repo")
    write_params(repo, **TINY_TRAINING)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "tiny recipes", cwd=repo)
    return repo


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=repo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(repo: Path, request) -> str:
    """`ptpipe serve` of the workspace's exported models on a free loopback port; its URL once ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ptpipe.cli", "serve", "--port", str(port)], cwd=repo,
                            env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    request.addfinalizer(lambda: (proc.terminate(), proc.wait(30)))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # bounded: 60 s
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("ptpipe serve did not get ready")


@pytest.mark.slow
def test_own_images_from_params_alone(tmp_path, request):
    repo = user_project(tmp_path)
    pets = make_pets(tmp_path)
    write_params(repo, **{
        "datasets.my-pets": {"format": "image-folder", "url": pets.as_uri(), "md5": "", "image_size": 32,
                             "val_fraction": 0.15, "test_fraction": 0.15, "seed": 0},
        "models.pets": {"kind": "cnn", "data": "my-pets", "recipe": "default"},
        "recipes.cnn.default.epochs": 5, "recipes.cnn.default.batch_size": 8, "recipes.cnn.default.lr": 0.005,
    })
    changed = sh("git", "diff", "--stat", cwd=repo).stdout
    assert changed.strip().splitlines()[0].split("|")[0].strip() == "params.yaml" and "1 file changed" in changed

    out = dvc(repo, "repro", "validate@pets", "evaluate@pets").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"download@my-pets", "prepare@my-pets", "train@pets", "export@pets", "validate@pets",
                   "evaluate@pets"}  # the tutorial's data is never fetched
    card = json.loads((repo / "data/prepared/my-pets/card.json").read_text())
    assert card["classes"] == ["cat", "dog", "fox"] and card["image_size"] == 32
    assert card["skipped"] == {"outside class folders": 1, "hidden or system file": 1}
    assert sum(map(sum, card["counts"].values())) == 72
    metrics = json.loads((repo / "metrics/pets/evaluate.json").read_text())
    assert set(metrics["per_class_acc"]) == {"cat", "dog", "fox"}
    assert metrics["test"]["acc"] > 0.6  # three colours: learnable in a few tiny epochs (chance is 1/3)
    model = yaml.safe_load(json.dumps(__import__("torch").load(repo / "models/pets/model.pt",
                                                               weights_only=True)["config"]["data"]))
    assert model["name"] == "my-pets" and model["classes"] == ["cat", "dog", "fox"] and len(model["md5"]) == 32
    # export@pets recorded the drift reference of the user's validation split inside model.onnx
    from ptpipe import drift

    reference = drift.load_reference(repo / "models/pets")
    assert reference["classes"] == ["cat", "dog", "fox"] and sum(reference["label_counts"]) == reference["n"]
    assert reference["n"] == sum(card["counts"]["val"])

    # predict and serve answer in the user's class names
    dog = pets / "dog" / "001.jpg"
    shown = json.loads(sh(sys.executable, "-m", "ptpipe.cli", "predict", "--model", "pets", "--json", str(dog),
                          cwd=repo).stdout)
    assert shown["predictions"][str(dog)][0]["label"] == "dog"
    url = served(repo, request)
    listed = httpx.get(f"{url}/v1/models").json()
    assert "pets" in json.dumps(listed)
    answer = httpx.post(f"{url}/v1/models/pets/classify", files={"images": ("x.png", dog.read_bytes())}).json()
    assert answer["predictions"][0]["labels"][0]["label"] == "dog"

    # released in the registry under the user's name, with no dvc.yaml edit
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-f", "-d", "storage", str(remote))
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pets", cwd=repo)
    sh(sys.executable, "-m", "ptpipe.cli", "release", "pets", "v1.0.0", cwd=repo)
    versions = sh(sys.executable, "-m", "ptpipe.cli", "versions", "pets", cwd=repo).stdout
    assert versions.startswith("v1.0.0")


@pytest.mark.slow
def test_own_text_side_by_side_and_removed(tmp_path):
    repo = user_project(tmp_path)
    text = tmp_path / "poem.txt"
    text.write_text(("Tyger Tyger, burning bright, In the forests of the night; "
                     "What immortal hand or eye, Could frame thy fearful symmetry?\n") * 40, encoding="utf-8")
    write_params(repo, **{
        "datasets.poem": {"format": "text", "url": text.as_uri(), "md5": "", "gutenberg": False,
                          "val_fraction": 0.1},
        "models.poem-lstm": {"kind": "lstm", "data": "poem", "recipe": "default"},
        "models.poem-gpt": {"kind": "gpt", "data": "poem", "recipe": "default"},
    })
    dvc(repo, "repro", "evaluate@poem-lstm", "evaluate@poem-gpt", "validate@poem-gpt")
    samples = (repo / "reports/poem-lstm/evaluate/samples.txt").read_text()
    assert "prompt 'Tyger Tyg" in samples  # the default prompt: the validation text's first 10 characters
    for model in ("poem-lstm", "poem-gpt"):
        assert json.loads((repo / f"metrics/{model}/evaluate.json").read_text())["val_bits_per_char"] > 0
    generated = sh(sys.executable, "-m", "ptpipe.cli", "generate", "--model", "poem-gpt", "--prompt", "Tyger",
                   "--length", "20", "--backend", "onnx", cwd=repo).stdout
    assert generated.startswith("Tyger") and len(generated.strip()) >= 25

    # removing one model leaves the other up to date
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "poems", cwd=repo)
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    del doc["models"]["poem-gpt"]
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    status = dvc(repo, "status", "evaluate@poem-lstm", "--json").stdout
    assert json.loads(status or "{}") == {}


def test_a_model_on_data_its_kind_cannot_take_stops_at_the_params(tmp_path, monkeypatch):
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    doc["models"]["wrong"] = {"kind": "lstm", "data": "cifar10", "recipe": "default"}
    doc["models"]["tiny-lenet"] = {"kind": "cnn", "data": "small", "recipe": "tutorial"}
    doc["datasets"]["small"] = {"format": "image-folder", "url": "file:///x", "md5": "", "image_size": 12,
                                "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    with pytest.raises(StageError) as err:
        params.parse(doc)
    lines = str(err.value).splitlines()
    assert any("models.wrong.data: 'cifar10' is cifar10-python data, and a lstm model trains on text" in l
               for l in lines)
    assert any("models.tiny-lenet: recipes.cnn.tutorial on datasets.small: image_size 12 is too small for arch "
               "lenet (at least 16)" in l for l in lines)


def test_prepare_reads_an_image_folder_archive_into_the_images_layout(tmp_path):
    pets = make_pets(tmp_path, per_class=10)
    raw = tmp_path / "raw"
    raw.mkdir()
    sh("tar", "czf", str(raw / "my-pets.tar.gz"), "-C", str(tmp_path), "my-pets", cwd=tmp_path)
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    doc["datasets"]["my-pets"] = {"format": "image-folder", "url": "file:///x.tar.gz", "md5": "",
                                  "image_size": 24, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    card = prepare.prepare("my-pets", raw, tmp_path / "prepared", tmp_path / "params.yaml")
    assert card["classes"] == ["cat", "dog", "fox"] and card["image_size"] == 24
    images = {s: np.load(tmp_path / "prepared" / f"{s}_images.npy") for s in ("train", "val", "test")}
    assert sum(len(x) for x in images.values()) == 30 and all(x.shape[1:] == (3, 24, 24) for x in images.values())
    assert [sum(card["counts"][s]) for s in ("val", "test")] == [len(images["val"]), len(images["test"])]
    assert card["split"] == "seeded (3)" and pets.exists()
    assert abs(card["mean"][0] - np.mean([c[0] for c in COLOURS.values()]) / 255) < 0.1


def test_one_class_is_refused_naming_the_data_set(tmp_path):
    (tmp_path / "only" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "cat" / "1.png")
    raw = tmp_path / "raw"
    raw.mkdir()
    sh("tar", "cf", str(raw / "only.tar"), "-C", str(tmp_path), "only", cwd=tmp_path)
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    doc["datasets"]["only"] = {"format": "image-folder", "url": "file:///x.tar", "md5": "", "image_size": 32,
                               "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=r"^datasets\.only: .*found 1 class folder \(cat\): at least 2"):
        prepare.prepare("only", raw, tmp_path / "prepared", tmp_path / "params.yaml")
    assert not (tmp_path / "prepared").exists()


def test_a_sample_prompt_outside_the_texts_characters_names_the_key_and_writes_nothing(tmp_path):
    from fixtures import write_models, write_prepared
    from ptpipe import evaluate

    write_prepared(tmp_path)
    write_models(tmp_path / "models")  # model files recording the prepared data's md5
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    doc["evaluate"]["sample"]["prompt"] = "Zebra§"  # 'Z' and '§' never occur in the text
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    metrics, reports = tmp_path / "metrics/lstm/evaluate.json", tmp_path / "reports/lstm/evaluate"
    with pytest.raises(StageError, match=r"^params.yaml: evaluate.sample.prompt 'Zebra§': characters not in the "
                                         r"model's vocabulary: '(§Z|Z§)'"):
        evaluate.evaluate(tmp_path / "data/prepared/alice", tmp_path / "models/lstm/model.pt", metrics, reports,
                          tmp_path / "params.yaml")
    assert not metrics.exists() and not reports.exists()
