"""docs/add-a-model.md's claim: a model kind is one module (here: defined in this test) plus params, and it
trains through the one loop (`ptpipe.train.train` -> `ptpipe.train.fit`), exports and validates with no
other edit. `ptpipe.kinds.KINDS` and `ptpipe.kinds.get` are monkeypatched, as a new module and its line in
KINDS would do; the rest of ptpipe is used as it is.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pydantic import Field
from torch import nn

from fixtures import write_prepared_cifar
from ptpipe import data, export, inference, kinds, train, validate
from ptpipe.params import Section


class TinyNet(nn.Module):
    """Raw uint8 images B x 3 x S x S -> logits B x classes: mean colour -> linear."""

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.float().mean((2, 3)) / 255)


class Recipe(Section):  # recipes.tiny.<name>
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float
    seed: int
    threads: int = Field(ge=0)  # train.train sets it before the kind's training runs


def training(r: Recipe, data_dir: Path, device, ddp, key: str, default_lr: float) -> train.Training:
    classes = data.load_card(data_dir)["classes"]
    (x, y), (vx, vy) = data.load_images(data_dir, "train"), data.load_images(data_dir, "val")
    model_args = {"num_classes": len(classes), "image_size": x.shape[-1]}
    train.seed_everything(r.seed)
    model = TinyNet(**model_args).to(device)

    def batches(epoch: int):
        order = torch.randperm(len(x), generator=data.epoch_generator(r.seed, epoch))
        for i in range(0, len(x), r.batch_size):
            yield x[order[i: i + r.batch_size]].to(device), y[order[i: i + r.batch_size]].to(device)

    def loss(model, batch, carry):
        images, labels = batch
        return F.cross_entropy(model(images), labels), len(labels), None

    def evaluate(model):
        return {"val/loss": F.cross_entropy(model(vx.to(device)), vy.to(device)).item()}

    return train.Training(
        model=model, optimizer=train.make_optimizer([{"params": list(model.parameters())}], "adam", r.lr),
        lr_factor=None, batches=batches, loss=loss, evaluate=evaluate,
        config={"kind": "tiny", "model_args": model_args, "params": r.model_dump(), "data": {"classes": classes}},
        epochs=r.epochs, checkpoint_every=1, clip=None, patience=None, monitor="val/loss",
        ceiling=(2 * math.log(len(classes)), "twice chance"), hint=f"lower {key}.lr", unit="img")


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    images = data.load_images(prepared_dir, "test")[0].numpy()
    return [kinds.Case(f"batch={n}", [{"images": np.ascontiguousarray(images[:n])}])
            for n in kinds.shape_params(shapes, "tiny", "batch")]


TINY = kinds.ModelKind(
    name="tiny", task="image-classification", formats=("cifar10-python", "image-folder"),
    inputs=(kinds.TensorSpec("images", "uint8", ("batch", 3, "image_size", "image_size")),),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "num_classes")),),
    build=lambda config: TinyNet(**config["model_args"]),
    example_inputs=lambda model, config: (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),),
    metadata=lambda config: {"classes": config["data"]["classes"]},
    validation_cases=validation_cases, recipe=Recipe, training=training,
)


@pytest.fixture
def tiny_kind(in_tmp, monkeypatch):
    """The kind `tiny` known to ptpipe (what its module and one word in KINDS do), and a model of it in params."""
    real_get = kinds.get
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, "tiny"))
    monkeypatch.setattr(kinds, "get", lambda name, where="the request": TINY if name == "tiny" else real_get(name, where))
    p = yaml.safe_load(Path("params.yaml").read_text())
    p["models"]["mine"] = {"kind": "tiny", "data": "cifar10", "recipe": "default"}
    p["recipes"]["tiny"] = {"default": {"epochs": 3, "batch_size": 16, "lr": 0.05, "seed": 0, "threads": 1}}
    p["validate"]["shapes"]["tiny"] = {"batch": [1, 5]}
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    write_prepared_cifar(in_tmp, n_train=64, n_val=32, n_test=32)
    return in_tmp


def test_a_kind_defined_in_one_module_trains_through_the_one_loop_exports_and_validates(tiny_kind, monkeypatch):
    fitted = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda t, *a, **k: fitted.append(t) or real_fit(t, *a, **k))

    result = train.train("mine", "data/prepared/cifar10", "models/mine/model.pt", None, "metrics/mine/train.json",
                         progress=False)
    assert len(fitted) == 1 and isinstance(fitted[0], train.Training)  # the kind's parts, run by the one loop
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    saved = kinds.load_file("models/mine/model.pt")["config"]
    assert saved["kind"] == "tiny" and saved["data"]["name"] == "cifar10"  # train adds the data set's facts
    assert saved["data"]["md5"] == data.digest("data/prepared/cifar10") and len(saved["data"]["classes"]) == 10

    export.export("models/mine", revision="test")
    report = validate.validate("models/mine", "data/prepared/cifar10", "metrics/mine/validate.json",
                               "reports/mine/validate.json")
    assert report["passed"] and {c["shape"] for c in report["checks"]} == {"batch=1", "batch=5"}

    # the torch-free runtime serves it from its metadata alone
    image = data.load_images("data/prepared/cifar10", "test")[0][0].numpy().transpose(1, 2, 0)
    Image.fromarray(image).save("one.png")
    predictions, errors = inference.predict_files(["one.png"], "models/mine/model.onnx", top_k=2)
    assert not errors and len(predictions["one.png"]) == 2
