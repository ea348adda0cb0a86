"""Prefect flow `monitor`: compare the last window of served traffic with each model's reference; a drifted
model emits the Prefect event `ptpipe.model.drifted`, which the `retrain/on-drift` automation answers.

    python flows/monitor.py --log predictions.sqlite --model cifar10-cnn     # or deploy: prefect.yaml `monitor/hourly`

For every served model (request.models, or every model the server at request.server lists):

1. the last `monitor.window` requests (params.yaml) of the prediction log (`ptpipe serve --log`,
   `ptpipe.predlog.read_window`), those answered by the newest version in it (after a swap the older
   version's rows are not its traffic);
2. that version's reference (`ptpipe.drift.load_reference`: the export stage records it inside model.onnx):
   a released version's (vX.Y.Z) file is fetched from the registry as the server fetched it, a workspace
   model's is models/<model>/model.onnx;
3. `ptpipe.drift.check` with params.yaml's `monitor` thresholds: input drift, prediction drift, confidence,
   live accuracy on labelled feedback; `drifted` and the reasons;
4. written where a person looks (reports/monitor/<model>/): `history.tsv`, one row per run, every figure a
   column (`dvc plots show reports/monitor/<model>/history.tsv -x time -y <figure>` draws it over time, as does
   any spreadsheet: one plain file beside the project's DVC plots, nothing to run); `report.html`, the latest
   window with every figure's history drawn as inline SVG (no script, no CDN: it renders offline); and the
   Prefect markdown artifact `monitor-<model>` (the figures, the verdict), in the run's Artifacts tab;
5. drifted: the event `ptpipe.model.drifted` (resource `ptpipe.model.<name>` with the version as a label,
   the figures and reasons as payload). The event is emitted for every drifted window, so the
   event feed shows the whole episode; the cooldown is the automation's (`within` in prefect.yaml: one
   retrain per model per period however many windows drift), not this flow's memory.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field

from ptpipe import drift, files, incidents, params, pipeline, predlog, registry
from ptpipe.stage import StageError

EVENT = "ptpipe.model.drifted"
HISTORY_ROWS = 10_000  # history.tsv keeps the newest rows: a run an hour is more than a year
WHEN = ("time", "first", "last")  # a result's times: the history's first column and the report's header, no figure


class MonitorRequest(BaseModel):
    """What to monitor. Unknown keys are refused (a misspelt key would otherwise be a silent default)."""

    model_config = ConfigDict(extra="forbid")
    log: str = Field(description="The prediction log, as given to `ptpipe serve --log`")
    models: list[str] = Field(default_factory=list, description="Served model names; empty: every model of `server`")
    server: str | None = Field(None, description="The server's URL (http://host:port), to list its models")
    reports: str = Field("reports/monitor", description="Where history.tsv and report.html go, one folder a model")


def served_models(request: MonitorRequest) -> list[str]:
    """request.models, or the names the server's model repository index lists."""
    if request.models:
        return list(request.models)
    if not request.server:
        raise StageError("request.models is empty and request.server is not set: name the models or the server")
    import httpx

    try:
        index = httpx.post(f"{request.server.rstrip('/')}/v2/repository/index", json={}, timeout=10)
        index.raise_for_status()
    except httpx.HTTPError as exc:
        raise StageError(f"request.server {request.server}: cannot list its models ({exc})") from None
    return [row["name"] for row in index.json()]


def thresholds(repo: str) -> dict:
    """params.yaml's `monitor` section, checked (ptpipe.params.Monitor): the window and the tests' thresholds."""
    import yaml

    path = Path(repo) / params.PARAMS_FILE
    section = (yaml.safe_load(path.read_text()) or {}).get("monitor") if path.is_file() else None
    if section is None:
        raise StageError(f"{path} has no monitor section: add one (params.yaml of ptpipe has the defaults), "
                         f"or pass repo, the project whose params.yaml has it")
    return params.thresholds(section, str(path))


def artifact_path(repo: str, name: str) -> str:
    """The folder of artifact `name` (dvc.yaml's artifacts, params.yaml's models): a served name must be one."""
    known = registry.artifacts(repo)
    if name not in known:
        raise StageError(f"request.models: {name!r} is no artifact of {repo}'s dvc.yaml or params.yaml models; "
                         f"known: {', '.join(sorted(known))}")
    return known[name]["path"]


def reference_of(repo: str, name: str, version: str) -> dict:
    """The reference `version` of model `name` carries: from the registry for a released version, else the
    workspace model's (a workspace model's version is its file's md5, with no tag to fetch)."""
    path = artifact_path(repo, name)
    if registry.SEMVER.match(version):
        return drift.load_reference(registry.fetch_model(name, version, repo=repo))
    return drift.load_reference(Path(repo) / path)


