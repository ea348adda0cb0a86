"""Prefect flow `validate-onnx`: compare the exported ONNX models with PyTorch, one table per model and shape.

It calls `ptpipe.validate.validate_models`, the function the DVC `validate` stage runs, on
the workspace models or on the models of a given git revision / experiment (`rev`, fetched
from the DVC cache). Each (model, shape) gets a table artifact `onnx-<model>-<shape>` with
one row per backend (max |difference|, top-1 agreement, ok). The flow ends Failed, naming
model, backend, shape and difference, when a tolerance is exceeded; `ptpipe.incidents`
records it under `incidents/`. It holds the `dvc-repo` slot (`ptpipe.repo_slot`) while it
reads the workspace, so it never sees a retrain's half-replaced models.

Contract of ptpipe.validate (issue 5), the validate stage's own function:
    validate_models(models_dir, prepared_dir, ..., params_file) -> dict
        report = {"tolerance": {...}, "checks": [{"model": "cnn", "backend": "onnxruntime",
                  "shape": "batch=7", "max_abs_diff": 3e-07, "top1_agreement": 1.0, "ok": True}, ...], ...}
    On a tolerance excess it raises ValidationFailed (a StageError) whose `.report` is that report.
The tolerance and shapes come from the `validate` section of the repository's params.yaml.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from ptpipe import incidents, inference, kinds, pipeline, repo_slot
from ptpipe.stage import StageError

COLUMNS = ["model", "shape", "backend", "max_abs_diff", "top1_agreement", "ok"]


class ToleranceExceeded(StageError):
    stage = "validate"


def fetch_models(repo: str, rev: str, dest: Path) -> Path:
    """Copy `models/` as of git revision or experiment `rev` out of the DVC cache into `dest`."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(repo, rev=rev)
    exported = [inference.exported_file(kind).as_posix() for kind in kinds.names()]
    if not any(fs.exists(path) for path in exported):  # (not "models/": its README is in git everywhere)
        raise StageError(f"revision {rev!r} has no exported model ({' or '.join(exported)}): "
                         f"run the pipeline there and commit dvc.lock")
    fs.get("models", str(dest / "models"), recursive=True)
    return dest / "models"


def tables(report: dict) -> dict[tuple[str, str], list[dict]]:
    """Rows of the report grouped by (model, shape), one row per backend."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for check in report.get("checks", []):
        row = {column: check.get(column) for column in COLUMNS}
        grouped.setdefault((str(row["model"]), str(row["shape"])), []).append(row)
    return grouped


def failures(report: dict) -> list[str]:
    return [
        f"{c.get('model')} {c.get('backend')} {c.get('shape')}: max |diff| {c.get('max_abs_diff')}, "
        f"top-1 agreement {c.get('top1_agreement')}"
        for c in report.get("checks", [])
        if not c.get("ok", False)
    ]


def artifact_key(model: str, shape: str) -> str:
    return "onnx-" + re.sub(r"[^a-z0-9]+", "-", f"{model}-{shape}".lower()).strip("-")


@task(name="validate-models")
def run_validation(models_dir: str, data_dir: str, params_file: str) -> dict:
    if not Path(models_dir).is_dir():
        raise StageError(f"no models in {models_dir}: run the pipeline (`dvc repro`) first, or pass `rev`")
    from ptpipe.validate import ValidationFailed, validate_models  # torch + onnxruntime: at run time only

    try:
        return validate_models(Path(models_dir), Path(data_dir), params_file=params_file)
    except ValidationFailed as err:
        return err.report  # tolerance exceeded: tabulate first, fail the flow below


@flow(name="validate-onnx", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def validate_onnx(repo: str = ".", rev: str | None = None, slot_held: bool = False) -> dict:
    """Validate the workspace models (rev=None) or those of `rev`; Failed on a tolerance excess.

    Holds the `dvc-repo` slot while it reads the workspace (models, params.yaml, prepared data),
    unless `slot_held`: the retrain that calls it as a subflow holds it already."""
    logger = get_run_logger()
    root = pipeline.repo_root(repo)
    with contextlib.nullcontext() if slot_held else repo_slot.hold(logger):
        with tempfile.TemporaryDirectory(prefix="ptpipe-models-") as tmp:
            models_dir = fetch_models(str(root), rev, Path(tmp)) if rev else root / "models"
            report = run_validation(str(models_dir), str(root / "data" / "prepared"), str(root / "params.yaml"))
    for (model, shape), rows in tables(report).items():
        create_table_artifact(
            table=rows,
            key=artifact_key(model, shape),
            description=f"ONNX vs PyTorch, {model} at {shape}" + (f" (rev {rev})" if rev else ""),
        )
    bad = failures(report)
    if bad:
        raise ToleranceExceeded("tolerance exceeded:\n  " + "\n  ".join(bad))
    logger.info("%d checks within tolerance", len(report.get("checks", [])))
    return report


if __name__ == "__main__":
    validate_onnx()
