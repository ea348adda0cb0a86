"""What `ptpipe serve` serves: which model files (workspace, a path, a registry version or stage),
which version each one is, and one loaded model behind the torch-free runtime
(`ptpipe.inference.open_model`: ImageClassifier | TextGenerator, chosen by the file's ptpipe.task).

    models/<kind>/model.onnx        every exported model of the workspace (the default)
    [NAME=]PATH                     one ONNX file, or a folder holding model.onnx
    NAME@v1.2.0                     a released version (ptpipe.registry, the same cache)
    NAME#prod                       whatever version the registry stage names now (re-read on reload)
    ALIAS=NAME@v1.2.0               served as ALIAS (two versions of one artifact side by side)

A workspace model is named after its dvc.yaml artifact (models/cnn -> cifar10-cnn) when there is
one, else after its folder; its version is the md5 of the ONNX file. A registry model's version is
its GTO version tag. Nothing here imports torch.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptpipe import files, inference
from ptpipe.stage import StageError

ONNX_FILE = "model.onnx"
DATATYPES = {"uint8": "UINT8", "int64": "INT64", "float32": "FP32"}  # numpy -> Open Inference Protocol
_REGISTRY = re.compile(r"^(?:(?P<alias>[\w.-]+)=)?(?P<name>[\w.-]+)(?:@(?P<version>v\d+\.\d+\.\d+)|#(?P<stage>[\w.-]+))$")


@dataclass(frozen=True)
class Spec:
    """Where one served model comes from (what `--model` said)."""

    name: str
    path: Path | None = None      # a file in the workspace
    version: str | None = None    # a registry version ...
    stage: str | None = None      # ... or a registry stage
    repo: str | None = None       # the registry's git repo (path or URL); None = this directory
    artifact: str | None = None   # the registry's artifact name, when served under another name

    @property
    def source(self) -> str:
        return "workspace" if self.path else "registry"


def _artifact_names(project: Path) -> dict[Path, str]:
    """{model folder: artifact name} from project/dvc.yaml (empty without one)."""
    dvc_yaml = project / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    import yaml

    declared = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("artifacts") or {}
    return {(project / a["path"]).resolve(): name for name, a in declared.items() if "path" in a}


def parse_specs(models: list[str], models_dir: str | Path = "models", repo: str | None = None) -> list[Spec]:
    """`--model` values -> Specs; none -> every models/*/model.onnx. Duplicate names are refused."""
    names = _artifact_names(Path(models_dir).resolve().parent)
    specs = []
    if not models:
        found = sorted(Path(models_dir).glob(f"*/{ONNX_FILE}"))
        if not found:
            raise StageError(f"no exported model in {models_dir}/*/{ONNX_FILE}: run `dvc repro export`, "
                             f"or pass --model NAME@VERSION / NAME#STAGE / PATH")
        specs = [Spec(names.get(p.parent.resolve(), p.parent.name), path=p) for p in found]
    for text in models:
        match = _REGISTRY.match(text)
        if match:
            specs.append(Spec(match["alias"] or match["name"], version=match["version"], stage=match["stage"],
                              repo=repo, artifact=match["name"]))
            continue
        name, _, path = text.rpartition("=")
        path = Path(path)
        if path.is_dir():
            path = path / ONNX_FILE
        if not path.is_file():
            raise StageError(f"--model {text}: not NAME@vX.Y.Z, NAME#STAGE or an existing ONNX file/folder")
        specs.append(Spec(name or names.get(path.parent.resolve(), path.parent.name), path=path))
    seen = [s.name for s in specs]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise StageError(f"two models named {', '.join(twice)}: name them, e.g. --model other={twice[0]}/model.onnx")
    return specs


def resolve(spec: Spec) -> tuple[Path, str]:
    """(local ONNX file, version) that `spec` names now: cheap enough to call on every reload poll."""
    if spec.path:
        if not spec.path.is_file():
            raise StageError(f"{spec.path} is missing")
        return spec.path, files.digest(spec.path, "md5")
    from ptpipe import registry

    version = spec.version or registry.version_of(spec.artifact, stage=spec.stage, repo=spec.repo)
    return registry.fetch_model(spec.artifact, version=version, repo=spec.repo), version


@dataclass
class TensorInfo:
    name: str
    dtype: str                    # numpy
    datatype: str                 # Open Inference Protocol
    shape: list[int | str]        # str: a dynamic axis ("batch")

    def protocol(self) -> dict:
        return {"name": self.name, "datatype": self.datatype,
                "shape": [d if isinstance(d, int) else -1 for d in self.shape]}


def _tensors(specs: list[dict]) -> list[TensorInfo]:
    """The metadata's inputs/outputs ({name, dtype, shape}, ptpipe.kinds.TensorSpec) with protocol datatypes."""
    unknown = [t["name"] for t in specs if t["dtype"] not in DATATYPES]
    if unknown:
        raise StageError(f"tensor(s) {', '.join(unknown)} have a dtype the server does not map: {', '.join(DATATYPES)}")
    return [TensorInfo(t["name"], t["dtype"], DATATYPES[t["dtype"]], list(t["shape"])) for t in specs]


@dataclass
class Served:
    """One loaded model version: what every response names, and the runtime that answers."""

    spec: Spec
    path: Path
    version: str
    runtime: object
    task: str
    kind: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.runtime.session.run(outputs, feeds)  # onnxruntime sessions are thread-safe

    def warm_up(self) -> None:
        """One call on zeros of batch 1 (sequence 1): a file that loads but cannot run fails here, before a swap."""
        feeds = {t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape], t.dtype) for t in self.inputs}
        self.run(feeds)


def load(spec: Spec, threads: int = inference.DEFAULT_THREADS) -> Served:
    """Open `spec`'s current version through the model-kind runtime (inference.open_model) and warm it up."""
    path, version = resolve(spec)
    runtime = inference.open_model(path, threads)
    served = Served(spec, path, version, runtime, runtime.task, runtime.kind,
                    _tensors(runtime.meta["inputs"]), _tensors(runtime.meta["outputs"]))
    served.warm_up()
    return served
