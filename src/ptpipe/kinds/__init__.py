"""Model kinds: what the rest of the pipeline needs to know about a model, in one module per model.

Every module of this package is a kind (`cnn`, `lstm`, ...) and defines `KIND = ModelKind(...)`:
how to build the deployable module from a saved config, its ONNX/TorchScript signature, example
inputs for the export, the metadata inference reads, and the validation cases. `export`,
`validate`, `generate`, `inference`, the registry and the flows look kinds up here and nowhere
else; adding a model is adding a module here (plus its training stage, params and dvc.yaml block).
docs/add-a-model.md walks through it.

This file imports no torch at module level: `names()` lists the package's modules without importing
them, so the torch-free runtime (`ptpipe.inference`) can tell a ptpipe model from a foreign file.
`get(name)` imports the kind's module (and so torch).

Every trainer saves models/<kind>/model.pt as
    {"state_dict": ..., "config": {"kind": "cnn", "model_args": {...}, "params": {resolved training params},
                                   "data": {"classes": [...], ...} or {"vocab": [...]}}}
"""
from __future__ import annotations

import importlib
import pickle
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from ptpipe.stage import StageError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

TASKS = ("image-classification", "text-generation")
DTYPES = ("uint8", "int64", "float32")
CONFIG_KEYS = ("kind", "model_args", "params", "data")  # what every saved config holds


