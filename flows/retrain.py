"""Prefect flow `retrain`: run the DVC pipeline, one task per stage, and report what came out.

A thin layer over `ptpipe.pipeline` (the same `dvc repro` the command line runs):

1. validate the overrides (`dvc exp run -S` syntax) against the params schema on a copy of
   params.yaml: a bad override fails here, before DVC runs;
2. wait for the global concurrency limit `dvc-repo` (1 slot, created if missing), so a second
   retrain queues behind the first instead of failing on DVC's repository lock;
3. write the overrides into params.yaml, then `dvc repro --single-item <stage>` for every
   stage found in dvc.yaml at run time, dependencies first (stages added later run too);
   the download stages retry with exponential backoff; dvc output streams to the run log;
4. with overrides, `dvc exp save` records the result as an experiment (what `dvc exp run -S`
   would do); either way a markdown artifact `retrain-report` holds revision, params changed
   and `dvc metrics show`;
5. when the pipeline has a `validate` stage, the `validate-onnx` flow runs as a subflow, still
   inside the slot, so every retrain ends with the per-model/per-shape tables; when the validate
   stage fails, the subflow runs before the retrain fails, so the failing shapes are tabulated.

On failure `ptpipe.incidents.on_failure` writes `incidents/<time>-retrain-<run>.json`.
Run by hand: `python flows/retrain.py` (repo = current directory), or deploy (prefect.yaml).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from ptpipe import incidents, pipeline, repo_slot


class RetrainRequest(BaseModel):
    """What a retrain run changes; the defaults reproduce the committed params."""

    set_params: list[str] = Field(
        default_factory=list,
        description="Overrides as typed after `dvc exp run -S`, e.g. ['lr=0.01', 'prepare.cifar10.seed=1']",
    )
    experiment: str | None = Field(None, description="Name for `dvc exp save` (only used with overrides)")
    download_retries: int = Field(3, ge=0, le=10, description="Extra attempts of a failed download stage")
    retry_delay_s: float = Field(10.0, ge=0, description="First retry delay in seconds; doubles each attempt")
    validate_after: bool = Field(True, description="Run validate-onnx when the pipeline has a validate stage")


@task(name="check-params")
def check_params(repo: str, overrides: list[str]) -> None:
    pipeline.check_overrides(repo, overrides)


@task(name="find-stages")
def find_stages(repo: str) -> list[str]:
    return pipeline.stage_order(repo)


@task(name="apply-overrides")
def apply_overrides(repo: str, overrides: list[str]) -> None:
    pipeline.apply_overrides(repo, overrides)


@task
def run_stage(repo: str, stage: str) -> None:
    pipeline.repro_stage(repo, stage, log=get_run_logger().info)


@task(name="save-experiment")
def save_experiment(repo: str, name: str | None) -> None:
    args = ["exp", "save", "--force"] + (["--name", name] if name else [])
    for path in pipeline.metrics(repo):  # metrics kept in git (cache: false) belong in the commit
        args += ["--include-untracked", path]
    pipeline.run_dvc(args, repo, log=get_run_logger().info)


@task(name="report")
def report(repo: str, stages: list[str], overrides: list[str], experiment: str | None) -> str:
    markdown = pipeline.report_markdown(
        stages,
        overrides,
        pipeline.metrics(repo),
        pipeline.params_changed(repo),
        pipeline.revision(repo),
        experiment,
    )
    create_markdown_artifact(markdown=markdown, key="retrain-report", description="metrics, params changed, revision")
    return markdown


def _is_download(stage: str) -> bool:
    name = stage.rsplit(":", 1)[-1]
    return name == "download" or name.startswith("download@")


def _is_validate(stage: str) -> bool:
    name = stage.rsplit(":", 1)[-1]
    return name == "validate" or name.startswith("validate@")  # one per model kind: validate@cnn


@flow(name="retrain", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def retrain(request: RetrainRequest = RetrainRequest(), repo: str = ".") -> dict:
    """Run the DVC pipeline (see module docstring); returns metrics and the stages run."""
    logger = get_run_logger()
    repo = str(pipeline.repo_root(repo))
    overrides = list(request.set_params)
    check_params(repo, overrides)

    with repo_slot.hold(logger):
        stages = find_stages(repo)
        tabulate = request.validate_after and any(_is_validate(s) for s in stages)
        apply_overrides(repo, overrides)
        for stage in stages:
            options: dict = {"name": f"stage {stage}"}
            if _is_download(stage):
                options.update(
                    retries=request.download_retries,
                    retry_delay_seconds=exponential_backoff(backoff_factor=request.retry_delay_s)
                    if request.retry_delay_s > 0
                    else 0,
                )
            try:
                run_stage.with_options(**options)(repo, stage)
            except pipeline.DvcFailed:
                if tabulate and _is_validate(stage):  # the failing shapes as tables, then the run fails
                    _load_sibling("validate_onnx").validate_onnx(repo=repo, slot_held=True)
                raise
        experiment = None
        if overrides:
            experiment = request.experiment
            save_experiment(repo, experiment)
        report(repo, stages, overrides, experiment)
        result = {"stages": stages, "metrics": pipeline.metrics(repo)}
        if tabulate:  # still holding the slot: the next retrain must not replace the models meanwhile
            _load_sibling("validate_onnx").validate_onnx(repo=repo, slot_held=True)
    return result


def _load_sibling(name: str):
    """The flow module `flows/<name>.py` (flows/ is a folder of entry points, not a package)."""
    spec = importlib.util.spec_from_file_location(f"ptpipe_flows_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    retrain()
