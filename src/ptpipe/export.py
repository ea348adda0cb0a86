"""Stage `export`: each trained model -> a TorchScript file and a self-describing ONNX file.

    python -m ptpipe.export      # models/{cnn,lstm}/model.pt -> model.ts + model.onnx beside them

CNN: the exported graphs take RAW images, uint8 B x 3 x 32 x 32 (0..255, RGB), and return
logits B x classes: the per-channel normalisation of training ((x/255 - mean) / std, with the
training split's mean/std) is folded into the graph as Cast -> Sub -> Mul, so inference needs
nothing but the file (mean/std are in the metadata as well, for the record).

LSTM: (ids int64 [B, T], h0 [L, B, H], c0 [L, B, H]) -> (logits [B, T, V], h [L, B, H], c [L, B, H]),
batch and sequence length dynamic, so one file warms the state on a prompt (T = prompt length)
and then steps one character at a time (T = 1) with the state carried.

Exporter: the TorchScript-based one (`torch.onnx.export(..., dynamo=False)`), on purpose. On
torch 2.14 the dynamo exporter (the default) specialises the LSTM's output sequence length to
the example's (`logits` declared [batch, 5, V]: onnxruntime warns on every other length), emits
28 Slice + 4 Reshape nodes around the two LSTM ops instead of 4 Slice, takes ~7 s instead of
~0.7 s, and only implements opset >= 18 (it down-converts to 17 through the onnx C API). The
legacy exporter gives a graph of 2 LSTM + Gather + MatMul + Add with every axis dynamic, and one
ONNX step ran ~80 us vs ~110 us. (torch announces its removal; pyproject pins torch < 2.15.)

TorchScript: `torch.jit.script` (not trace): tracing nn.LSTM turns its shape checks into
constants (TracerWarnings), scripting keeps them, and every shape stays dynamic.

Every ONNX file carries `metadata_props` (values are JSON): `ptpipe.kind`, the CNN's `classes`,
`mean`/`std` and `arch`; the LSTM's `vocab`, `num_layers`, `hidden_size`; both `input` (what to
feed), `model_args`, `params` (the training params from model.pt), `git_revision` (HEAD,
"+dirty" if the work tree differs) and `source_md5` (md5 of model.pt: the hash `dvc.lock`
records for it). Weights are inside the .onnx file (no external-data sidecar). The TorchScript
file carries the same as `config.json` in its extra files. Files are written through a temporary name and renamed (ptpipe.files).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ptpipe import cnn, files, lstm, params
from ptpipe.stage import StageError, run

MODELS_DIR = Path("models")
MODELS = ("cnn", "lstm")


class RawImageClassifier(nn.Module):
    """A CIFAR model behind the training normalisation: uint8 B x 3 x 32 x 32 -> logits B x classes.

    Same arithmetic as `ptpipe.cnn.normalize` ((x - 255 mean) * 1/(255 std)), so eager, TorchScript
    and ONNX all see exactly what evaluation fed the model."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.shift) * self.scale)


def load_cnn(path: str | Path) -> tuple[RawImageClassifier, dict]:
    """(eval-mode raw-image CNN on the CPU, config) rebuilt from model.pt alone."""
    model, cfg = cnn.load_model(path)
    return RawImageClassifier(model, cfg["mean"], cfg["std"]).eval(), cfg