class UnknownKind(StageError):
    """A model file names a kind this version of ptpipe does not have."""

    def __init__(self, kind: object, where: str | Path):
        super().__init__(f"unknown model kind {kind!r} in {where}: known kinds are {', '.join(known())}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` items: an int (fixed), or a name: a key of the saved
    `model_args` (fixed to its value, e.g. "hidden_size") or else a dynamic axis ("batch", "seq")."""

    name: str
    dtype: str  # one of DTYPES
    shape: tuple[Union[int, str], ...]

    def resolve(self, model_args: dict) -> dict:
        """{"name", "dtype", "shape"} with model_args names replaced by their values (JSON-able)."""
        shape = [model_args.get(d, d) if isinstance(d, str) else d for d in self.shape]
        return {"name": self.name, "dtype": self.dtype, "shape": shape}


@dataclass(frozen=True)
class Case:
    """One validation case: `steps` run in order on every backend; for steps after the first,
    `carry` maps an output name to the input it feeds, taken from that backend's OWN previous
    outputs (a recurrent state). Every output of every step is compared with eager PyTorch."""

    label: str  # e.g. "batch=5 seq=37 state=carried": names the case in reports and errors
    steps: list[dict[str, "np.ndarray"]]
    carry: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelKind:
    name: str  # "cnn": also the models/<name>/ folder
    task: str  # one of TASKS: which runtime class serves it (ptpipe.inference.open_model)
    train_stage: str  # named in "run `dvc repro <stage>`" messages
    prepared: str  # the prepared data set it trains and validates on: data/prepared/<prepared>
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # the first output is the logits (top-1 agreement, sampling)
    build: Callable[[dict], "nn.Module"]  # saved config -> the DEPLOYABLE module (weights not loaded)
    example_inputs: Callable[["nn.Module", dict], tuple]  # what the export runs once
    metadata: Callable[[dict], dict]  # task facts for inference (classes, vocab, generation), JSON-able
    validation_cases: Callable[[dict, Path, dict], list[Case]]  # (config, prepared dir, validate.shapes.<name>)
    # the part of the deployable module whose weights model.pt holds (the CNN's trained net sits
    # behind the input normalisation); the whole module by default
    trained_part: Callable[["nn.Module"], "nn.Module"] = lambda module: module

    def signature(self, config: dict) -> dict:
        """{"inputs": [...], "outputs": [...]} resolved against the config's model_args."""
        args = config["model_args"]
        return {"inputs": [s.resolve(args) for s in self.inputs], "outputs": [s.resolve(args) for s in self.outputs]}

    def describe(self, config: dict) -> dict:
        """The torch-free description of a trained model of this kind: what the exported files carry
        as metadata (export adds source_md5 and git_revision) and what eager generation reads."""
        return {"ptpipe.kind": self.name, "ptpipe.task": self.task, **self.signature(config),
                **self.metadata(config), "model_args": config["model_args"], "params": config["params"]}


def names() -> list[str]:
    """The kinds, sorted: the modules of this package (listed without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))



_registered: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    """Add a kind that is not a module of this package (the test suite's own model)."""
    _registered[kind.name] = kind
    return kind


def known() -> list[str]:
    return sorted({*names(), *_registered})


def get(name: object, where: str | Path = "the request") -> ModelKind:
    """The kind called `name`; UnknownKind (a one-line StageError naming the known kinds) otherwise."""
    if isinstance(name, str) and name in _registered:
        return _registered[name]
    if not isinstance(name, str) or name not in names():
        raise UnknownKind(name, where)
    return importlib.import_module(f"{__name__}.{name}").KIND


def check_known(name: object, where: str | Path) -> str:
    """`name` if it is a known kind (torch-free: nothing is imported), else UnknownKind."""
    if not isinstance(name, str) or name not in known():
        raise UnknownKind(name, where)
    return name


def load_file(path: str | Path, stage: str | None = None) -> dict:
    """What a trainer saved at `path` ({state_dict, config}), loaded with weights_only=True, its config
    checked for the self-describing shape. A missing or foreign file is a StageError naming the stage to
    rerun (`stage`: the expected kind's train stage, when the caller knows it)."""
    import torch

    path = Path(path)
    rerun = f"`dvc repro {stage}`" if stage else "`dvc repro`"
    writer = f"`dvc repro {stage}`" if stage else "a ptpipe training stage"
    if not path.exists():
        raise StageError(f"{path} is missing: run {rerun} first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise StageError(f"{path}: not a model file written by {writer} ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved or not isinstance(saved.get("config"), dict):
        raise StageError(f"{path}: not a model file written by {writer} (no state_dict and config)")
    missing = [k for k in CONFIG_KEYS if k not in saved["config"]]
    if missing:
        raise StageError(f"{path}: config lacks {', '.join(missing)}: retrain it with this version of ptpipe ({rerun})")
    return saved


def load(path: str | Path, expect: str | None = None) -> tuple[ModelKind, "nn.Module", dict]:
    """(kind, eval-mode deployable module on the CPU, config) from a model.pt alone (not params.yaml).
    `expect`: the kind the caller needs; a file of another kind is a StageError."""
    saved = load_file(path, get(expect).train_stage if expect else None)
    config = saved["config"]
    kind = get(config["kind"], path)
    if expect and kind.name != expect:
        raise StageError(f"{path} is a ptpipe {kind.name} model, not {expect}")
    module = kind.build(config)
    try:
        kind.trained_part(module).load_state_dict(saved["state_dict"])
    except RuntimeError as exc:  # weights of another shape than model_args says
        raise StageError(f"{path}: weights do not match its model_args ({str(exc).splitlines()[0]}): "
                         f"retrain it (`dvc repro {kind.train_stage}`)") from None
    return kind, module.eval(), config


def shape_params(validate_params: dict, kind: str, key: str) -> list[int]:
    """validate.shapes.<kind>.<key> (a list of sizes), or a StageError naming the missing key."""
    if key not in validate_params:
        raise StageError(f"params.yaml: validate.shapes.{kind}.{key}: missing (the sizes to validate {kind} at)")
    return list(validate_params[key])



def runner(module: "nn.Module", meta: dict) -> Callable[[dict], dict]:
    """An eager or TorchScript module as a numpy `run`: {input name: array} -> {output name: array},
    the inputs passed positionally in the order `meta["inputs"]` gives (the export's signature)."""
    import torch

    inputs = [i["name"] for i in meta["inputs"]]
    outputs = [o["name"] for o in meta["outputs"]]

    @torch.no_grad()
    def run(feeds: dict) -> dict:
        result = module(*(torch.from_numpy(feeds[name]) for name in inputs))
        result = result if isinstance(result, (tuple, list)) else (result,)
        return {name: t.numpy() for name, t in zip(outputs, result)}

    return run
