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



class _Dataset(Section):
    url: Annotated[str, AfterValidator(_url)]  # http(s):// or file:// (a file, an archive or a folder)
    md5: Annotated[str, AfterValidator(_md5)]  # of the downloaded file; empty: not checked


class CifarDataset(_Dataset):
    """CIFAR-10's official "python version" archive (cifar-10-python.tar.gz)."""

    format: Literal["cifar10-python"]
    val_size: int = Field(ge=1, le=25000)  # images carved out of the training set for validation
    seed: int


class ImageFolderDataset(_Dataset):
    """Images in class folders (<class>/<image>, or train/<class>/..., test/<class>/...), as a folder or an archive."""

    format: Literal["image-folder"]
    image_size: int = Field(ge=8, le=512)  # every image: centre square, resized to image_size x image_size
    val_fraction: Annotated[float, Field(gt=0, lt=0.5, strict=False)]  # of the training images, seeded
    test_fraction: Annotated[float, Field(gt=0, lt=0.5, strict=False)]  # when the folder has no test/ of its own
    seed: int


class TextDataset(_Dataset):
    """One UTF-8 text file (or an archive holding exactly one)."""

    format: Literal["text"]
    gutenberg: bool  # cut Project Gutenberg's header and footer (*** START OF / *** END OF)
    val_fraction: Annotated[float, Field(gt=0, lt=0.5, strict=False)]  # the last part of the text


Dataset = Annotated[Union[CifarDataset, ImageFolderDataset, TextDataset], Field(discriminator="format")]
FORMATS = ("cifar10-python", "image-folder", "text")
IMAGE_FORMATS = ("cifar10-python", "image-folder")  # prepared as class-labelled uint8 images (ptpipe.data)


class Download(Section):
    retries: int = Field(ge=0, le=20)
    timeout_s: Annotated[float, Field(gt=0, strict=False)]


class Train(Section):
    """Plumbing shared by every model."""

    device: Literal["auto", "cpu", "cuda", "mps"]
    nproc: int = Field(ge=1, le=64)


class Model(Section):
    """A model: its kind, the data set it trains on and the recipe it trains with."""

    kind: str
    data: str
    recipe: str


class Sample(Section):
    """Text the evaluate stage generates from a trained text model."""

    prompt: Optional[str] = Field(min_length=1)  # null: the validation text's first 10 characters
    length: int = Field(ge=1, le=100_000)
    seed: int
    temperatures: list[Annotated[float, Field(ge=0, strict=False)]] = Field(min_length=1)


class Evaluate(Section):
    sample: Sample


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

        unknown = sorted(set(shapes) - set(kinds.KINDS))
        if unknown:
            raise ValueError(f"unknown model kind {unknown[0]!r} (known kinds are {', '.join(kinds.KINDS)})")
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
    pruner: Literal["percentile", "median", "threshold", "none"]  # none: the curve is recorded, no trial stopped
    percentile: Optional[Annotated[float, Field(strict=False, gt=0, lt=100)]] = None  # percentile: kept share
    startup_trials: int = Field(ge=0)  # percentile/median: trials that finish before any is pruned
    warmup_epochs: int = Field(ge=0)   # epochs every trial runs before it may be pruned
    threshold: Optional[Annotated[float, Field(strict=False)]] = None  # threshold: worse than this stops

    @model_validator(mode="after")
    def _threshold_given(self) -> "TunePrune":
        if (self.pruner == "threshold") != (self.threshold is not None):
            raise ValueError("threshold is needed with pruner: threshold, and only then")
        if (self.pruner == "percentile") != (self.percentile is not None):
            raise ValueError("percentile is needed with pruner: percentile, and only then")
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


# -- monitor: a window of served traffic against the model's reference (ptpipe.drift, docs/monitoring.md) ----

class Monitor(Section):
    """The monitor flow's window and thresholds; the defaults in params.yaml come from benchmarks/drift.py."""

    window: int = Field(ge=20, le=1_000_000)  # requests compared with the reference at a time
    p_value: Annotated[float, Field(gt=0, lt=1, strict=False)]  # each test family flags below this
    accuracy_drop: Annotated[float, Field(ge=0, le=1, strict=False)]  # live accuracy this far below the reference's
    min_bits_shift: Annotated[float, Field(ge=0, strict=False)]  # text: |window - reference| length-corrected bits/char
    min_labelled: int = Field(ge=1)  # labelled rows before live accuracy is judged
    # No cooldown here: it is the on-drift trigger's `within` in prefect.yaml, where Prefect applies it
    # (docs/monitoring.md, "The trigger and the automation").


