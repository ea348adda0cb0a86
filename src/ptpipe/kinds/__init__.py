"""Model kinds: what the rest of the pipeline needs to know about a model, in one module per kind.

`KINDS` lists them; each is a module of this package that defines `KIND = ModelKind(...)`: the data
formats it trains on, its recipe schema (params.yaml's `recipes.<kind>.<name>`), how it trains
(`training`: the parts the shared loop in `ptpipe.train` runs), the metric that ranks two trained
models, how to build the deployable module from a saved config, its ONNX/TorchScript signature,
example inputs for the export, the metadata inference reads, and the validation cases. A *model*
(params.yaml's `models.<name>`) is a kind, a data set and a recipe; `export`, `validate`, `evaluate`,
`generate`, inference, the registry and the flows read everything else from the model file.
docs/add-a-model.md walks through adding a kind.

This file imports no torch at module level, so the torch-free runtime (`ptpipe.inference`) can tell a
ptpipe model from a foreign file; `get(name)` imports the kind's module (and so torch).

Every trainer saves models/<model>/model.pt as
    {"state_dict": ..., "config": {"kind": "cnn", "model_args": {...}, "params": {the resolved recipe},
                                   "data": {"name": "cifar10", "md5": <prepared data>, "classes": [...], ...}}}
"""
from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from ptpipe.stage import StageError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

KINDS = ("cnn", "lstm", "gpt")  # the kinds: modules of this package (tests monkeypatch this and `get`)
TASKS = ("image-classification", "text-generation")
DTYPES = ("uint8", "int64", "float32")
CONFIG_KEYS = ("kind", "model_args", "params", "data")  # what every saved config holds


