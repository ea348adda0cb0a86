"""Prefect flow `promote`: release a retrained model and move a registry stage to it, only if it is better.

    python flows/promote.py cifar10-cnn [v1.2.0] [--stage prod] [--repo .]    # no version: the next minor

The candidate is `version` if it is already released, else the committed HEAD (released as
`version` when it wins, through `ptpipe.registry.release`: the same checks as `ptpipe release`).
Its metric is read from git at its commit and compared with the metric at the commit of the
version the stage names now (`ptpipe serve --model NAME#prod` serves that one). Which metric: the
model's kind says (`KIND.metric`), in the model's evaluate stage's file:

    image classifiers (cnn)     metrics/<model>/evaluate.json  test.acc           higher is better
    text models (lstm, gpt)     metrics/<model>/evaluate.json  val_bits_per_char  lower is better

(the model: the artifact's folder, models/<model>; --metric-file / --metric-key / --higher-is-better
choose another). Only a
strictly better candidate is released and promoted; without a current version in the stage the
candidate is promoted. A worse or equal one changes nothing (no tag, no push) and the run says
why. Run it after `retrain` has committed its results; a server polling the stage
(`ptpipe serve --poll-s`) or a POST /v2/repository/models/NAME/load then swaps the new version in.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task

from ptpipe import registry
from ptpipe.stage import StageError

def criterion(repo: str, name: str, metric_file: str | None, metric_key: str | None,
              higher_is_better: bool | None) -> tuple[str, str, bool]:
    """(metrics file, dotted key, higher is better) of artifact `name`: its model's kind's metric unless given."""
    known = registry.artifacts(repo)
    if name not in known:
        raise StageError(f"no artifact {name!r} in dvc.yaml or params.yaml models; known: {', '.join(sorted(known))}")
    model = Path(known[name]["path"]).name
    if metric_file and metric_key and higher_is_better is not None:
        return metric_file, metric_key, higher_is_better
    import yaml

    from ptpipe import kinds

    models = yaml.safe_load((Path(repo) / "params.yaml").read_text()).get("models") or {}
    if model not in models:
        raise StageError(f"{name}'s folder models/{model} is no model of params.yaml: pass --metric-file, "
                         f"--metric-key and --higher-is-better")
    key, higher = kinds.get(models[model].get("kind"), f"params.yaml models.{model}").metric
    return (metric_file or f"metrics/{model}/evaluate.json", metric_key or key,
            higher if higher_is_better is None else higher_is_better)


def next_version(repo: str, name: str) -> str:
    """The next minor version after the highest released one (v0.1.0 for the first): what a retrain releases."""
    released = [tuple(int(p) for p in r["version"][1:].split(".")) for r in registry.versions(name, repo)
                if registry.SEMVER.match(r["version"])]
    major, minor, _ = max(released, default=(0, 0, 0))
    return f"v{major}.{minor + 1}.0"


def is_better(candidate: float, current: float | None, higher: bool) -> bool:
    return current is None or (candidate > current if higher else candidate < current)


@task(name="read-metric")
def read_metric(repo: str, commit: str, file: str, key: str) -> float:
    """The metric as committed at `commit` (metrics files are kept in git: cache: false in dvc.yaml)."""
    shown = subprocess.run(["git", "show", f"{commit}:{file}"], cwd=repo, capture_output=True, text=True)
    if shown.returncode != 0:
        raise StageError(f"{file} is not committed at {commit[:8]}: {shown.stderr.strip()}")
    value = json.loads(shown.stdout)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise StageError(f"{file} at {commit[:8]} has no {key}")
        value = value[part]
    return float(value)


@task(name="find-versions")
def find_versions(repo: str, name: str, version: str, stage: str) -> tuple[dict, dict | None]:
    """(candidate {version, commit, released}, current {version, commit} of `stage` or None)."""
    rows = registry.versions(name, repo)
    current = next(({"version": r["version"], "commit": r["commit"]} for r in rows if stage in r["stages"]), None)
    released = next((r for r in rows if r["version"] == version), None)
    if released:
        return {"version": version, "commit": released["commit"], "released": True}, current
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    return {"version": version, "commit": head.stdout.strip(), "released": False}, current


@flow(name="promote")
def promote(name: str, version: str | None = None, stage: str = "prod", repo: str = ".", metric_file: str | None = None,
            metric_key: str | None = None, higher_is_better: bool | None = None) -> dict:
    """Release (if needed) and assign `stage` to `version` of `name` only if its metric beats the stage's.
    Without `version`, the committed HEAD as the next minor version (`next_version`)."""
    log = get_run_logger()
    version = version or next_version(repo, name)
    file, key, higher = criterion(repo, name, metric_file, metric_key, higher_is_better)
    candidate, current = find_versions(repo, name, version, stage)
    candidate["metric"] = read_metric(repo, candidate["commit"], file, key)
    if current:
        current["metric"] = read_metric(repo, current["commit"], file, key)
    better = is_better(candidate["metric"], current and current["metric"], higher)
    result = {"name": name, "stage": stage, "metric": key, "candidate": candidate, "current": current,
              "promoted": better}
    if not better:
        log.info(f"{name} {version}: {key} {candidate['metric']} is not better than {current['version']}'s "
                 f"{current['metric']}: {stage} stays at {current['version']}")
        return result
    if not candidate["released"]:
        registry.release(name, version, repo=repo)
    registry.promote(name, version, stage, repo=repo)
    log.info(f"{name} {version} -> {stage} ({key} {candidate['metric']}"
             + (f", was {current['version']} with {current['metric']})" if current else ")"))
    return result


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("version", nargs="?", default=None, help="default: the next minor version")
    ap.add_argument("--stage", default="prod")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--metric-file", default=None, help="default: metrics/<model>/evaluate.json")
    ap.add_argument("--metric-key", default=None, help="dotted key in it (default: the model kind's metric)")
    ap.add_argument("--higher-is-better", default=None, type=lambda v: {"true": True, "false": False}[v.lower()],
                    metavar="true|false", help="the metric's direction (default: the model kind's)")
    args = ap.parse_args()
    print(json.dumps(promote(args.name, args.version, args.stage, args.repo, args.metric_file, args.metric_key,
                             args.higher_is_better), indent=2))
