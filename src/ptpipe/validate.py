"""Stage `validate`: the exported files compute what the trained weights compute, for any model.

    python -m ptpipe.validate --model-dir models/lstm --data data/prepared/alice \
        --metrics metrics/lstm/validate.json --report reports/lstm/validate.json

`validate_models` is THE check (the stage and the Prefect validation flow call it): for each model, the
eager PyTorch model rebuilt from model.pt is the reference; the TorchScript file (torch.jit.load)
and the ONNX file (onnxruntime, the session options of `ptpipe.inference`) run the same real
prepared data it was trained on (the data set its model.pt names) at shapes the export never saw.
The cases come from the model's kind
(`ptpipe.kinds.<kind>.KIND.validation_cases`, sizes from `validate.shapes.<kind>` in params.yaml):
e.g. the CNN's first 1, 7, 64 test images; the LSTM's batch 1 and 5 streams of validation text at
lengths 1, 37, 256, each from a zero state and then the next window from the state that backend
itself returned (the carry generation relies on); gpt's windows, and its cached path (a prompt, then
single ids fed with the keys/values that backend returned) against eager's UNCACHED window over the
same characters at every step (`Case.reference`).

Before anything runs, each file must be a ptpipe export of that kind with the kind's inputs and
exported from the model.pt beside it; anything else is a one-line error (exit 2).

Per (model, backend, case): max |difference| of every output of every step, and top-1 agreement
(argmax of the first output, the logits). Any max difference > validate.atol or agreement < 100%
raises `ValidationFailed` naming model, backend, case and difference, with the full report attached
as `.report`. The stage writes a small DVC metric (`--metrics`: passed, and max |difference| per
model and backend, so `dvc metrics show/diff` stays readable) only when everything passed, and the
per-case report (`--report`) in any case it got as far as comparing; any failure removes the metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ptpipe import data, files, inference, kinds, params, stage
from ptpipe.export import load_torchscript
from ptpipe.stage import StageError

BACKENDS = ("torchscript", "onnxruntime")


class ValidationFailed(StageError):
    """An exported model disagrees with its eager original beyond the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _onnx_runner(session) -> inference.Run:
    return inference.onnx_runner(session)


def _open_exports(kind: kinds.ModelKind, config: dict, model_dir: Path) -> dict[str, inference.Run]:
    """{backend: run} of the kind's exported files, each checked first: a ptpipe export of this kind,
    with the inputs the kind declares, exported from the model.pt beside it."""
    signature = kind.signature(config)
    onnx_path, ts_path = model_dir / "model.onnx", model_dir / "model.ts"
    session, _ = inference.open_checked(onnx_path, expect_kind=kind.name)
    inference.check_inputs(session, signature["inputs"], onnx_path)
    scripted, meta = load_torchscript(ts_path)
    inference.check_ptpipe_meta(meta, ts_path, kind.name)
    inference.check_fresh(ts_path, meta)
    if [(i["name"], i["dtype"]) for i in meta["inputs"]] != [(i["name"], i["dtype"]) for i in signature["inputs"]]:
        raise StageError(f"{ts_path}: its config.json declares other inputs than its kind: run `dvc repro export`")
    return {"torchscript": kinds.runner(scripted, signature), "onnxruntime": _onnx_runner(session)}


def _run_case(run: inference.Run, case: kinds.Case) -> list[dict[str, np.ndarray]]:
    """The outputs of every step, later steps fed the carried outputs of this backend's previous step."""
    outs: list[dict[str, np.ndarray]] = []
    for feeds in case.steps:
        if outs:
            feeds = {**feeds, **{inp: outs[-1][out] for out, inp in case.carry.items()}}
        outs.append(run(feeds))
    return outs


def _compare(ref: list[dict], got: list[dict], logits: str) -> dict:
    """{<output>: max |diff| over all steps, ..., top1: worst agreement of the logits' argmax}. A reference
    output longer along axis 1 (an uncached window's logits) is compared on its last positions."""
    def last(r: np.ndarray, g: np.ndarray) -> np.ndarray:
        return r[:, r.shape[1] - g.shape[1]:] if r.ndim > 1 and r.shape[1] > g.shape[1] else r

    out = {name: max(float(np.max(np.abs(last(r[name], g[name]).astype(np.float64) - g[name])))
                     for r, g in zip(ref, got)) for name in ref[0]}
    out["top1"] = min(float(np.mean(last(r[logits], g[logits]).argmax(-1) == g[logits].argmax(-1)))
                      for r, g in zip(ref, got))
    return out


def validate_model(model_dir: Path, data_dir: Path, shapes: dict) -> dict:
    """{backend: {case label: {<output>..., top1}}} for one model, on `data_dir` (the data it trained on)."""
    kind, eager, config = kinds.load(model_dir / "model.pt")
    if kind.name not in shapes:  # a params problem: said before the exports are read
        raise StageError(f"params.yaml: validate.shapes.{kind.name}: missing (the sizes to validate {kind.name} at)")
    data.check_same_data(config, data_dir, model_dir / "model.pt")
    backends = _open_exports(kind, config, model_dir)
    cases = kind.validation_cases(config, data_dir, shapes[kind.name])
    reference = kinds.runner(eager, kind.signature(config))
    logits = kind.outputs[0].name
    report = {b: {} for b in BACKENDS}
    for case in cases:
        ref = _run_case(reference, case) if case.reference is None else [reference(f) for f in case.reference]
        for backend, run in backends.items():
            report[backend][case.label] = _compare(ref, _run_case(run, case), logits)
    return report


