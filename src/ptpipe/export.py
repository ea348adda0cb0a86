"""Stage `export`: a trained model -> a TorchScript file and a self-describing ONNX file, for any kind.

    python -m ptpipe.export --model-dir models/cnn --data data/prepared/cifar10  # -> model.ts + model.onnx beside it

What a model's graph takes and returns, which axes are dynamic and what its metadata says come
from its kind (`ptpipe.kinds.<kind>.KIND`): this module has no model-specific code. E.g. the CNN's
graphs take RAW images, uint8 B x 3 x 32 x 32, with the training normalisation folded in as
Cast -> Sub -> Mul; the LSTM's take (ids int64 [B, T], h0, c0 [L, B, H]) -> (logits, h, c), batch
and sequence length dynamic, so one file warms the state on a prompt and then steps one character
at a time with the state carried.

Exporter: the TorchScript-based one (`torch.onnx.export(..., dynamo=False)`), on purpose. On
torch 2.14 the dynamo exporter (the default) specialises the LSTM's output sequence length to
the example's (`logits` declared [batch, 5, V]: onnxruntime warns on every other length), emits
28 Slice + 4 Reshape nodes around the two LSTM ops instead of 4 Slice, takes ~7 s instead of
~0.7 s, and only implements opset >= 18 (it down-converts to 17 through the onnx C API). The
legacy exporter gives a graph of 2 LSTM + Gather + MatMul + Add with every axis dynamic, and one
ONNX step ran ~80 us vs ~110 us. (torch announces its removal; pyproject pins torch < 2.15.)

TorchScript: `torch.jit.script` (not trace): tracing nn.LSTM turns its shape checks into
constants (TracerWarnings), scripting keeps them, and every shape stays dynamic.

Every ONNX file carries `metadata_props` (values are JSON): `ptpipe.kind`, `ptpipe.task`,
`inputs`/`outputs` ([{name, dtype, shape}], dynamic axes by name), the kind's own facts (the CNN's
`classes`, `mean`/`std`; a text model's `vocab` and `generation`), `data` (the data set it trained on:
name and md5 of the prepared data), `model_args`, `params` (the training recipe from model.pt), `git_revision` (HEAD, "+dirty" if the work tree differs) and
`source_md5` (md5 of model.pt: the hash `dvc.lock` records for it; `ptpipe generate/predict` refuse
an export whose model.pt has changed since), and `ptpipe.reference`: the drift reference of the validation
split (ptpipe.drift; kept inside the file so whatever serves or releases the model has its reference). Weights are inside the .onnx file (no external-data
sidecar). The TorchScript file carries the same as `config.json` in its extra files. Both files are
byte-reproducible (same weights and metadata, same bytes) and written atomically (ptpipe.files).
"""
from __future__ import annotations

import io
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ptpipe import data, drift, files, inference, kinds, params, stage
from ptpipe.stage import StageError

REFERENCE_PROMPTS = 1000     # text models: validation-text prompts the reference's bits/char come from
PROMPT_CHARS = (4, 256)      # their lengths, log-uniform: a few words to a paragraph

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


def metadata(kind: kinds.ModelKind, config: dict, source: Path, revision: str) -> dict:
    """What inference needs to use the file, and where it came from."""
    return {**kind.describe(config), "git_revision": revision, "source_md5": files.digest(source, "md5")}


