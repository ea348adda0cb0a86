"""Stage `validate`: the exported files compute what the trained weights compute.

    python -m ptpipe.validate    # models/*/model.{pt,ts,onnx} + data/prepared -> metrics/validate.json

`validate_models` is THE check (the Prefect validation flow calls it too): for each model, the
eager PyTorch model rebuilt from model.pt is the reference; the TorchScript file (torch.jit.load)
and the ONNX file (onnxruntime, the session options of `ptpipe.inference`) run the same real
prepared data at shapes the export never saw:

- CNN: the first 1, 7, 64 test images (raw uint8: the files contain the normalisation).
- LSTM: batch 1 and 5 streams of validation text, sequence lengths 1, 37, 256; each from a
  zero state, then the next window from the state that backend itself returned (the carry
  generation relies on). Short texts (test fixtures) are repeated to fill the windows.

Per (model, backend, shape): max |difference| of the logits (and of h and c), and top-1
agreement (argmax over classes / characters at every position). Any max difference > atol or
agreement < 100% raises `ValidationFailed` naming model, backend, shape and difference, with the
full report attached as `.report`. The stage writes the report (metrics/validate.json, a DVC
metric: `dvc metrics diff` shows drift) only when everything passed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ptpipe import data, files, params
from ptpipe import lstm
from ptpipe.export import load_cnn, load_torchscript, parse_models
from ptpipe.inference import open_session
from ptpipe.stage import StageError, run

MODELS_DIR = Path("models")
PREPARED_DIR = Path("data/prepared")
REPORT = Path("metrics/validate.json")
BACKENDS = ("torchscript", "onnxruntime")


class ValidationFailed(StageError):
    """An exported model disagrees with its eager original beyond the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _onnx_runner(path: Path) -> Callable[..., list[np.ndarray]]:
    session = open_session(path)
    names = [i.name for i in session.get_inputs()]
    return lambda *arrays: session.run(None, dict(zip(names, arrays)))


def _compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict:
    """{<name>: max |diff|, ..., top1: agreement of argmax over the last axis of the logits}."""
    out = {name: float(np.max(np.abs(r.astype(np.float64) - g))) for name, r, g in zip(names, ref, got)}
    out["top1"] = float(np.mean(ref[0].argmax(-1) == got[0].argmax(-1)))
    return out


def validate_cnn(model_dir: Path, prepared_dir: Path, batches: list[int]) -> dict:
    """{backend: {"b<N>": {logits, top1}}} on the first N test images."""
    eager, _ = load_cnn(model_dir / "model.pt")
    scripted, _ = load_torchscript(model_dir / "model.ts")
    onnx_run = _onnx_runner(model_dir / "model.onnx")
    images, _ = data.load_cifar(prepared_dir, "test")
    if len(images) < max(batches):
        raise StageError(f"{prepared_dir}: {len(images)} test images, validate.cnn_batches needs {max(batches)}")
    report = {b: {} for b in BACKENDS}
    with torch.no_grad():
        for n in batches:
            x = images[:n].contiguous()  # uint8 n x 3 x 32 x 32
            ref = [eager(x).numpy()]
            runs = {"torchscript": [scripted(x).numpy()], "onnxruntime": onnx_run(x.numpy())}
            for backend, got in runs.items():
                report[backend][f"b{n}"] = _compare(ref, got, ["logits"])
    return report


