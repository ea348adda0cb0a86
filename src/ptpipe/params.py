"""The schema of `params.yaml`: every stage validates the whole file here before it writes anything.

Unknown keys, wrong types and out-of-range values raise `StageError` naming the key, e.g.
`params.yaml: lr: Input should be greater than 0 (got -0.1)`. Defaults live in
params.yaml alone; the models below only say what is allowed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptpipe.stage import StageError

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    # Strict: `epochs: 2.5` or `epochs: "3"` is an error naming the key, not a silent coercion.
    # Float fields say `strict=False` because YAML reads `1e-3` as a string and `1` as an int.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _url(value: str) -> str:
    if not re.match(r"^(https?|file)://", value):
        raise ValueError("must start with http://, https:// or file://")
    return value


def _md5(value: str) -> str:
    if value and not re.fullmatch(r"[0-9a-f]{32}", value):
        raise ValueError("must be 32 lowercase hex digits, or empty to skip the check")
    return value



class Source(Section):
    url: Annotated[str, AfterValidator(_url)]
    md5: Annotated[str, AfterValidator(_md5)]


class Download(Section):
    retries: int = Field(ge=0, le=20)
    timeout_s: Annotated[float, Field(gt=0, strict=False)]
    cifar10: Source
    alice: Source


class PrepareCifar(Section):
    val_size: int = Field(ge=1, le=25000)  # the CNN trainer validates every epoch
    seed: int


class PrepareAlice(Section):
    val_fraction: Annotated[float, Field(gt=0, lt=0.5, strict=False)]


class Prepare(Section):
    cifar10: PrepareCifar
    alice: PrepareAlice


class Train(Section):
    """Plumbing shared by both trainers."""

    device: Literal["auto", "cpu", "cuda", "mps"]
    nproc: int = Field(ge=1, le=64)


class CnnRecipe(Section):
    """One CIFAR-10 training recipe (`cnn.recipes.<name>`); units and reasons are in params.yaml."""

    arch: Literal["lenet", "airbench"]
    model_args: dict[str, Union[bool, int, float, list[int]]]  # checked against the arch by ptpipe.cnn.build_model
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=2, le=65536)
    drop_last: bool  # drop each epoch's last, partial batch (airbench94 does)
    train_split: Literal["train", "train+val"]
    validation: Literal["auto", "always", "never"]  # per-epoch validation; auto = when train_split holds val out
    checkpoint_every: int = Field(ge=1, le=1000)  # epochs between checkpoints
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"]
    lr: Optional[Annotated[float, Field(gt=0, strict=False)]]  # null: the top-level lr
    momentum: Annotated[float, Field(ge=0, lt=1, strict=False)]
    nesterov: bool
    weight_decay: Annotated[float, Field(ge=0, lt=1, strict=False)]
    bias_lr_scale: Annotated[float, Field(gt=0, le=1000, strict=False)]
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1, strict=False)]
    initial_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    final_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1, strict=False)]
    lookahead: bool
    whiten_bias_epochs: int = Field(ge=0)
    translate: int = Field(ge=0, le=8)
    flip: Literal["none", "random", "alternate"]
    mean: Optional[list[Annotated[float, Field(ge=0, le=1, strict=False)]]] = Field(min_length=3, max_length=3)
    std: Optional[list[Annotated[float, Field(gt=0, le=1, strict=False)]]] = Field(min_length=3, max_length=3)
    tta: int = Field(ge=0, le=2)
    compile: Literal["auto", "always", "never"]
    autocast: Literal["auto", "bfloat16", "none"]  # auto = bfloat16 on a GPU, none (float32) elsewhere
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    seed: int


class Cnn(Section):
    recipe: str
    recipes: dict[str, CnnRecipe]

    @model_validator(mode="after")
    def _recipe_exists(self) -> "Cnn":
        if self.recipe not in self.recipes:
            raise ValueError(f"recipe {self.recipe!r} is not one of cnn.recipes: {sorted(self.recipes)}")
        return self

    @property
    def selected(self) -> CnnRecipe:
        return self.recipes[self.recipe]


class LstmSample(Section):
    """Text the `evaluate_lstm` stage generates from the trained model."""

    prompt: str = Field(min_length=1)
    length: int = Field(ge=1, le=100_000)
    seed: int
    temperatures: list[Annotated[float, Field(ge=0, strict=False)]] = Field(min_length=1)


class Lstm(Section):
    """The character-level LSTM (`train_lstm`, `evaluate_lstm`)."""

    embedding_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1, le=16)
    dropout: Annotated[float, Field(ge=0, lt=1, strict=False)]
    tie_weights: bool
    seq_len: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    clip: Optional[Annotated[float, Field(gt=0, strict=False)]]
    lr: Optional[Annotated[float, Field(gt=0, le=10, strict=False)]]
    optimizer: Literal["adam", "adamw", "sgd"]
    weight_decay: Annotated[float, Field(ge=0, strict=False)]
    schedule: Literal["constant", "cosine"]
    patience: Optional[int] = Field(ge=1)
    seed: int
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    eval_streams: int = Field(ge=1)
    sample: LstmSample

    @model_validator(mode="after")
    def _tie_needs_equal_sizes(self) -> "Lstm":
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError("tie_weights: true needs embedding_size == hidden_size "
                             f"(got {self.embedding_size} and {self.hidden_size})")
        return self


class Export(Section):
    # 17: the floor, and what onnxruntime >= 1.14 runs; the legacy exporter stops at 20.
    opset: int = Field(ge=17, le=20)


Sizes = list[Annotated[int, Field(ge=1)]]


class Validate(Section):
    atol: Annotated[float, Field(gt=0, le=1, strict=False)]
    # per model kind: {size name: sizes}; which names a kind reads is its own (ptpipe.kinds.<kind>)
    shapes: dict[str, dict[str, Annotated[Sizes, Field(min_length=1)]]]

    @model_validator(mode="after")
    def _known_kinds(self) -> "Validate":
        from ptpipe import kinds

        unknown = sorted(set(self.shapes) - set(kinds.known()))
        if unknown:
            raise ValueError(f"shapes.{unknown[0]}: unknown model kind (known kinds are {', '.join(kinds.known())})")
        return self


class Params(Section):
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]
    download: Download
    prepare: Prepare
    train: Train
    cnn: Cnn
    lstm: Lstm
    export: Export
    # `validate` would shadow pydantic's BaseModel.validate: the attribute is `validation`.
    validation: Validate = Field(alias="validate")


def _describe(err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling and section)"
    if err["type"] == "missing":
        return f"{key}: missing"
    return f"{key}: {err['msg']} (got {err['input']!r})"


def parse(raw: object, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(e)}" for e in exc.errors()]
        raise StageError("invalid params\n  " + "\n  ".join(lines)) from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} not found: run from the repository root") from None
    except yaml.YAMLError as exc:
        raise StageError(f"{path} is not valid YAML: {exc}") from None
    return parse(raw, str(path))
