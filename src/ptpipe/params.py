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
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic import StrictBool, StrictInt, StrictStr  # the tune section's values

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
    model_args: dict[str, Union[bool, int, float, list[int]]]  # checked against the arch by ptpipe.kinds.cnn.build_model
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=2, le=65536)
    drop_last: bool  # drop each epoch's last, partial batch (airbench94 does)
    train_split: Literal["train", "train+val"]
    validation: Literal["auto", "always", "never"]  # per-epoch validation; auto = when train_split holds val out
    checkpoint_every: int = Field(ge=1, le=1000)  # epochs between checkpoints
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"]
    lr: Optional[Annotated[float, Field(gt=0, le=10, strict=False)]]  # null: the top-level lr
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
            raise ValueError(f"recipe {self.recipe!r} is not one of cnn.recipes ({', '.join(sorted(self.recipes))})")
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
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]  # its own: train_lstm does not read the top-level lr
    optimizer: Literal["adam", "adamw", "sgd"]
    weight_decay: Annotated[float, Field(ge=0, lt=1, strict=False)]
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


class Gpt(Section):
    """The character-level transformer (`train_gpt`); units and reasons are in params.yaml."""

    block_size: int = Field(ge=1, le=65536)
    n_layer: int = Field(ge=1, le=64)
    n_head: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    dropout: Annotated[float, Field(ge=0, lt=1, strict=False)]
    init_std: Annotated[float, Field(gt=0, le=1, strict=False)]
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    steps_per_epoch: int = Field(ge=1)
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]  # its own: train_gpt does not read the top-level lr
    weight_decay: Annotated[float, Field(ge=0, strict=False)]
    beta2: Annotated[float, Field(ge=0, lt=1, strict=False)]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1, strict=False)]
    initial_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    final_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    clip: Optional[Annotated[float, Field(gt=0, strict=False)]]
    patience: Optional[int] = Field(ge=1)
    seed: int
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    eval_stride: int = Field(ge=1)

    @model_validator(mode="after")
    def _shapes_fit(self) -> "Gpt":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.eval_stride > self.block_size:
            raise ValueError(f"eval_stride ({self.eval_stride}) must be at most block_size ({self.block_size}): "
                             f"windows further apart would leave characters unscored")
        return self


class Export(Section):
    # 17: the floor, and what onnxruntime >= 1.14 runs; the legacy exporter stops at 20.
    opset: int = Field(ge=17, le=20)


Sizes = list[Annotated[int, Field(ge=1)]]


class Validate(Section):
    atol: Annotated[float, Field(gt=0, le=1, strict=False)]
    # per model kind: {size name: sizes}; which names a kind reads is its own (ptpipe.kinds.<kind>)
    shapes: dict[str, dict[str, Annotated[Sizes, Field(min_length=1)]]]

    @field_validator("shapes")
    @classmethod
    def _known_kinds(cls, shapes: dict) -> dict:
        from ptpipe import kinds

        unknown = sorted(set(shapes) - set(kinds.known()))
        if unknown:
            raise ValueError(f"unknown model kind {unknown[0]!r} (known kinds are {', '.join(kinds.known())})")
        return shapes


# -- tune: an Optuna study over `dvc exp run` (ptpipe.tune, docs/tune.md) ----------------------------
# Params are named by their dotted path in params.yaml; ptpipe.tune checks each one against the file
# itself (the key exists, its range ends and choices pass this schema) before any trial runs.

Scalar = Union[StrictBool, StrictInt, Annotated[float, Field(strict=True)], StrictStr, None]
Number = Union[StrictInt, Annotated[float, Field(strict=False)]]  # YAML reads 1e-3 as a string


class Distribution(Section):
    """One searched param: Optuna's suggest_float / suggest_int / suggest_categorical arguments."""

    type: Literal["float", "int", "categorical"]
    low: Optional[Number] = None
    high: Optional[Number] = None
    log: bool = False   # sample the log of the value uniformly (learning rates, weight decays)
    step: Optional[Number] = None  # grid spacing within [low, high]; not with log
    choices: Optional[list[Scalar]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "Distribution":
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical param takes `choices` only (no low, high, log, step)")
            if not self.choices:
                raise ValueError("empty choices: list at least one value")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat a value")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} range takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"an int range needs whole numbers (got low {self.low}, high {self.high}"
                             + (f", step {self.step})" if self.step is not None else ")"))
        if self.low >= self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together (Optuna samples one or the other)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        return self


class TuneMetric(Section):
    file: str = Field(min_length=1)  # a metrics file a trial's experiment records (`dvc exp show` reads it)
    key: str = Field(min_length=1)   # dotted path inside it, e.g. val.bits_per_char


class TunePrune(Section):
    curve: str = Field(min_length=1)  # DVCLive's per-epoch TSV (step, value) of the metric, below the repo root
    pruner: Literal["median", "threshold", "none"]  # none: the curve is recorded, no trial is stopped
    startup_trials: int = Field(ge=0)  # median: trials that finish before any is pruned
    warmup_epochs: int = Field(ge=0)   # epochs every trial runs before it may be pruned
    threshold: Optional[Annotated[float, Field(strict=False)]] = None  # threshold: worse than this stops

    @model_validator(mode="after")
    def _threshold_given(self) -> "TunePrune":
        if (self.pruner == "threshold") != (self.threshold is not None):
            raise ValueError("threshold is needed with pruner: threshold, and only then")
        return self


class Tune(Section):
    """`ptpipe tune`: an Optuna study, one `dvc exp run` per trial (units and reasons in params.yaml)."""

    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # trial n is experiment <study>-<n>
    targets: list[str] = Field(min_length=1)  # stages a trial reproduces (and what they depend on)
    metric: TuneMetric
    direction: Literal["minimize", "maximize"]
    trials: int = Field(ge=1, le=100_000)
    seed: int  # the sampler's
    prune: Optional[TunePrune]  # null: every trial runs to its end
    fixed: dict[str, Union[Scalar, list[Scalar]]]  # overrides every trial gets, as after `dvc exp run -S`
    space: dict[str, Distribution] = Field(min_length=1)

    @model_validator(mode="after")
    def _disjoint(self) -> "Tune":
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ValueError(f"{both[0]} is both fixed and searched: keep it in one of tune.fixed, tune.space")
        return self


class Params(Section):
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]
    download: Download
    prepare: Prepare
    train: Train
    cnn: Cnn
    lstm: Lstm
    gpt: Gpt
    export: Export
    # `validate` would shadow pydantic's BaseModel.validate: the attribute is `validation`.
    validation: Validate = Field(alias="validate")
    tune: Optional[Tune] = None  # `ptpipe tune`'s search; absent: no study to run


def _describe(err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling and section)"
    if err["type"] == "missing":
        return f"{key}: missing"
    if isinstance(err["input"], dict):  # a whole section failed a check across its keys: the message names them
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    return f"{key}: {err['msg']} (got {err['input']!r})"


def parse(raw: object, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(e)}" for e in exc.errors()]
        raise StageError("invalid params\n  " + "\n  ".join(lines)) from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (DVC refuses such a
    file too; PyYAML alone would keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                                    f"(DVC refuses the file too): keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise StageError(f"{path} not found: run from the repository root") from None
    except _DuplicateKey as exc:
        raise StageError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise StageError(f"{path} is not valid YAML: {exc}") from None
    return parse(raw, str(path))