def newest_version_only(window: predlog.Window) -> predlog.Window:
    """The rows answered by the newest version in the window (the last row's)."""
    keep = [i for i, v in enumerate(window.versions) if v == window.versions[-1]]
    if len(keep) == len(window.ids):
        return window
    pick = lambda seq: [seq[i] for i in keep]  # noqa: E731
    return window._replace(ids=pick(window.ids), times=window.times[keep], versions=pick(window.versions),
                           outputs=window.outputs[keep], stats=window.stats[keep], labels=pick(window.labels))


def figures(result: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a check result, flattened to `a.b.c` keys (what history.tsv and the charts hold)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if not prefix and key in WHEN:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(figures(value, f"{name}."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


@task(name="check-model")
def check_model(request: MonitorRequest, repo: str, name: str, limits: dict) -> dict:
    window = predlog.read_window(request.log, name, limits["window"])
    if not window.ids:
        return {"model": name, "version": None, "n": 0, "drifted": False, "reasons": [], "skipped": "no requests logged"}
    window = newest_version_only(window)
    version = window.versions[-1]
    result = drift.check(reference_of(repo, name, version), window, limits)
    return {**result, "model": name, "version": version, "time": time.time(),
            "first": float(window.times[0]), "last": float(window.times[-1])}


# -- what a person looks at ------------------------------------------------------------------------

def append_history(path: Path, row: dict) -> list[dict]:
    """Add `row` to the TSV at `path` (columns: the union of every row's keys; written atomically)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t")) if path.is_file() else []
    rows = (rows + [row])[-HISTORY_ROWS:]
    columns = list(dict.fromkeys(key for r in rows for key in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, delimiter="\t", restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, text.getvalue())
    return rows


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sparkline(values: list[float | None], threshold: float | None = None, log: bool = False,
              width: int = 320, height: int = 60) -> str:
    """An inline SVG line of `values` (gaps where a run had no value), its range on the left; `log`: a log10
    axis (p-values span hundreds of decades); `threshold`: a dashed red line at that value."""
    scale = (lambda v: math.log10(max(v, 1e-300))) if log else (lambda v: v)  # noqa: E731
    known = [scale(v) for v in values if v is not None] + ([scale(threshold)] if threshold is not None else [])
    if not known:
        return ""
    low, high = min(known), max(known)
    y = lambda v: height - 6 - (scale(v) - low) / ((high - low) or 1.0) * (height - 12)  # noqa: E731
    step = (width - 60) / max(len(values) - 1, 1)
    points = " ".join(f"{60 + i * step:.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None)
    label = (lambda v: f"{10 ** v:.2g}") if log else (lambda v: f"{v:.4g}")  # noqa: E731
    rule = (f"<line x1='60' x2='{width}' y1='{y(threshold):.1f}' y2='{y(threshold):.1f}' stroke='#d1242f' "
            f"stroke-dasharray='4 3'/>" if threshold is not None else "")
    return (f"<svg width='{width}' height='{height}' role='img'>"
            f"<text x='0' y='12' class='axis'>{label(high)}</text><text x='0' y='{height - 2}' class='axis'>"
            f"{label(low)}</text>{rule}<polyline fill='none' stroke='#1f6feb' stroke-width='1.5' points='{points}'/></svg>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:2px 10px;text-align:left}h2{font-size:1.1em;margin-top:1.5em}
.axis{font-size:10px;fill:#666}summary{margin:.5em 0;cursor:pointer;color:#555}
.verdict{padding:.6em 1em;border-radius:4px}.ok{background:#e6f4ea}.drifted{background:#fde7e9}"""


def _row(key: str, value: float, history: list[dict], p_value: float | None) -> str:
    leaf = key.rsplit(".", 1)[-1]
    line = "" if leaf.startswith("reference_") else sparkline(  # a reference's numbers are constant for a version
        [_number(r.get(key)) for r in history], threshold=p_value if leaf == "p_value" else None,
        log=leaf == "p_value")
    return f"<tr><th>{html.escape(key)}</th><td>{value:.4g}</td><td>{line}</td></tr>"


def _table(rows: list[str], runs: int) -> str:
    return (f"<table><tr><th>figure</th><th>this window</th><th>over the last {runs} run(s)</th></tr>"
            f"{''.join(rows)}</table>")


def render_html(result: dict, history: list[dict], p_value: float | None = None) -> str:
    """The report page: the verdict, then one table per part of the check (its headline figures; per feature /
    per class figures folded below), each figure with its history; p-values on a log axis with the threshold
    `p_value` drawn. No script, no external file: it renders offline."""
    esc = html.escape
    parts: dict[str, tuple[list[str], list[str]]] = {}
    for key, value in figures(result).items():
        part = parts.setdefault(key.split(".", 1)[0] if "." in key else "window", ([], []))
        part[key.count(".") > 1].append(_row(key, value, history, p_value))
    sections = "".join(
        f"<h2>{esc(name)}</h2>{_table(head, len(history)) if head else ''}"
        + (f"<details><summary>{len(detail)} more: per feature / per class</summary>{_table(detail, len(history))}"
           f"</details>" if detail else "") for name, (head, detail) in parts.items())
    verdict = "drifted: " + "; ".join(result["reasons"]) if result["drifted"] else "no drift"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result["time"]))
    first = history[0].get("time", "") if history else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>monitor {esc(result['model'])}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(result['model'])} {esc(str(result['version']))}</h1>"
            f"<p>{when}: the last {result['n']} requests; history since {esc(first)}.</p>"
            f"<p class='verdict {'drifted' if result['drifted'] else 'ok'}'>{esc(verdict)}</p>{sections}</body></html>")


