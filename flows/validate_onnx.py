"""Prefect flow `validate-onnx`: compare the exported ONNX models with PyTorch, one summary table per model.

It calls `ptpipe.validate.validate_models`, the function the DVC `validate` stage runs, on
the workspace models or on the models of a given git revision / experiment (`rev`, fetched
from the DVC cache). Each model gets a table artifact `onnx-<model>` with one row per backend:
the worst max |difference| over all shapes (and at which shape), the lowest top-1 agreement,
how many shapes passed, ok. The per-shape rows are attached as one markdown artifact
`onnx-detail`. The flow ends Failed, naming model, backend, shape and difference, when a
tolerance is exceeded; `ptpipe.incidents` records it under `incidents/`. It holds the
`dvc-repo` slot (`ptpipe.repo_slot`) while it reads the workspace, so it never sees a
retrain's half-replaced models.

Contract of ptpipe.validate, the validate stage's own function:
    validate_models({model: (model folder, prepared data)}, ..., params_file) -> dict
        report = {"tolerance": {...}, "checks": [{"model": "cnn", "backend": "onnxruntime",
                  "shape": "batch=7", "max_abs_diff": 3e-07, "top1_agreement": 1.0, "ok": True}, ...], ...}
    On a tolerance excess it raises ValidationFailed (a StageError) whose `.report` is that report.
The tolerance and shapes come from the `validate` section of the repository's params.yaml.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ptpipe import incidents, inference, params, pipeline, repo_slot
from ptpipe.stage import StageError

COLUMNS = ["model", "shape", "backend", "max_abs_diff", "top1_agreement", "ok"]
SUMMARY_COLUMNS = ["backend", "worst_max_abs_diff", "worst_shape", "min_top1_agreement", "shapes_ok", "ok"]


class ToleranceExceeded(StageError):
    stage = "validate"


def fetch_models(repo: str, rev: str, dest: Path) -> Path:
    """Copy `models/` as of git revision or experiment `rev` out of the DVC cache into `dest`."""
    from dvc.api import DVCFileSystem

    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    with Repo(repo) as dvc_repo:
        try:
            resolve_rev(dvc_repo.scm, rev)  # git revisions and experiment names, as DVC resolves them
        except RevError:
            raise StageError(f"revision {rev!r} does not exist in {repo}: not a git commit, branch or tag, nor a "
                             f"DVC experiment (`git tag`, `dvc exp list` show what does)") from None
    fs = DVCFileSystem(repo, rev=rev)
    exported = [inference.exported_file(model).as_posix() for model in params.load(Path(repo) / "params.yaml").models]
    if not any(fs.exists(path) for path in exported):  # (not "models/": its README is in git everywhere)
        raise StageError(f"revision {rev!r} has no exported model ({' or '.join(exported)}): "
                         f"run the pipeline there and commit dvc.lock")
    fs.get("models", str(dest / "models"), recursive=True)
    return dest / "models"


def _worse(diff: object) -> float:
    """Sort key of a difference: NaN (or a missing one) counts as the worst."""
    return float("inf") if not isinstance(diff, (int, float)) or diff != diff else float(diff)


def summary_tables(report: dict) -> dict[str, list[dict]]:
    """One table per model, one row per backend: its worst shape, and whether all shapes passed."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for check in report.get("checks", []):
        grouped.setdefault(str(check.get("model")), {}).setdefault(str(check.get("backend")), []).append(check)
    tables: dict[str, list[dict]] = {}
    for model, backends in grouped.items():
        tables[model] = []
        for backend, checks in backends.items():
            worst = max(checks, key=lambda c: _worse(c.get("max_abs_diff")))
            tables[model].append({
                "backend": backend, "worst_max_abs_diff": worst.get("max_abs_diff"), "worst_shape": worst.get("shape"),
                "min_top1_agreement": min(c.get("top1_agreement", 0.0) for c in checks),
                "shapes_ok": f"{sum(bool(c.get('ok')) for c in checks)}/{len(checks)}",
                "ok": all(bool(c.get("ok")) for c in checks)})
    return tables


def detail_markdown(report: dict, rev: str | None = None) -> str:
    """Every check of the report (one row per model, backend and shape), failures first."""
    checks = sorted(report.get("checks", []), key=lambda c: bool(c.get("ok")))
    lines = [f"# ONNX vs PyTorch, every shape{f' (rev {rev})' if rev else ''}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c.get(column)) for column in COLUMNS) + " |" for c in checks]
    return "\n".join(lines) + "\n"


def failures(report: dict) -> list[str]:
    return [
        f"{c.get('model')} {c.get('backend')} {c.get('shape')}: max |diff| {c.get('max_abs_diff')}, "
        f"top-1 agreement {c.get('top1_agreement')}"
        for c in report.get("checks", [])
        if not c.get("ok", False)
    ]


def artifact_key(model: str) -> str:
    return pipeline.artifact_key("onnx", model)


@task(name="validate-models")
def run_validation(models_dir: str, root: str, params_file: str) -> dict:
    if not Path(models_dir).is_dir():
        raise StageError(f"no models in {models_dir}: run the pipeline (`dvc repro`) first, or pass `rev`")
    from ptpipe.validate import ValidationFailed, validate_models, workspace_models  # torch + onnxruntime

    try:
        return validate_models(workspace_models(root, params_file, models_dir), params_file=params_file)
    except ValidationFailed as err:
        return err.report  # tolerance exceeded: tabulate first, fail the flow below


@flow(name="validate-onnx", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def validate_onnx(repo: str = ".", rev: str | None = None, slot_held: bool = False,
                  workdir: str | None = None) -> dict:
    """Validate the workspace models (rev=None) or those of `rev`; Failed on a tolerance excess.

    Holds the `dvc-repo` slot while it reads the workspace (models, params.yaml, prepared data),
    unless `slot_held`: the retrain that calls it as a subflow holds it already. `workdir`: the
    retrain's experiment copy to read instead of the workspace (incidents still go to `repo`)."""
    logger = get_run_logger()
    root = pipeline.repo_root(repo)
    source = pipeline.repo_root(workdir) if workdir else root
    with contextlib.nullcontext() if slot_held else repo_slot.hold(logger):
        with tempfile.TemporaryDirectory(prefix="ptpipe-models-") as tmp:
            models_dir = fetch_models(str(source), rev, Path(tmp)) if rev else source / "models"
            report = run_validation(str(models_dir), str(source), str(source / "params.yaml"))
    where = f" (rev {rev})" if rev else ""
    for model, rows in summary_tables(report).items():
        create_table_artifact(table=rows, key=artifact_key(model),
                              description=f"ONNX vs PyTorch, {model}: worst shape per backend{where}; "
                                          f"every shape in artifact onnx-detail")
    if report.get("checks"):
        create_markdown_artifact(markdown=detail_markdown(report, rev), key="onnx-detail",
                                 description=f"ONNX vs PyTorch, one row per model, backend and shape{where}")
    bad = failures(report)
    if bad:
        raise ToleranceExceeded("tolerance exceeded:\n  " + "\n  ".join(bad))
    logger.info("%d checks within tolerance", len(report.get("checks", [])))
    return report


if __name__ == "__main__":
    validate_onnx()