def prompts(text_ids: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """n seeded windows of a text (its ids), log-uniform PROMPT_CHARS long (at most the text): reference prompts."""
    rng = np.random.default_rng(seed)
    high = min(PROMPT_CHARS[1], len(text_ids))
    lengths = np.exp(rng.uniform(np.log(min(PROMPT_CHARS[0], high)), np.log(high), n)).astype(int)
    starts = rng.integers(0, len(text_ids) - lengths + 1)
    return [text_ids[s: s + k] for s, k in zip(starts, lengths)]


def reference(run, meta: dict, data_dir: Path) -> dict:
    """The drift reference (ptpipe.drift.reference): the validation split as the served model sees it, through
    `run` ({input: array} -> {output: array}, any backend; the stage passes the ONNX graph's).
    Classifiers: class probabilities and image_stats of every validation image, its true labels;
    text models: drift.prompt_stats (what the server logs of a prompt) of REFERENCE_PROMPTS seeded windows of
    the validation text."""
    if meta["ptpipe.task"] == "image-classification":
        images, labels = (t.numpy() for t in data.load_images(data_dir, "val"))
        logits = np.concatenate([run({meta["inputs"][0]["name"]: images[i: i + 500]})[meta["outputs"][0]["name"]]
                                 for i in range(0, len(images), 500)])
        probs = inference.softmax(logits.astype(np.float64))  # as the server's log computes them (ptpipe.predlog)
        return drift.reference(probs, drift.image_stats(images), drift.IMAGE_STATS, labels, meta["classes"])
    val = data.load_text(data_dir)[1].numpy()
    rows = [drift.prompt_stats(run, meta, p) for p in prompts(val, REFERENCE_PROMPTS, seed=0)]
    return drift.reference(np.zeros((len(rows), 0)), np.asarray(rows, dtype=np.float64), drift.TEXT_STATS)


def dynamic_axes(meta: dict) -> dict[str, dict[int, str]]:
    """{tensor name: {axis: name}} for every axis the kind left symbolic ("batch", "seq")."""
    return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
            for t in (*meta["inputs"], *meta["outputs"])}


def to_onnx(kind: kinds.ModelKind, model: nn.Module, config: dict, opset: int, meta: dict) -> onnx.ModelProto:
    """The checked ONNX model (weights inline, metadata attached as JSON strings)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (module docstring); its deprecation notice and
        # the LSTM shape-check TracerWarnings say nothing about this export's correctness, which
        # the `validate` stage checks at shapes never seen here.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, kind.example_inputs(model, config), buf, dynamo=False, opset_version=opset,
                          input_names=[t["name"] for t in meta["inputs"]],
                          output_names=[t["name"] for t in meta["outputs"]],
                          dynamic_axes=dynamic_axes(meta), do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "ptpipe"
    proto.doc_string = f"ptpipe {kind.name} model; metadata_props describe inputs, labels and provenance"
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


def torchscript_bytes(scripted: torch.jit.ScriptModule, meta: dict) -> bytes:
    """The .ts archive in memory: saved to a buffer, so no (random) temporary file name ends up inside
    the zip and the same weights give the same bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf, _extra_files={"config.json": json.dumps(meta)})
    return buf.getvalue()


def export(model_dir: str | Path, params_file: str | Path = params.PARAMS_FILE, revision: str | None = None,
           data_dir: str | Path | None = None) -> dict:
    """model_dir/model.pt (any kind: its file says which) -> model.ts and model.onnx beside it; {ts, onnx} paths.
    With `data_dir` (the prepared data it trained on; the stage passes it) both files also carry the drift
    reference of its validation split (metadata `ptpipe.reference`, read by ptpipe.drift.load_reference)."""
    opset = params.load(params_file).export.opset  # validated before anything is written
    model_dir = Path(model_dir)
    source = model_dir / "model.pt"
    kind, model, config = kinds.load(source)
    meta = metadata(kind, config, source, revision or git_revision())
    if data_dir is not None:
        data.check_same_data(config, data_dir, source)
    proto = to_onnx(kind, model, config, opset, meta)
    if data_dir is not None:  # run through the ONNX graph itself: what is served (and ~10x faster per call than
        # eager PyTorch on 1,000 short prompts), then recorded in both files
        session = inference.ort.InferenceSession(proto.SerializeToString(), inference.session_options(),
                                                 providers=["CPUExecutionProvider"])
        meta[drift.METADATA_KEY] = reference(inference.onnx_runner(session), meta, Path(data_dir))
        entry = proto.metadata_props.add()
        entry.key, entry.value = drift.METADATA_KEY, json.dumps(meta[drift.METADATA_KEY])
    scripted = to_torchscript(model)
    out = {"ts": model_dir / "model.ts", "onnx": model_dir / "model.onnx"}
    files.write_bytes(out["ts"], torchscript_bytes(scripted, meta))
    files.write_bytes(out["onnx"], proto.SerializeToString())
    print(f"{model_dir.name} ({kind.name}): wrote {out['ts']} and {out['onnx']} (opset {opset})")
    return out


def main() -> None:
    args = stage.parser(__doc__, "model-dir", "data").parse_args()
    stage.run(export, args.model_dir, args.params, data_dir=args.data)


if __name__ == "__main__":
    main()
