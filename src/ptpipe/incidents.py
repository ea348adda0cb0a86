"""Incident records: one small JSON file per failed flow run, in `incidents/` at the repository root.

`<repo>/incidents/<UTC time>-<flow>-<run name>.json` holds which flow, which stage (when the
error names one), the error, and where to look (flow run id, parameters). Written atomically
(ptpipe.files), so a reader never sees half a record. `on_failure` is the Prefect hook both
flows register; `write_incident` is the plain function behind it.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from ptpipe import files

INCIDENTS_DIR = "incidents"


def write_incident(
    repo: str | os.PathLike,
    flow: str,
    error: str,
    stage: str | None = None,
    **details: object,
) -> Path:
    """Write one incident record under `<repo>/incidents/` and return its path."""
    now = dt.datetime.now(dt.timezone.utc)
    run = str(details.get("flow_run_name") or "")
    slug = re.sub(r"[^a-z0-9]+", "-", f"{flow}-{run}".lower()).strip("-")
    path = Path(repo) / INCIDENTS_DIR / f"{now:%Y%m%dT%H%M%S.%fZ}-{slug}.json"
    record = {"time": now.isoformat(), "flow": flow, "stage": stage, "error": error, **details}
    files.write_json(path, record)
    return path


def _stage_of(exc: BaseException | None) -> str | None:
    """The stage an error names: `DvcFailed.stage`, or a `stage` attribute set by the flow."""
    return getattr(exc, "stage", None) if exc is not None else None


def on_failure(flow, flow_run, state) -> None:
    """Prefect `on_failure` hook: record the failed run; never raises (a hook error would hide the real one)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # result not retrievable: record what the state says
        exc = err
    if not isinstance(exc, BaseException):
        exc = None
    error = f"{type(exc).__name__}: {exc}" if exc is not None else (state.message or state.name)
    parameters = dict(flow_run.parameters or {})
    repo = parameters.get("repo") or "."
    try:
        path = write_incident(
            repo,
            flow=flow.name,
            stage=_stage_of(exc),
            error=error,
            flow_run_id=str(flow_run.id),
            flow_run_name=flow_run.name,
            deployment_id=str(flow_run.deployment_id) if flow_run.deployment_id else None,
            parameters=parameters,
        )
    except Exception as err:
        print(f"could not write the incident record: {err}")
        return
    print(f"incident recorded: {path}")