def render_markdown(result: dict, report: Path) -> str:
    """The artifact: the verdict, the reasons and the headline figures (the report has the rest)."""
    lines = [f"# {result['model']} {result['version']}: {'**drifted**' if result['drifted'] else 'no drift'}", ""]
    lines += [f"- {reason}" for reason in result["reasons"]] + ["", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in figures(result).items() if key.count(".") <= 1]
    return "\n".join(lines + ["", f"Report: `{report}`; history: `{report.with_name('history.tsv')}`"])


@task(name="record")
def record(request: MonitorRequest, repo: str, result: dict, p_value: float) -> str:
    """history.tsv, report.html and the markdown artifact of one model's window; returns the report's path."""
    folder = Path(repo) / request.reports / result["model"]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result["time"]))
    history = append_history(folder / "history.tsv", {"time": when, "version": result["version"], **figures(result)})
    report = folder / "report.html"
    files.write_text(report, render_html(result, history, p_value))
    create_markdown_artifact(markdown=render_markdown(result, report), key=artifact_key(result["model"]),
                             description=f"drift and accuracy of {result['model']}'s last window")
    return str(report)


def artifact_key(name: str) -> str:
    return pipeline.artifact_key("monitor", name)


def emit_drifted(result: dict, report: str) -> None:
    from prefect.events import emit_event

    emit_event(event=EVENT,
               resource={"prefect.resource.id": f"ptpipe.model.{result['model']}",
                         "prefect.resource.name": result["model"], "ptpipe.version": str(result["version"])},
               payload={"reasons": result["reasons"], "figures": figures(result), "n": result["n"], "report": report})


@flow(name="monitor", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def monitor(request: MonitorRequest, repo: str = ".") -> list[dict]:
    """Check every served model's last window (module docstring) with the monitor section of `repo`'s
    params.yaml and its models' artifacts; returns one result per model. Something
    the user can fix (a bad parameter, an unknown model, a missing reference) ends the run Failed with the
    reason as its message and last log line, as `retrain` does, and writes an incident record."""
    log = get_run_logger()
    try:
        return _monitor(request, repo, log)
    except StageError as exc:
        log.error("monitor failed: %s", exc)
        return Failed(message=f"monitor failed: {exc}", data=exc)


def _monitor(request: MonitorRequest, repo: str, log) -> list[dict]:
    names = served_models(request)
    limits = thresholds(repo)
    for name in names:  # an unknown name stops the run before anything is written
        artifact_path(repo, name)
    results = []
    for name in names:
        result = check_model.with_options(name=f"check {name}")(request, repo, name, limits)
        if result.get("skipped"):
            log.info("%s: %s", name, result["skipped"])
        else:
            result["report"] = record(request, repo, result, limits["p_value"])
            log.info("%s %s: %s", name, result["version"], "drifted: " + "; ".join(result["reasons"])
                     if result["drifted"] else "no drift")
            if result["drifted"]:
                emit_drifted(result, result["report"])
        results.append(result)
    return json.loads(json.dumps(results, default=str))  # numpy scalars and the like: plain JSON


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True)
    ap.add_argument("--model", action="append", default=[], dest="models")
    ap.add_argument("--server", default=None)
    ap.add_argument("--repo", default=".")
    args = vars(ap.parse_args())
    repo = args.pop("repo")
    print(json.dumps(monitor(MonitorRequest(**args), repo), indent=2))