class UnknownKind(StageError):
    """A model file or params.yaml names a kind this version of ptpipe does not have."""

    def __init__(self, kind: object, where: str | Path):
        super().__init__(f"unknown model kind {kind!r} in {where}: known kinds are {', '.join(KINDS)}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` items: an int (fixed), or a name: a key of the saved
    `model_args` (fixed to its value, e.g. "hidden_size") or else a dynamic axis ("batch", "seq")."""

    name: str
    dtype: str  # one of DTYPES
    shape: tuple[Union[int, str], ...]
    # a model_args key (e.g. "n_layer"): one tensor per index i, named `name.format(i=i)`, all of them (and
    # those of other specs with the same `list`, in spec order) passed to the torch module as ONE list argument
    repeat: str | None = None
    list: str | None = None

    def resolve(self, model_args: dict) -> list[dict]:
        """[{"name", "dtype", "shape"}] with model_args names replaced by their values (JSON-able); a repeated
        spec's tensors also say which `list` argument they belong to."""
        shape = [model_args.get(d, d) if isinstance(d, str) else d for d in self.shape]
        if self.repeat is None:
            return [{"name": self.name, "dtype": self.dtype, "shape": shape}]
        return [{"name": self.name.format(i=i), "dtype": self.dtype, "shape": shape, "list": self.list}
                for i in range(int(model_args[self.repeat]))]


@dataclass(frozen=True)
class Case:
    """One validation case: `steps` run in order on every backend; for steps after the first,
    `carry` maps an output name to the input it feeds, taken from that backend's OWN previous
    outputs (a recurrent state). Every output of every step is compared with eager PyTorch."""

    label: str  # e.g. "batch=5 seq=37 state=carried": names the case in reports and errors
    steps: list[dict[str, "np.ndarray"]]
    carry: dict[str, str] = field(default_factory=dict)
    # what eager PyTorch runs instead, one feed per step, when the reference is another path to the same
    # numbers (a cached step's uncached window); an output longer along axis 1 is compared on its last
    # positions (the window's logits for every position vs the step's for its new ids)
    reference: list[dict[str, "np.ndarray"]] | None = None


@dataclass(frozen=True)
class ModelKind:
    name: str  # "cnn": what params.yaml's models.<model>.kind says
    task: str  # one of TASKS: which runtime class serves it (ptpipe.inference.open_model), how it is evaluated
    formats: tuple[str, ...]  # the data set formats it trains on (params.yaml datasets.<name>.format)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # the first output is the logits (top-1 agreement, sampling)
    build: Callable[[dict], "nn.Module"]  # saved config -> the DEPLOYABLE module (weights not loaded)
    example_inputs: Callable[["nn.Module", dict], tuple]  # what the export runs once
    metadata: Callable[[dict], dict]  # task facts for inference (classes, vocab, generation), JSON-able
    validation_cases: Callable[[dict, Path, dict], list[Case]]  # (config, prepared dir, validate.shapes.<kind>)
    recipe: Any = None  # the pydantic schema of recipes.<kind>.<name> (ptpipe.params.Section); None: not trainable
    training: Callable[..., Any] | None = None  # (recipe, data dir, device, ddp) -> ptpipe.train.Training
    # text kinds: (eval-mode model, ids, the recorded recipe) -> (summed nats, characters scored)
    text_loss: Callable[["nn.Module", Any, dict], tuple[float, int]] | None = None
    # (recipe, params.yaml's datasets.<name>) -> why this recipe cannot train on that data, or None
    check_data: Callable[[Any, Any], str | None] = lambda recipe, dataset: None
    # the part of the deployable module whose weights model.pt holds (the CNN's trained net sits
    # behind the input normalisation); the whole module by default
    trained_part: Callable[["nn.Module"], "nn.Module"] = lambda module: module
    # model_args an older model file may lack, with the value every such file had (the CNN's image_size: 32)
    arg_defaults: dict = field(default_factory=dict)
    # sizes a signature names that follow from model_args (gpt's head_size = n_embd / n_head)
    derived_args: Callable[[dict], dict] = lambda args: {}

    @property
    def metric(self) -> tuple[str, bool]:
        """(key in metrics/<model>/evaluate.json, higher is better): what ranks two trained models."""
        return ("test.acc", True) if self.task == "image-classification" else ("val_bits_per_char", False)

    def signature(self, config: dict) -> dict:
        """{"inputs": [...], "outputs": [...]} resolved against the config's model_args."""
        args = {**self.arg_defaults, **config["model_args"]}
        args.update(self.derived_args(args))
        return {"inputs": [t for s in self.inputs for t in s.resolve(args)],
                "outputs": [t for s in self.outputs for t in s.resolve(args)]}

    def describe(self, config: dict) -> dict:
        """The torch-free description of a trained model of this kind: what the exported files carry
        as metadata (export adds source_md5 and git_revision) and what eager generation reads."""
        data = {k: config["data"][k] for k in ("name", "md5") if k in config["data"]}
        return {"ptpipe.kind": self.name, "ptpipe.task": self.task, **self.signature(config),
                **self.metadata(config), "data": data, "model_args": config["model_args"], "params": config["params"]}


def get(name: object, where: str | Path = "the request") -> ModelKind:
    """The kind called `name`; UnknownKind (a one-line StageError naming the known kinds) otherwise."""
    return importlib.import_module(f"{__name__}.{check_known(name, where)}").KIND


def check_known(name: object, where: str | Path) -> str:
    """`name` if it is a known kind (torch-free: nothing is imported), else UnknownKind."""
    if not isinstance(name, str) or name not in KINDS:
        raise UnknownKind(name, where)
    return name


def retrain_hint(path: str | Path) -> str:
    """How to make the model file `path` again: its stage is train@<its folder's name>."""
    return f"`dvc repro train@{Path(path).parent.name}`"


def load_file(path: str | Path) -> dict:
    """What a trainer saved at `path` ({state_dict, config}), loaded with weights_only=True, its config
    checked for the self-describing shape. A missing or foreign file is a StageError naming the stage to rerun."""
    import torch

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: run {retrain_hint(path)} first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise StageError(f"{path}: not a model file written by a ptpipe train stage ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved or not isinstance(saved.get("config"), dict):
        raise StageError(f"{path}: not a model file written by a ptpipe train stage (no state_dict and config)")
    missing = [k for k in CONFIG_KEYS if k not in saved["config"]]
    if missing:
        raise StageError(f"{path}: config lacks {', '.join(missing)}: retrain it with this version of ptpipe "
                         f"({retrain_hint(path)})")
    return saved


def load(path: str | Path, expect: str | None = None) -> tuple[ModelKind, "nn.Module", dict]:
    """(kind, eval-mode deployable module on the CPU, config) from a model.pt alone (not params.yaml).
    `expect`: the kind the caller needs; a file of another kind is a StageError."""
    saved = load_file(path)
    config = saved["config"]
    kind = get(config["kind"], path)
    if expect and kind.name != expect:
        raise StageError(f"{path} is a ptpipe {kind.name} model, not {expect}")
    module = kind.build(config)
    try:
        kind.trained_part(module).load_state_dict(saved["state_dict"])
    except RuntimeError as exc:  # weights of another shape than model_args says
        raise StageError(f"{path}: weights do not match its model_args ({str(exc).splitlines()[0]}): "
                         f"retrain it ({retrain_hint(path)})") from None
    return kind, module.eval(), config


def shape_params(validate_params: dict, kind: str, key: str) -> list[int]:
    """validate.shapes.<kind>.<key> (a list of sizes), or a StageError naming the missing key."""
    if key not in validate_params:
        raise StageError(f"params.yaml: validate.shapes.{kind}.{key}: missing (the sizes to validate {kind} at)")
    return list(validate_params[key])


def runner(module: "nn.Module", meta: dict) -> Callable[[dict], dict]:
    """An eager or TorchScript module as a numpy `run`: {input name: array} -> {output name: array},
    the inputs passed positionally in the order `meta["inputs"]` gives (the export's signature), those of
    one `list` as one list argument; a list the module returns is flattened the same way (the ONNX
    exporter's own rule for lists)."""
    import torch

    arguments: list = []  # an input name, or the names of one list argument
    for spec in meta["inputs"]:
        if spec.get("list") and arguments and isinstance(arguments[-1], list):
            arguments[-1].append(spec["name"])
        else:
            arguments.append([spec["name"]] if spec.get("list") else spec["name"])
    outputs = [o["name"] for o in meta["outputs"]]

    @torch.no_grad()
    def run(feeds: dict) -> dict:
        result = module(*([torch.from_numpy(feeds[n]) for n in a] if isinstance(a, list) else torch.from_numpy(feeds[a])
                          for a in arguments))
        flat = []
        for r in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(r, (tuple, list)):
                flat.extend(r)
            else:
                flat.append(r)
        return {name: t.numpy() for name, t in zip(outputs, flat)}

    return run