def example_inputs(kind: str, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs the export runs once. Batch 2 and length 5: sizes 0/1 would invite specialisation."""
    if kind == "cnn":
        return (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),)
    return (torch.zeros(2, 5, dtype=torch.int64), *model.init_state(2))


# ONNX graph signature per model: input names, output names, dynamic axes.
SIGNATURES = {
    "cnn": (["images"], ["logits"], {"images": {0: "batch"}, "logits": {0: "batch"}}),
    "lstm": (["ids", "h0", "c0"], ["logits", "h", "c"],
             {"ids": {0: "batch", 1: "seq"}, "h0": {1: "batch"}, "c0": {1: "batch"},
              "logits": {0: "batch", 1: "seq"}, "h": {1: "batch"}, "c": {1: "batch"}}),
}


def git_revision(cwd: str | Path = ".") -> str:
    """HEAD's sha, with "+dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def metadata(kind: str, cfg: dict, source: Path, revision: str) -> dict:
    """What inference needs to use the file, and where it came from."""
    meta = {"ptpipe.kind": kind}
    if kind == "cnn":
        meta.update(classes=cfg["classes"], mean=cfg["mean"], std=cfg["std"], arch=cfg["arch"],
                    input="uint8 RGB N x 3 x 32 x 32, 0..255; normalisation is inside the graph")
    else:
        args = cfg["model_args"]
        meta.update(vocab=cfg["vocab"], num_layers=args["num_layers"], hidden_size=args["hidden_size"],
                    input="ids int64 [batch, seq], h0/c0 float32 [num_layers, batch, hidden_size]")
    # training params: the LSTM saves them under "params", the CNN beside its model keys
    training = cfg.get("params", {k: v for k, v in cfg.items() if k not in (*cnn.CONFIG_KEYS, *lstm.CONFIG_KEYS)})
    meta.update(model_args=cfg["model_args"], params=training, git_revision=revision, source_md5=files.digest(source, "md5"))
    return meta


def to_onnx(kind: str, model: nn.Module, opset: int, meta: dict) -> onnx.ModelProto:
    """The checked ONNX model (weights inline, metadata attached as JSON strings)."""
    inputs, outputs, dynamic = SIGNATURES[kind]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (module docstring); its deprecation notice and
        # the LSTM shape-check TracerWarnings say nothing about this export's correctness, which
        # the `validate` stage checks at shapes never seen here.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example_inputs(kind, model), buf, dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "ptpipe"
    proto.doc_string = f"ptpipe {kind} model; metadata_props describe inputs, labels and provenance"
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(eval-mode module on the CPU, the metadata `export_model` stored in it as config.json)."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: run `dvc repro export`")
    extra = {"config.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
        return module, json.loads(extra["config.json"] or "{}")
    except (RuntimeError, ValueError) as exc:  # not a TorchScript archive, or config.json not JSON
        raise StageError(f"{path}: not a TorchScript file written by `ptpipe.export` ({type(exc).__name__})") from None


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the format asked for
        return torch.jit.script(model)


def export_model(kind: str, model_dir: str | Path, opset: int, revision: str | None = None) -> dict:
    """models/<kind>/model.pt -> model.ts and model.onnx beside it; returns {ts, onnx} paths."""
    model_dir = Path(model_dir)
    source = model_dir / "model.pt"
    model, cfg = (load_cnn if kind == "cnn" else lstm.load_model)(source)
    meta = metadata(kind, cfg, source, revision or git_revision())
    proto = to_onnx(kind, model, opset, meta)
    scripted = to_torchscript(model)
    out = {"ts": model_dir / "model.ts", "onnx": model_dir / "model.onnx"}
    with files.atomic_path(out["ts"], suffix=".ts") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={"config.json": json.dumps(meta)})
    files.write_bytes(out["onnx"], proto.SerializeToString())
    return out


def main(models: tuple[str, ...] = MODELS, models_dir: str | Path = MODELS_DIR) -> dict:
    p = params.load()
    revision = git_revision()
    written = {}
    for kind in models:
        written[kind] = export_model(kind, Path(models_dir) / kind, p.export.opset, revision)
        print(f"{kind}: wrote {written[kind]['ts']} and {written[kind]['onnx']} (opset {p.export.opset})")
    return written


def parse_models(description: str) -> tuple[str, ...]:
    """The `export` / `validate` command line: which models (default both), unknown names refused."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models", nargs="*", metavar="{cnn,lstm}", help="default: both")
    chosen = tuple(parser.parse_args().models) or MODELS
    if set(chosen) - set(MODELS):
        parser.error(f"models: choose from cnn, lstm (got {' '.join(chosen)})")
    return chosen


if __name__ == "__main__":
    run(main, parse_models(__doc__.splitlines()[0]))
