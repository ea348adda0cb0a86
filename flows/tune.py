"""Prefect flow `tune`: the Optuna study of params.yaml's `tune` section, every trial a DVC experiment.

A thin layer over `ptpipe.tune.run`, the function `ptpipe tune` calls (docs/tune.md):

1. check the search (`tune.load`: every searched key against params.yaml and the schema, the targets
   and metric against dvc.yaml): a bad search space fails the run here, before anything runs;
2. hold the `dvc-repo` slot (`ptpipe.repo_slot`) for the study: `dvc exp run --temp` stashes through
   the workspace for a moment at each trial's start, which must not meet a retrain running in place;
3. run the study (`workers` trials at once; `storage` shared with other machines, `push` their
   experiments), each trial's progress in the run log;
4. the report as artifacts: markdown `tune-<study>` (best params and metric, trials table, the PNG plots
   inlined) and table `tune-<study>-trials`; the same files under reports/tune/<study>/.

A failed run ends Failed with the reason; `ptpipe.incidents.on_failure` writes `incidents/<time>-tune-<run>.json`.
Run by hand: `python flows/tune.py` (repo = current directory), or deploy (prefect.yaml: `tune/study`).
"""
from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ptpipe import incidents, pipeline, repo_slot
from ptpipe import tune as tuning


@task(name="check-search")
def check_search(repo: str) -> str:
    """The study's name, once its search space has passed every check."""
    return tuning.load(repo)[1].study


@task(name="run-study")
def run_study(repo: str, workers: int, storage: str | None, push: str | None) -> dict:
    logger = get_run_logger()
    return tuning.run(repo, workers=workers, storage=storage, push=push, log=logger.info)


def artifact_key(study: str) -> str:
    return pipeline.artifact_key("tune", study)


def inline_images(info: dict) -> dict[str, str]:
    """{title: data: URI} of the report's PNG files, so the artifact shows them with no file server."""
    return {title: "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
            for title, path in info["images"].items()}


@flow(name="tune", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def tune(repo: str = ".", workers: int = 1, storage: str | None = None, push: str | None = None) -> dict:
    """Run (or resume, or join) the study; returns the report's summary (best trial, every trial)."""
    logger = get_run_logger()
    study = check_search(repo)
    with repo_slot.hold(logger):
        info = run_study(repo, workers, storage, push)
    key = artifact_key(study)
    create_markdown_artifact(markdown=tuning.report_markdown(info, inline_images(info)), key=key,
                             description=f"Optuna study {study}: best trial, every trial, plots "
                                         f"(files in {info['report_dir']})")
    rows = [{"trial": r["number"], "experiment": r["experiment"], "state": r["state"], "value": r["value"],
             "epochs": r["epochs"], **{k: v for k, v in r["params"].items()}} for r in info["trials"]]
    create_table_artifact(table=rows, key=f"{key}-trials", description=f"Optuna study {study}: one row per trial")
    return info


if __name__ == "__main__":
    tune()