def _windows(ids: np.ndarray, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive windows [batch, seq_len] of `batch` contiguous streams of the text."""
    need = batch * 2 * seq_len
    stream = np.resize(ids, max(need, len(ids)))[: need]  # np.resize repeats a short text
    rows = stream.reshape(batch, 2 * seq_len).astype(np.int64)
    return rows[:, :seq_len].copy(), rows[:, seq_len:].copy()


def validate_lstm(model_dir: Path, prepared_dir: Path, batches: list[int], seq_lens: list[int]) -> dict:
    """{backend: {"b<B>_t<T>_<zero|carried>": {logits, h, c, top1}}} on the validation text."""
    eager, _ = lstm.load_model(model_dir / "model.pt")
    scripted, _ = load_torchscript(model_dir / "model.ts")
    onnx_run = _onnx_runner(model_dir / "model.onnx")
    _, val_ids, _ = data.load_text(prepared_dir)
    val = val_ids.numpy()

    def torch_run(module):
        def step(ids, h, c):
            with torch.no_grad():
                return [t.numpy() for t in module(torch.from_numpy(ids), torch.from_numpy(h), torch.from_numpy(c))]
        return step

    steps = {"eager": torch_run(eager), "torchscript": torch_run(scripted), "onnxruntime": onnx_run}
    report = {b: {} for b in BACKENDS}
    for b in batches:
        for t in seq_lens:
            first, second = _windows(val, b, t)
            zeros = [s.numpy() for s in eager.init_state(b)]
            out = {name: step(first, *zeros) for name, step in steps.items()}
            for backend in BACKENDS:
                report[backend][f"b{b}_t{t}_zero"] = _compare(out["eager"], out[backend], ["logits", "h", "c"])
            # next window, each backend from its own returned state
            out = {name: step(second, out[name][1], out[name][2]) for name, step in steps.items()}
            for backend in BACKENDS:
                report[backend][f"b{b}_t{t}_carried"] = _compare(out["eager"], out[backend], ["logits", "h", "c"])
    return report


def _shape_label(model: str, key: str) -> str:
    """"b7" -> "batch=7"; "b5_t37_carried" -> "batch=5 seq=37 state=carried"."""
    if model == "cnn":
        return f"batch={key[1:]}"
    b, t, state = key.split("_")
    return f"batch={b[1:]} seq={t[1:]} state={state}"


def _describe(model: str, key: str) -> str:
    """"b7" -> "shape 7x3x32x32"; "b5_t37_carried" -> "shape 5x37 (carried state)"."""
    if model == "cnn":
        return f"shape {key[1:]}x3x32x32"
    b, t, state = key.split("_")
    return f"shape {b[1:]}x{t[1:]} ({state} state)"


def validate_models(models_dir: str | Path = MODELS_DIR, prepared_dir: str | Path = PREPARED_DIR,
                    atol: float | None = None, models: tuple[str, ...] = ("cnn", "lstm"),
                    cnn_batches: list[int] | None = None, lstm_batches: list[int] | None = None,
                    lstm_seq_lens: list[int] | None = None, params_file: str | Path = params.PARAMS_FILE) -> dict:
    """Compare eager vs TorchScript vs onnxruntime; returns the report, raises ValidationFailed.

    Tolerance and shapes not given are read from `params_file`'s `validate` section (the
    defaults live there alone). The report:
        {"atol", "passed", "tolerance": {"atol", "top1_agreement"},
         "max_abs_diff": {model: x},
         "<model>": {backend: {shape key: {"logits", ["h", "c"], "top1"}}},   # nested: `dvc metrics show`
         "checks": [{"model", "backend", "shape", "max_abs_diff", "top1_agreement", "ok"}, ...]}
    `checks` (one row per model, backend and shape; shape like "batch=5 seq=37 state=carried") is
    what the Prefect flow tabulates; the stage leaves it out of the metrics file.
    """
    if None in (atol, cnn_batches, lstm_batches, lstm_seq_lens):
        v = params.load(params_file).validation
        atol = v.atol if atol is None else atol
        cnn_batches = v.cnn_batches if cnn_batches is None else cnn_batches
        lstm_batches = v.lstm_batches if lstm_batches is None else lstm_batches
        lstm_seq_lens = v.lstm_seq_lens if lstm_seq_lens is None else lstm_seq_lens
    models_dir, prepared_dir = Path(models_dir), Path(prepared_dir)
    report: dict = {"atol": atol, "passed": True, "tolerance": {"atol": atol, "top1_agreement": 1.0},
                    "max_abs_diff": {}}
    for model in models:
        if model == "cnn":
            result = validate_cnn(models_dir / "cnn", prepared_dir / "cifar10", list(cnn_batches))
        else:
            result = validate_lstm(models_dir / "lstm", prepared_dir / "alice", list(lstm_batches),
                                   list(lstm_seq_lens))
        report[model] = result
    checks, failures = [], []
    for model in models:
        worst_of_model = 0.0
        for backend, shapes in report[model].items():
            for shape, diffs in shapes.items():
                # NaN counts as the worst difference (and fails: NaN <= atol is False)
                worst = max((k for k in diffs if k != "top1"), key=lambda k: np.nan_to_num(diffs[k], nan=np.inf))
                ok = bool(diffs[worst] <= atol and diffs["top1"] == 1.0)
                checks.append({"model": model, "backend": backend, "shape": _shape_label(model, shape),
                               "max_abs_diff": diffs[worst], "top1_agreement": diffs["top1"], "ok": ok})
                worst_of_model = max(worst_of_model, np.nan_to_num(diffs[worst], nan=np.inf))
                where = f"{model} {backend} {_describe(model, shape)}"
                if not diffs[worst] <= atol:
                    failures.append(f"{where}: max |{worst} difference| = {diffs[worst]:.3g} > atol {atol:g}")
                elif diffs["top1"] < 1.0:
                    failures.append(f"{where}: top-1 agreement {diffs['top1']:.2%} < 100%")
        report["max_abs_diff"][model] = float(worst_of_model)
    report["checks"] = checks
    if failures:
        report["passed"] = False
        raise ValidationFailed(f"exported model disagrees with PyTorch: {failures[0]}"
                               + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""), report)
    return report


def main(models: tuple[str, ...] = ("cnn", "lstm"), models_dir: str | Path = MODELS_DIR,
         prepared_dir: str | Path = PREPARED_DIR, report_path: str | Path = REPORT) -> dict:
    try:
        report = validate_models(models_dir, prepared_dir, models=models)
    except ValidationFailed:
        Path(report_path).unlink(missing_ok=True)  # an earlier passing report must not look current
        raise
    # the metric file: everything but the per-check rows (the nested dict is what `dvc metrics` shows)
    files.write_json(report_path, {key: value for key, value in report.items() if key != "checks"})
    for model, diff in report["max_abs_diff"].items():
        print(f"{model}: TorchScript and onnxruntime agree with PyTorch (max |diff| {diff:.2g} <= {report['atol']:g})")
    return report


if __name__ == "__main__":
    run(main, parse_models(__doc__.splitlines()[0]))
