"""Prefect flow `retrain`: run the DVC pipeline, one task per stage, and report what came out.

A thin layer over `ptpipe.pipeline` (the same `dvc repro` the command line runs):

1. validate the overrides (`dvc exp run -S` syntax, sweeps such as `lr=0.001,0.003` or
   `lr=range(1,3)` expanded into one experiment per value) against the params schema on a
   copy of params.yaml: a bad override fails here, before DVC runs;
2. wait for the global concurrency limit `dvc-repo` (1 slot, created if missing), so a second
   retrain queues behind the first instead of failing on DVC's repository lock;
3. `dvc repro --single-item <stage>` for every stage found in dvc.yaml at run time,
   dependencies first (stages added later run too); a download stage retries transient errors
   itself (params.yaml download.retries); dvc output streams to the run log. Where:
   - without overrides (the nightly schedule), in the workspace, which must be the committed
     state (tracked files as in HEAD, apart from dvc.lock and the outputs git keeps): the
     workspace models are updated, commit dvc.lock to keep them;
   - with overrides, each experiment in a temporary copy of the committed state (a git worktree
     sharing the DVC cache, `pipeline.temporary_copy`), recorded with `dvc exp save` (what
     `dvc exp run --temp -S` does): `dvc exp show` lists it, `dvc exp apply <name>` brings it into
     the workspace; the workspace itself is never changed, so no override leaks into a later run;
4. a markdown artifact `retrain-report` per run or experiment: revision, params changed and
   `dvc metrics show`;
5. when the pipeline has a `validate` stage, the `validate-onnx` flow runs as a subflow, still
   inside the slot, on the models just made: one summary table per model (and the per-shape
   detail); when the validate stage fails, the subflow runs before the retrain fails, so the
   failing shapes are tabulated.

A failed run ends in a Failed state whose message is the reason (the stage and its last output
lines); `ptpipe.incidents.on_failure` writes `incidents/<time>-retrain-<run>.json`.
With `request.promote` (what the `retrain/on-drift` automation sets when the monitor reports drift,
docs/monitoring.md), a run in place then commits its results (dvc.lock, the metrics git keeps) and
passes them through flows/promote.py's gate: released as the next minor version and moved to prod
only when its metric beats prod's; `result["promotion"]` says what the gate decided.
Run by hand: `python flows/retrain.py` (repo = current directory), or deploy (prefect.yaml).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from pydantic import BaseModel, Field

from ptpipe import incidents, pipeline, repo_slot
from ptpipe.stage import StageError


class RetrainRequest(BaseModel):
    """What a retrain run changes; the defaults reproduce the committed params, in the workspace."""

    set_params: list[str] = Field(
        default_factory=list,
        description="Overrides as typed after `dvc exp run -S`, e.g. ['lr=0.01', 'datasets.cifar10.seed=1']; "
                    "a sweep ('lr=0.001,0.003', 'lr=range(1,3)') runs one experiment per value. "
                    "Experiments run in a temporary copy: the workspace is not changed",
    )
    experiment: str | None = Field(None, description="Name for the experiment (a sweep's get -1, -2, ...)")
    validate_after: bool = Field(True, description="Run validate-onnx when the pipeline has a validate stage")
    promote: str | None = Field(
        None, description="An artifact (e.g. cifar10-cnn): after a run without overrides, commit the results and "
                          "pass them through flows/promote.py's gate (released as the next minor version and "
                          "moved to prod only if its metric beats prod's). What the on-drift automation sets")
    reason: str = Field("retrain", description="Why this run: the commit message of its results (with promote)")


def check_params(repo: str, overrides: list[str]) -> list[list[str]]:
    """Every experiment's overrides (a sweep expanded), each validated before anything runs. A plain call, not
    a task: a bad override is one `retrain failed: ...` line, not a task's traceback before the flow's."""
    experiments = pipeline.expand_sweeps(overrides)
    for each in experiments:
        pipeline.check_overrides(repo, each)
    return experiments


def check_promote(repo: str, request: RetrainRequest) -> None:
    """request.promote names a releasable artifact, and is only asked of a run in place (an experiment's
    results live in a temporary copy, never committed to the branch the registry tags)."""
    if request.promote is None:
        return
    if request.set_params:
        raise StageError("request.promote releases the workspace's committed results: run without "
                         "request.set_params (commit the change first), or promote an experiment by hand")
    from ptpipe import registry

    known = registry.artifacts(repo)
    if request.promote not in known:
        raise StageError(f"request.promote: no artifact {request.promote!r}; known: {', '.join(sorted(known))}")


@task(name="commit-results")
def commit_results(repo: str, reason: str) -> bool:
    return pipeline.commit_results(repo, f"{reason} (flow run retrain)")


def check_workspace(repo: str) -> None:
    changed = pipeline.uncommitted_inputs(repo)
    if changed:
        raise StageError(f"the workspace is not the committed state ({', '.join(changed)} changed): a run "
                         f"without overrides reproduces what is committed; commit the change, or pass it "
                         f"as request.set_params to run it as an experiment")


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
def save_experiment(workdir: str, name: str | None) -> str:
    """`dvc exp save` in the copy; returns the experiment's name (DVC picks one when `name` is None)."""
    args = ["exp", "save", "--force"] + (["--name", name] if name else [])
    for path in pipeline.metrics(workdir):  # metrics kept in git (cache: false) belong in the commit
        args += ["--include-untracked", path]
    lines: list[str] = []
    logger = get_run_logger()
    pipeline.run_dvc(args, workdir, log=lambda line: (lines.append(line), logger.info(line)))
    saved = [line.rsplit(":", 1)[1].strip() for line in lines if "Experiment has been saved as:" in line]
    return saved[-1] if saved else (name or "")