def thresholds(raw: object, source: str = PARAMS_FILE) -> dict:
    """The `monitor:` section as a checked dict (what ptpipe.drift.check takes); a bad one is a StageError
    naming the key, e.g. `params.yaml: monitor.p_value: Input should be less than 1 (got 2)`."""
    if isinstance(raw, Monitor):
        return raw.model_dump()
    try:
        return Monitor.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise StageError("invalid params\n  " + "\n  ".join(
            f"{source}: {_describe(e, 'monitor.')}" for e in exc.errors())) from None


class Params(Section):
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]  # the CNN recipes' lr where their own is null
    datasets: dict[str, Dataset]
    download: Download
    train: Train
    models: dict[str, Model]
    recipes: dict[str, dict[str, dict]]  # recipes.<kind>.<name>: checked against the kind's own schema by `parse`
    evaluate: Evaluate
    export: Export
    # `validate` would shadow pydantic's BaseModel.validate: the attribute is `validation`.
    validation: Validate = Field(alias="validate")
    tune: Optional[Tune] = None  # `ptpipe tune`'s search; absent: no study to run
    monitor: Optional[Monitor] = None  # the monitor flow's thresholds; absent: no model is monitored

    @field_validator("datasets", "models")
    @classmethod
    def _names(cls, entries: dict) -> dict:
        bad = [n for n in entries if not NAME.fullmatch(n)]
        if bad:  # names become stage names, folders and artifact names
            raise ValueError(f"name {bad[0]!r}: use letters, digits, '-' and '_' (it names stages and folders)")
        return entries

    def recipe(self, model: str):
        """The validated recipe `models.<model>` trains with (the kind's own schema)."""
        m = self.models[model]
        return _typed_recipe(m.kind, m.recipe, self.recipes[m.kind][m.recipe])


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _typed_recipe(kind: str, name: str, raw: dict):
    from ptpipe import kinds

    return kinds.get(kind, "params.yaml").recipe.model_validate(raw)


def _check_models(p: Params) -> list[str]:
    """One line per model that names a missing data set, kind or recipe, or data its kind cannot take."""
    from ptpipe import kinds

    problems = []
    for name, m in p.models.items():
        key = f"models.{name}"
        if m.kind not in kinds.KINDS:
            problems.append(f"{key}.kind: unknown model kind {m.kind!r} (known kinds are {', '.join(kinds.KINDS)})")
            continue
        if m.data not in p.datasets:
            problems.append(f"{key}.data: no data set {m.data!r} in datasets (there are {', '.join(p.datasets)})")
        else:
            fmt, takes = p.datasets[m.data].format, kinds.get(m.kind).formats
            if fmt not in takes:
                problems.append(f"{key}.data: {m.data!r} is {fmt} data, and a {m.kind} model trains on "
                                f"{' or '.join(takes)}: bind it to such a data set, or choose another kind")
        if m.recipe not in p.recipes.get(m.kind, {}):
            problems.append(f"{key}.recipe: {m.recipe!r} is not one of recipes.{m.kind} "
                            f"({', '.join(sorted(p.recipes.get(m.kind, {}))) or 'none'})")
        elif m.data in p.datasets:
            try:
                problem = kinds.get(m.kind).check_data(p.recipe(name), p.datasets[m.data])
            except ValidationError:  # the recipe itself is wrong: _check_recipes says how
                problem = None
            if problem:
                problems.append(f"{key}: recipes.{m.kind}.{m.recipe} on datasets.{m.data}: {problem}")
    return problems


def _check_recipes(p: Params) -> list[str]:
    """Every recipes.<kind>.<name> against its kind's schema, errors named by their full key."""
    from ptpipe import kinds

    problems = []
    for kind, recipes in p.recipes.items():
        if kind not in kinds.KINDS:
            problems.append(f"recipes.{kind}: unknown model kind (known kinds are {', '.join(kinds.KINDS)})")
            continue
        for name, raw in recipes.items():
            try:
                _typed_recipe(kind, name, raw)
            except ValidationError as exc:
                problems += [_describe(e, f"recipes.{kind}.{name}.") for e in exc.errors()]
    return problems


def _describe(err: dict, prefix: str = "") -> str:
    loc = list(err["loc"])
    if loc[:1] == ["datasets"] and len(loc) > 2 and loc[2] in FORMATS:  # pydantic adds the format's tag
        del loc[2]
    key = (prefix + ".".join(str(part) for part in loc)).rstrip(".") or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling and section)"
    if err["type"] == "missing":
        return f"{key}: missing"
    if isinstance(err["input"], dict):  # a whole section failed a check across its keys: the message names them
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    return f"{key}: {err['msg']} (got {err['input']!r})"


def parse(raw: object, source: str = PARAMS_FILE) -> Params:
    try:
        p = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
    else:
        problems = _check_recipes(p) + _check_models(p)
    if problems:
        raise StageError("invalid params\n  " + "\n  ".join(f"{source}: {line}" for line in problems))
    return p


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