def validate_models(models: dict[str, tuple[Path, Path]], atol: float | None = None, shapes: dict | None = None,
                    params_file: str | Path = params.PARAMS_FILE) -> dict:
    """Compare eager vs TorchScript vs onnxruntime; returns the report, raises ValidationFailed.

    `models`: {model name: (its folder holding model.pt and the exports, the prepared data it trained on)}
    (`workspace_models` lists a project's). Tolerance and shapes not given are read from `params_file`'s
    `validate` section (the defaults live there alone). The report:
        {"atol", "passed", "tolerance": {"atol", "top1_agreement"},
         "max_abs_diff": {model: {backend: x}},
         "<model>": {backend: {case label: {<output>, ..., "top1"}}},
         "checks": [{"model", "backend", "shape", "max_abs_diff", "top1_agreement", "ok"}, ...]}
    `checks` (one row per model, backend and case; "shape" is the case label, e.g. "batch=5 seq=37
    state=carried") is what the Prefect flow tabulates.
    """
    if atol is None or shapes is None:
        v = params.load(params_file).validation
        atol = v.atol if atol is None else atol
        shapes = v.shapes if shapes is None else shapes
    report: dict = {"atol": atol, "passed": True, "tolerance": {"atol": atol, "top1_agreement": 1.0},
                    "max_abs_diff": {}}
    for model, (model_dir, data_dir) in models.items():
        report[model] = validate_model(Path(model_dir), Path(data_dir), shapes)
    checks, failures = [], []
    for model in models:
        report["max_abs_diff"][model] = {}
        for backend, cases in report[model].items():
            worst_of_backend = 0.0
            for label, diffs in cases.items():
                # NaN counts as the worst difference (and fails: NaN <= atol is False)
                worst = max((k for k in diffs if k != "top1"), key=lambda k: np.nan_to_num(diffs[k], nan=np.inf))
                ok = bool(diffs[worst] <= atol and diffs["top1"] == 1.0)
                checks.append({"model": model, "backend": backend, "shape": label,
                               "max_abs_diff": diffs[worst], "top1_agreement": diffs["top1"], "ok": ok})
                worst_of_backend = max(worst_of_backend, np.nan_to_num(diffs[worst], nan=np.inf))
                where = f"{model} {backend} {label}"
                if not diffs[worst] <= atol:
                    failures.append(f"{where}: max |{worst} difference| = {diffs[worst]:.3g} > atol {atol:g}")
                elif diffs["top1"] < 1.0:
                    failures.append(f"{where}: top-1 agreement {diffs['top1']:.2%} < 100%")
            report["max_abs_diff"][model][backend] = float(worst_of_backend)
    report["checks"] = checks
    if failures:
        report["passed"] = False
        raise ValidationFailed(f"exported model disagrees with PyTorch: {failures[0]}"
                               + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""), report)
    return report


def workspace_models(root: str | Path = ".", params_file: str | Path = params.PARAMS_FILE,
                     models_dir: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{name: (models/<name>, data/prepared/<its data set>)} of every model in params.yaml
    (`models_dir`: another folder of models/<name>/, e.g. a revision's, fetched by the validation flow)."""
    root = Path(root)
    p = params.load(params_file)
    folder = Path(models_dir) if models_dir is not None else root / "models"
    return {name: (folder / name, root / "data" / "prepared" / m.data) for name, m in p.models.items()}


def summary(report: dict) -> dict:
    """The DVC metric: a few numbers per model (the per-case rows are in the report file)."""
    return {"passed": report["passed"], "atol": report["atol"], "max_abs_diff": report["max_abs_diff"]}


def validate(model_dir: str | Path, data_dir: str | Path, metrics_path: str | Path, report_path: str | Path,
             params_file: str | Path = params.PARAMS_FILE) -> dict:
    """The stage: one model; the metric only when everything passed, the report whenever it got as far as comparing."""
    metrics_path, report_path, model_dir = Path(metrics_path), Path(report_path), Path(model_dir)
    try:
        report = validate_models({model_dir.name: (model_dir, Path(data_dir))}, params_file=params_file)
    except ValidationFailed as err:
        metrics_path.unlink(missing_ok=True)  # an earlier passing metric must not look current
        files.write_json(report_path, err.report)  # which cases failed, for the user to read
        raise
    except BaseException:  # a bad file, params, a crash, an interrupt: no metric, no report from before
        metrics_path.unlink(missing_ok=True)
        report_path.unlink(missing_ok=True)
        raise
    files.write_json(report_path, report)
    files.write_json(metrics_path, summary(report))
    for model, diffs in report["max_abs_diff"].items():
        print(f"{model}: TorchScript and onnxruntime agree with PyTorch (max |diff| {max(diffs.values()):.2g} "
              f"<= {report['atol']:g})")
    return report


def main() -> None:
    args = stage.parser(__doc__, "model-dir", "data", "metrics", "report").parse_args()
    stage.run(validate, args.model_dir, args.data, args.metrics, args.report, args.params)


if __name__ == "__main__":
    main()