@task(name="report")
def report(workdir: str, stages: list[str], overrides: list[str], experiment: str | None) -> str:
    markdown = pipeline.report_markdown(
        stages,
        overrides,
        pipeline.metrics(workdir),
        pipeline.params_changed(workdir),
        pipeline.revision(workdir),
        experiment,
    )
    create_markdown_artifact(markdown=markdown, key="retrain-report", description="metrics, params changed, revision")
    return markdown


def _is_validate(stage: str) -> bool:
    name = stage.rsplit(":", 1)[-1]
    return name == "validate" or name.startswith("validate@")  # one per model kind: validate@cnn


def _reproduce(request: RetrainRequest, repo: str, workdir: str, overrides: list[str], name: str | None) -> dict:
    """Every stage in `workdir` (the workspace, or an experiment's copy), then report and validate."""
    stages = find_stages(workdir)
    tabulate = request.validate_after and any(_is_validate(s) for s in stages)
    validate = lambda: _load_sibling("validate_onnx").validate_onnx(  # noqa: E731
        repo=repo, slot_held=True, workdir=None if workdir == repo else workdir)
    apply_overrides(workdir, overrides)
    for stage in stages:
        try:
            run_stage.with_options(name=f"stage {stage}")(workdir, stage)
        except pipeline.DvcFailed:
            if tabulate and _is_validate(stage):  # the failing shapes as tables, then the run fails
                validate()
            raise
    experiment = save_experiment(workdir, name) if overrides else None
    report(workdir, stages, overrides, experiment)
    result = {"stages": stages, "metrics": pipeline.metrics(workdir), "experiment": experiment}
    if tabulate:  # still holding the slot: the next retrain must not replace the models meanwhile
        validate()
    return result


@flow(name="retrain", on_failure=[incidents.on_failure], on_crashed=[incidents.on_failure])
def retrain(request: RetrainRequest = RetrainRequest(), repo: str = ".") -> dict:
    """Run the DVC pipeline (see module docstring); returns metrics and the stages run
    (with overrides: those of the last experiment, and `experiments`, one entry each)."""
    logger = get_run_logger()
    repo = str(pipeline.repo_root(repo))
    try:
        experiments = check_params(repo, list(request.set_params))
        check_promote(repo, request)
        with repo_slot.hold(logger):
            if experiments == [[]]:  # no overrides: the committed state, in place
                check_workspace(repo)
                result = _reproduce(request, repo, repo, [], None)
                if request.promote:  # still in the slot: the commit and the tags name what this run made
                    commit_results(repo, request.reason)
                    result["promotion"] = gate = _load_sibling("promote").promote(name=request.promote, repo=repo)
                    logger.info("%s %s: %s", request.promote, gate["candidate"]["version"],
                                "promoted to prod" if gate["promoted"]
                                else f"not promoted, prod stays at {gate['current']['version']}")
                return result
            results = []
            for number, overrides in enumerate(experiments, 1):
                name = request.experiment
                if name and len(experiments) > 1:
                    name = f"{name}-{number}"
                logger.info("experiment %d of %d: %s", number, len(experiments), " ".join(overrides))
                with pipeline.temporary_copy(repo, log=logger.info) as workdir:
                    results.append({"overrides": overrides, **_reproduce(request, repo, str(workdir), overrides, name)})
            return {**results[-1], "experiments": results}
    except StageError as exc:
        # Something the user can fix: the reason as the last line of the run log (`prefect deployment run
        # --watch` prints the log, then the state) and as the state message (the UI shows it). A returned
        # Failed state carries the exception (a direct call raises it, on_failure records it) and logs no
        # traceback; anything else is a bug and keeps its traceback.
        logger.error("retrain failed: %s", exc)
        return Failed(message=f"retrain failed: {exc}", data=exc)
    except Exception as exc:
        logger.error("retrain failed: %s", exc)
        raise


def _load_sibling(name: str):
    """The flow module `flows/<name>.py` (flows/ is a folder of entry points, not a package)."""
    spec = importlib.util.spec_from_file_location(f"ptpipe_flows_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    retrain()
