"""The Prefect flows against a real `prefect server start` on loopback, a real worker and the real dvc CLI.

One server for the session (temporary PREFECT_HOME, SQLite), one copy of the project as a git
repo whose params point at the loopback fixture data, deployed from the project's prefect.yaml,
and one process worker. The copy gets one extra test stage, `summary`, appended to dvc.yaml
(the flows are not told about it: they find it), which writes a metric and can be held at a
gate so that a second run provably waits for the first. Waits are bounded polls.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fixtures import (ROOT, TINY_TRAINING, FixtureServer, copy_project, load_params, serve_data, sh, tool_env,
                      write_params)
from ptpipe import incidents, pipeline
from ptpipe.stage import StageError

PREFECT = str(Path(sys.executable).parent / "prefect")


def load_flow_module(name: str):
    spec = importlib.util.spec_from_file_location(f"test_flows_{name}", ROOT / "flows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, what: str, timeout: float = 180.0, every: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the summary stage the tests append to the project's dvc.yaml ---------------------------------

SUMMARY_PY = '''\
"""Test-only stage: metrics from the prepared data; holds while $GATE_DIR/hold exists."""
import json, os, pathlib, time
gate = pathlib.Path(os.environ["GATE_DIR"])
with open(gate / "stage.log", "a") as log:
    log.write(f"enter {os.getpid()}\\n")
deadline = time.monotonic() + 300
while (gate / "hold").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
card = json.loads(pathlib.Path("data/prepared/cifar10/card.json").read_text())
stats = json.loads(pathlib.Path("data/prepared/alice/stats.json").read_text())
json.dump({"val_images": sum(card["counts"]["val"]), "text": {"vocab_size": stats["vocab_size"]}},
          open("summary.json", "w"))
with open(gate / "stage.log", "a") as log:
    log.write(f"exit {os.getpid()}\\n")
'''

SUMMARY_STAGE = {
    "cmd": "python summary.py",
    "deps": ["summary.py", "data/prepared/cifar10", "data/prepared/alice"],
    "metrics": [{"summary.json": {"cache": False}}],
    "always_changed": True,
}


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free loopback port; yields (api_url, env for clients/workers)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = tool_env()
    env.pop("PREFECT_PROFILE", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
        # as docs/orchestration.md starts the server: run logs streamed to `prefect deployment run --watch`
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
    )
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited ({proc.returncode}):\n{(home / 'server.log').read_text()}")
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, "the Prefect server's /api/health", timeout=120)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            yield url, env
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)  # send the in-process flows' last logs while the server runs
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="session")
def client(prefect_server):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def project(prefect_server, tmp_path_factory):
    """The project copied into a git repo with data on a loopback server and the summary stage added."""
    data_server = FixtureServer()
    repo = tmp_path_factory.mktemp("flows") / "repo"
    repo.mkdir()
    copy_project(repo)
    serve_data(data_server, repo)
    write_params(repo, **TINY_TRAINING)  # the training stages in seconds
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["summary"] = SUMMARY_STAGE
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (repo / "summary.py").write_text(SUMMARY_PY)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "loopback data, summary stage", cwd=repo)
    gate = repo.parent / "gate"
    gate.mkdir()
    yield repo, data_server, gate
    data_server.close()


def small_project(tmp_path: Path, data_server: FixtureServer) -> Path:
    """A project of its own with the data stages and the summary stage only (seconds per run)."""
    repo = copy_project(tmp_path / "small")
    serve_data(data_server, repo)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"download": dvc_yaml["stages"]["download"], "prepare": dvc_yaml["stages"]["prepare"],
                          "summary": {k: v for k, v in SUMMARY_STAGE.items() if k != "always_changed"}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (repo / "summary.py").write_text(SUMMARY_PY)
    (tmp_path / "gate").mkdir()
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "loopback data, data stages and summary only", cwd=repo)
    return repo


def git_state(repo: Path) -> str:
    """What `git status` says about tracked files: empty when the workspace is the last commit."""
    return sh("git", "status", "--porcelain", "--untracked-files=no", cwd=repo).stdout


@pytest.fixture(scope="module")
def deployed(project, prefect_server):
    """`prefect work-pool create` + `prefect deploy --all` from the repo, as the README says."""
    repo, _, _ = project
    _, env = prefect_server
    for cmd in (
        [PREFECT, "work-pool", "create", "ptpipe-local", "--type", "process"],
        [PREFECT, "--no-prompt", "deploy", "--all"],
    ):
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}"
    return repo


@pytest.fixture(scope="module")
def worker(deployed, project, prefect_server):
    repo, _, gate = project
    _, env = prefect_server
    log = open(gate / "worker.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "ptpipe-local"],
        cwd=repo, env={**env, "GATE_DIR": str(gate)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield proc
    stop(proc)
    log.close()


def start_run(client, name: str, parameters: dict | None = None):
    deployment = client.read_deployment_by_name(name)
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters or {})


def final_state(client, run_id, timeout: float = 300.0):
    def done():
        state = client.read_flow_run(run_id).state
        return state if state is not None and state.is_final() else None

    return wait_for(done, f"flow run {run_id} to finish", timeout=timeout)


def run_logs(client, run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def incidents_of(repo: Path, *run_ids) -> list[dict]:
    """The incident records of these flow runs only (others may be there: a used workspace)."""
    records = [json.loads(p.read_text()) for p in (repo / "incidents").glob("*.json")] if (repo / "incidents").is_dir() else []
    return [r for r in records if r.get("flow_run_id") in {str(i) for i in run_ids}]


def artifacts(client, run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


# --- plain functions (no server) --------------------------------------------------------------------

def test_stage_order_puts_dependencies_first_and_finds_new_stages(tmp_path):
    repo = copy_project(tmp_path / "repo")
    order = pipeline.stage_order(repo)
    params = load_params(repo)
    datasets, models = params["datasets"], params["models"]
    # the data stages first, in dvc.yaml's (and params.yaml's) order: nothing else can run before them
    assert order[:2 * len(datasets)] == [f"{s}@{d}" for s in ("download", "prepare") for d in datasets]
    assert len(order) == len(set(order)) == 2 * len(datasets) + 4 * len(models)
    # each model's stages come after what they depend on
    for model, m in models.items():
        for first, then in ((f"prepare@{m['data']}", f"train@{model}"), (f"train@{model}", f"evaluate@{model}"),
                            (f"train@{model}", f"export@{model}"), (f"export@{model}", f"validate@{model}")):
            assert order.index(first) < order.index(then), (first, then, order)
    # a stage added later (declared first, depending on prepared data) is found and ordered after its deps
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"summary": SUMMARY_STAGE, **dvc_yaml["stages"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    new_order = pipeline.stage_order(repo)
    assert len(new_order) == len(order) + 1
    assert new_order.index("summary") > max(new_order.index("prepare@cifar10"), new_order.index("prepare@alice"))


def test_bad_overrides_are_refused_naming_the_key(tmp_path):
    repo = copy_project(tmp_path / "repo")
    before = (repo / "params.yaml").read_text()
    with pytest.raises(StageError, match=r"lr: Input should be greater than 0"):
        pipeline.check_overrides(repo, ["lr=-1"])
    with pytest.raises(StageError, match=r"override 'datasets.cifar10.val_sise=3'.*keys must already exist"):
        pipeline.check_overrides(repo, ["datasets.cifar10.val_sise=3"])
    with pytest.raises(StageError, match=r"models.cnn.data: no data set 'cifar100' in datasets"):
        pipeline.check_overrides(repo, ["models.cnn.data=cifar100"])  # checked across entries, as every stage does
    with pytest.raises(StageError, match=r"expected key=value"):
        pipeline.check_overrides(repo, ["lr"])
    with pytest.raises(StageError, match=r"download.retries: Input should be a valid integer"):
        pipeline.apply_overrides(repo, ["download.retries=many"])
    assert (repo / "params.yaml").read_text() == before  # nothing written
    assert pipeline.check_overrides(repo, ["lr=0.01"]).lr == 0.01
    assert pipeline.check_overrides(repo, ["params.yaml:lr=0.02"]).lr == 0.02  # dvc's file prefix
    with pytest.raises(StageError, match=r"override 'other.yaml:lr=0.02': expected key=value"):
        pipeline.check_overrides(repo, ["other.yaml:lr=0.02"])
    assert (repo / "params.yaml").read_text() == before  # checked on a copy
    pipeline.apply_overrides(repo, ["lr=0.01"])
    text = (repo / "params.yaml").read_text()
    assert "lr: 0.01\n" in text and "# Learning rate of the CNN recipes" in text  # comments kept, as dvc -S
    assert list(repo.glob(".params.yaml*")) == []  # no temporary left beside it


def test_sweep_overrides_expand_to_one_experiment_each_or_are_refused_in_one_line(tmp_path):
    """`dvc exp run -S` sweep syntax: each value its own experiment, as DVC's queue would run them."""
    repo = copy_project(tmp_path / "repo")
    assert pipeline.expand_sweeps([]) == [[]]  # a plain run
    assert pipeline.expand_sweeps(["lr=0.01"]) == [["lr=0.01"]]
    assert pipeline.expand_sweeps(["lr=0.001,0.003"]) == [["lr=0.001"], ["lr=0.003"]]
    assert pipeline.expand_sweeps(["params.yaml:datasets.cifar10.seed=range(1,3)", "lr=0.01"]) == [
        ["datasets.cifar10.seed=1", "lr=0.01"], ["datasets.cifar10.seed=2", "lr=0.01"]]
    assert pipeline.expand_sweeps(["validate.shapes.cnn.batch=[1,7]"]) == [["validate.shapes.cnn.batch=[1,7]"]]  # a list
    for each in pipeline.expand_sweeps(["lr=0.001,0.003", "datasets.cifar10.seed=range(1,3)"]):
        assert pipeline.check_overrides(repo, each).datasets["cifar10"].seed in (1, 2)
    with pytest.raises(StageError, match=r"override 'lr=0.001,0.003' is a sweep \(several values\)"):
        pipeline.check_overrides(repo, ["lr=0.001,0.003"])  # one experiment's overrides: never a sweep
    with pytest.raises(StageError, match=r"^overrides lr=glob\(\*\): Glob override"):
        pipeline.expand_sweeps(["lr=glob(*)"])
    with pytest.raises(StageError, match=r"lr: Input should be greater than 0"):
        pipeline.check_overrides(repo, pipeline.expand_sweeps(["lr=-1,0.1"])[0])


# The way back to the committed state after `dvc exp run` in the workspace; docs/orchestration.md gives it.
RESTORE = "git reset --hard && dvc checkout --force"


@pytest.mark.slow
def test_documented_way_back_to_the_committed_state_leaves_nothing_modified(server, tmp_path, monkeypatch):
    repo = small_project(tmp_path, server)
    monkeypatch.setenv("GATE_DIR", str(tmp_path / "gate"))
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "run", cwd=repo)
    sh("dvc", "exp", "run", "-S", "datasets.cifar10.val_size=40", cwd=repo)  # the workspace now holds it
    assert "datasets.cifar10.val_size" in sh("dvc", "params", "diff", cwd=repo).stdout
    assert "dvc.lock" in git_state(repo) and "summary.json" in git_state(repo)
    assert RESTORE in (ROOT / "docs" / "orchestration.md").read_text()
    sh("bash", "-c", RESTORE, cwd=repo)
    assert git_state(repo) == ""
    assert sh("dvc", "status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."
    card = json.loads((repo / "data/prepared/cifar10/card.json").read_text())
    assert sum(card["counts"]["val"]) == 50  # the committed outputs, not the experiment's


def test_incident_record_is_written_atomically(tmp_path):
    path = incidents.write_incident(tmp_path, flow="retrain", stage="download@alice", error="boom",
                                    flow_run_name="brave-fox")
    assert path.parent == tmp_path / "incidents" and path.name.endswith("-retrain-brave-fox.json")
    record = json.loads(path.read_text())
    assert record["flow"] == "retrain" and record["stage"] == "download@alice" and record["error"] == "boom"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_validation_report_is_one_summary_table_per_model_with_the_detail_attached():
    """Formatting of the `checks` rows of ptpipe.validate's report; see validate_onnx's docstring."""
    flows = load_flow_module("validate_onnx")
    row = lambda model, backend, shape, diff, top1, ok: dict(  # noqa: E731
        model=model, backend=backend, shape=shape, max_abs_diff=diff, top1_agreement=top1, ok=ok)
    report = {"checks": [
        row("cnn", "onnxruntime", "batch=1", 1e-7, 1.0, True), row("cnn", "onnxruntime", "batch=7", 3e-7, 1.0, True),
        row("cnn", "torchscript", "batch=1", 0.0, 1.0, True), row("cnn", "torchscript", "batch=7", 0.0, 1.0, True),
        row("lstm", "onnxruntime", "batch=1 seq=1", 1e-6, 1.0, True),
        row("lstm", "onnxruntime", "batch=5 seq=37", 0.25, 0.9, False),
        row("lstm", "torchscript", "batch=5 seq=37", float("nan"), 1.0, False),
    ]}
    tables = flows.summary_tables(report)
    assert set(tables) == {"cnn", "lstm"}  # one table per model, however many shapes
    assert tables["cnn"] == [
        {"backend": "onnxruntime", "worst_max_abs_diff": 3e-7, "worst_shape": "batch=7", "min_top1_agreement": 1.0,
         "shapes_ok": "2/2", "ok": True},
        {"backend": "torchscript", "worst_max_abs_diff": 0.0, "worst_shape": "batch=1", "min_top1_agreement": 1.0,
         "shapes_ok": "2/2", "ok": True}]
    lstm = {r["backend"]: r for r in tables["lstm"]}
    assert lstm["onnxruntime"]["worst_shape"] == "batch=5 seq=37" and lstm["onnxruntime"]["ok"] is False
    assert lstm["onnxruntime"]["min_top1_agreement"] == 0.9 and lstm["onnxruntime"]["shapes_ok"] == "1/2"
    assert lstm["torchscript"]["ok"] is False  # NaN is the worst difference, never a pass
    assert flows.artifact_key("lstm") == "onnx-lstm"
    detail = flows.detail_markdown(report).splitlines()
    assert len([line for line in detail if line.startswith("| lstm") or line.startswith("| cnn")]) == 7
    assert detail[4].startswith("| lstm | batch=5 seq=37 | onnxruntime | 0.25 | 0.9 | False |")  # failures first
    assert flows.failures(report)[0] == "lstm onnxruntime batch=5 seq=37: max |diff| 0.25, top-1 agreement 0.9"


def test_models_of_an_older_revision_are_fetched_from_the_dvc_cache(tmp_path):
    """validate-onnx's `rev`: the models/ of a tagged commit, while the workspace holds newer ones."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    (repo / "models").mkdir()
    (repo / "models" / "README.md").write_text("what the stages write here\n")  # as in the project
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")  # its models: which files a revision must have
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "dvc init", cwd=repo)
    sh("git", "tag", "empty", cwd=repo)
    (repo / "make.py").write_text(
        "import pathlib\np = pathlib.Path('models/cnn'); p.mkdir(parents=True, exist_ok=True)\n"
        "(p / 'model.onnx').write_text(open('version').read())\n"
    )
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"export": {
        "cmd": "python make.py", "deps": ["make.py", "version"], "outs": ["models/cnn"]}}}))
    for version in ("one", "two"):
        (repo / "version").write_text(version)
        sh("dvc", "repro", "-q", cwd=repo)
        sh("git", "add", "-A", cwd=repo)
        sh("git", "commit", "-qm", version, cwd=repo)
        if version == "one":
            sh("git", "tag", "cifar10-cnn@v1.0.0", cwd=repo)
    flows = load_flow_module("validate_onnx")
    got = flows.fetch_models(str(repo), "cifar10-cnn@v1.0.0", tmp_path / "out")
    assert (got / "cnn" / "model.onnx").read_text() == "one"
    assert (repo / "models" / "cnn" / "model.onnx").read_text() == "two"  # workspace untouched
    with pytest.raises(StageError, match=r"'empty' has no exported model \(models/cnn/model.onnx or"):
        flows.fetch_models(str(repo), "empty", tmp_path / "none")
    with pytest.raises(StageError, match=r"revision 'cifar10-cnn@v9.9.9' does not exist in .*not a git commit, "
                                         r"branch or tag, nor a DVC experiment"):
        flows.fetch_models(str(repo), "cifar10-cnn@v9.9.9", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_serve_builds_both_deployments_with_the_prefect_yaml_schedules():
    serve = load_flow_module("serve")
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    built = serve.deployments()
    assert [d.name for d in built] == [s["name"] for s in spec]
    for d, s in zip(built, spec):
        assert [sch.schedule.cron for sch in d.schedules] == [c["cron"] for c in s["schedules"]]


# --- against the server -----------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_override_fails_the_flow_before_dvc_runs_and_records_an_incident(project):
    repo, _, gate = project
    retrain = load_flow_module("retrain")
    state = retrain.retrain(
        request=retrain.RetrainRequest(set_params=["datasets.cifar10.val_size=-5"]), repo=str(repo), return_state=True
    )
    assert state.is_failed()
    assert not (repo / "dvc.lock").exists() and not (gate / "stage.log").exists()  # DVC never ran
    (record,) = incidents_of(repo, state.state_details.flow_run_id)
    assert record["flow"] == "retrain" and "datasets.cifar10.val_size" in record["error"]


@pytest.mark.slow
def test_override_runs_leave_the_workspace_as_found_and_a_plain_run_uses_the_committed_params(
        prefect_server, client, server, tmp_path, monkeypatch):
    """An experiment (and a sweep) runs in a temporary copy; the next plain run reproduces what is committed."""
    repo = small_project(tmp_path, server)
    monkeypatch.setenv("GATE_DIR", str(tmp_path / "gate"))
    retrain = load_flow_module("retrain")
    committed = (repo / "params.yaml").read_text()
    lock_before = (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None

    state = retrain.retrain(request=retrain.RetrainRequest(set_params=["datasets.cifar10.val_size=40"],
                                                           experiment="val-40"), repo=str(repo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["experiment"] == "val-40" and result["metrics"]["summary.json"]["val_images"] == 40
    assert git_state(repo) == "" and (repo / "params.yaml").read_text() == committed
    lock_now = (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None
    assert lock_now == lock_before and not (repo / "data" / "prepared").exists()  # nothing ran here
    assert list((repo / pipeline.COPIES_DIR).iterdir()) == []  # the copy is gone
    assert sh("git", "worktree", "list", "--porcelain", cwd=repo).stdout.count("worktree ") == 1
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    experiments = {e["name"]: e for row in shown for x in (row.get("experiments") or []) for e in x["revs"]}
    assert experiments["val-40"]["data"]["metrics"]["summary.json"]["data"]["val_images"] == 40

    plain = retrain.retrain(repo=str(repo), return_state=True)  # what the nightly schedule runs
    assert plain.is_completed(), plain
    assert plain.result()["experiment"] is None and plain.result()["metrics"]["summary.json"]["val_images"] == 50
    assert pipeline.params_changed(repo) == {} and (repo / "params.yaml").read_text() == committed
    assert pipeline.uncommitted_inputs(repo) == []  # only dvc.lock and outputs are new
    report = artifacts(client, plain.state_details.flow_run_id)["retrain-report"].data
    assert "none (params.yaml as committed)" in report and "| summary.json | val_images | 50 |" in report

    # a sweep: one experiment per value, the workspace still as the plain run left it
    lock = (repo / "dvc.lock").read_text()
    sweep = retrain.retrain(request=retrain.RetrainRequest(set_params=["datasets.cifar10.val_size=30,45"],
                                                           experiment="val"), repo=str(repo), return_state=True)
    assert sweep.is_completed(), sweep
    assert [(e["experiment"], e["overrides"], e["metrics"]["summary.json"]["val_images"])
            for e in sweep.result()["experiments"]] == [("val-1", ["datasets.cifar10.val_size=30"], 30),
                                                         ("val-2", ["datasets.cifar10.val_size=45"], 45)]
    assert {"val-40", "val-1", "val-2"} <= set(sh("dvc", "exp", "list", "--name-only", cwd=repo).stdout.split())
    assert (repo / "dvc.lock").read_text() == lock and (repo / "params.yaml").read_text() == committed
    assert json.loads((repo / "summary.json").read_text())["val_images"] == 50

    # an edited workspace is not the committed state: a plain run refuses before DVC runs
    write_params(repo, **{"datasets.cifar10.val_size": 60})
    refused = retrain.retrain(repo=str(repo), return_state=True)
    assert refused.is_failed()
    message = str(refused.result(raise_on_failure=False))
    assert "the workspace is not the committed state (params.yaml changed)" in message, message
    assert (repo / "dvc.lock").read_text() == lock and json.loads((repo / "summary.json").read_text())["val_images"] == 50
    (record,) = incidents_of(repo, refused.state_details.flow_run_id)
    assert "params.yaml changed" in record["error"]


@pytest.mark.slow
def test_deployments_register_with_the_prefect_yaml_schedules(deployed, client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    spec = {f"{s['entrypoint'].split(':')[1].replace('_', '-')}/{s['name']}": s
            for s in yaml.safe_load((deployed / "prefect.yaml").read_text())["deployments"]}
    assert set(spec) == {"retrain/nightly", "validate-onnx/daily", "tune/study", "monitor/hourly", "retrain/on-drift"}
    for name, s in spec.items():
        deployment = client.read_deployment_by_name(name)
        assert deployment.work_pool_name == "ptpipe-local"
        assert [sch.schedule.cron for sch in deployment.schedules] == [c["cron"] for c in s["schedules"]]
        assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(deployed)
        if not s["schedules"]:
            continue  # run by hand only (tune/study): no scheduled runs to wait for

        def scheduled():
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
            )

        runs = wait_for(scheduled, f"the scheduler to create runs of {name}", timeout=120)
        assert all(r.expected_start_time > r.created for r in runs)
        # The tests trigger runs by hand: switch the cron schedules off and drop their runs,
        # so a test session at 02:00 or 06:00 UTC cannot start one of them on the worker.
        for sch in deployment.schedules:
            client.update_deployment_schedule(deployment.id, sch.id, active=False)
        for run in scheduled():
            client.delete_flow_run(run.id)


@pytest.mark.slow
def test_triggered_retrain_completes_the_stage_retries_the_download_and_reports_metrics(project, worker, client):
    repo, data_server, gate = project
    before = git_state(repo)
    # The next fetch of the text answered 503: the download stage's own retry (one, set here) makes the
    # run succeed (the flow does not retry a stage on top of it)
    data_server.fail("/pg11.txt", 1, status=503)
    run = start_run(client, "retrain/nightly", {"request": {
        "set_params": ["download.retries=1", "datasets.cifar10.val_size=40"], "experiment": "val-40",
    }})
    state = final_state(client, run.id)
    logs = "\n".join(run_logs(client, run.id))
    assert state.is_completed(), f"{state}\n{logs}"
    assert "Running stage 'download@alice'" in logs  # dvc output streamed into the run log
    assert [p for p, _ in data_server.requests].count("/pg11.txt") == 2  # failed once, retried once
    assert "HTTP 503; retrying" in logs  # by the stage, as its output says

    report = artifacts(client, run.id)["retrain-report"].data
    assert "| summary.json | val_images | 40 |" in report  # the metric, from the overridden param
    assert "| summary.json | text.vocab_size |" in report
    assert "| params.yaml | datasets.cifar10.val_size | 50 | 40 |" in report
    commit = sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert f"| git_commit | {commit} |" in report
    assert "val-40" in sh("dvc", "exp", "list", "--name-only", cwd=repo).stdout
    assert git_state(repo) == before  # an experiment: the workspace untouched
    assert not incidents_of(repo, run.id)


@pytest.mark.slow
def test_second_retrain_waits_for_the_first_then_completes(project, worker, client):
    repo, _, gate = project
    (gate / "stage.log").unlink(missing_ok=True)
    (gate / "hold").touch()
    first = start_run(client, "retrain/nightly")
    wait_for(lambda: (gate / "stage.log").exists(), "the first run to reach the summary stage")
    second = start_run(client, "retrain/nightly")
    wait_for(lambda: any("waiting for the 'dvc-repo' concurrency slot" in m for m in run_logs(client, second.id)),
             "the second run to ask for the concurrency slot")
    limit = client.read_global_concurrency_limit_by_name("dvc-repo")
    assert limit.limit == 1 and limit.active_slots == 1
    (gate / "hold").unlink()
    for run in (first, second):
        state = final_state(client, run.id)
        assert state.is_completed(), f"{state}\n" + "\n".join(run_logs(client, run.id))
    events = [line.split()[0] for line in (gate / "stage.log").read_text().splitlines()]
    assert events == ["enter", "exit", "enter", "exit"]  # one after the other, never overlapping
    second_logs = run_logs(client, second.id)
    assert second_logs.index(next(m for m in second_logs if "holding the 'dvc-repo'" in m)) > \
        second_logs.index(next(m for m in second_logs if "waiting for the 'dvc-repo'" in m))
    assert client.read_global_concurrency_limit_by_name("dvc-repo").active_slots == 0


@pytest.mark.slow
def test_validate_onnx_waits_while_a_pipeline_run_holds_the_slot(project, worker, client):
    """The daily validation reads the workspace models: never while a retrain may be replacing them."""
    from prefect.concurrency.sync import concurrency

    with concurrency("dvc-repo", occupy=1):  # what a running retrain holds
        run = start_run(client, "validate-onnx/daily")
        wait_for(lambda: any("waiting for the 'dvc-repo' concurrency slot" in m for m in run_logs(client, run.id)),
                 "validate-onnx to ask for the concurrency slot")
        time.sleep(2)
        assert not client.read_flow_run(run.id).state.is_final()
        assert not any("holding the 'dvc-repo'" in m for m in run_logs(client, run.id))
    state = final_state(client, run.id)
    assert state.is_completed(), f"{state}\n" + "\n".join(run_logs(client, run.id))
    assert {*(f"onnx-{model}" for model in load_params(project[0])["models"]), "onnx-detail"} <= set(
        artifacts(client, run.id))
    assert client.read_global_concurrency_limit_by_name("dvc-repo").active_slots == 0


@pytest.mark.slow
def test_retrain_whose_validate_stage_fails_still_tabulates_the_failing_shapes(project, worker, client):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    repo, _, _ = project
    before = git_state(repo)  # (earlier plain runs have staged dvc.lock: core.autostage)
    run = start_run(client, "retrain/nightly", {"request": {"set_params": ["validate.atol=1e-12"]}})
    state = final_state(client, run.id)
    assert state.is_failed(), state
    assert "tolerance exceeded" in str(state.message) or "tolerance exceeded" in "\n".join(run_logs(client, run.id))
    (sub,) = client.read_flow_runs(  # the retrain's validate-onnx subflow
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert sub.state.is_failed(), sub.state
    found = artifacts(client, sub.id)
    rows = json.loads(found["onnx-cnn"].data)  # the failing backends of the experiment's models, tabulated
    assert any(row["ok"] is False for row in rows) and "batch=" in found["onnx-detail"].data
    assert client.read_global_concurrency_limit_by_name("dvc-repo").active_slots == 0
    # both runs record an incident (the hooks run after the Failed state reaches the API)
    records = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(incidents_of(repo, run.id, sub.id)),
                       "both incident records")
    assert {(r["flow"], r["stage"]) for r in records} == {("retrain", "validate"), ("validate-onnx", "validate")}
    assert git_state(repo) == before  # the tolerance override stayed in the experiment's copy


@pytest.mark.slow
def test_failed_stage_ends_the_run_failed_with_the_reason_watch_prints_and_an_incident(
        project, worker, client, prefect_server):
    """`prefect deployment run --watch`, as the docs say: the reason (stage, its last output) is printed."""
    repo, data_server, _ = project
    _, env = prefect_server
    before = git_state(repo)
    request = {"request": {
        "set_params": ["download.retries=0", "datasets.cifar10.url=" + data_server.url + "/gone.tar.gz"],
    }}
    watched = subprocess.run([PREFECT, "deployment", "run", "retrain/nightly", "--params", json.dumps(request),
                              "--watch", "--watch-timeout", "300"], cwd=repo, env={**env, "COLUMNS": "1000"},
                             capture_output=True,
                             text=True, timeout=360)
    output = watched.stdout + watched.stderr
    assert watched.returncode == 1 and "Flow run finished in state 'Failed'" in output, output
    assert "retrain failed: stage 'download@cifar10' failed (dvc exit status" in output, output
    assert "404" in output.split("retrain failed:")[-1]  # the stage's last output line, with the reason
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
    state = client.read_flow_run(run_id).state
    assert state.is_failed() and "stage 'download@cifar10' failed" in state.message and "404" in state.message
    # the on_failure hook runs in the worker's process AFTER the run's Failed state reached the API
    (record,) = wait_for(lambda: incidents_of(repo, run_id), "the incident record")
    assert record["flow"] == "retrain" and record["stage"] == "download@cifar10" and "404" in record["error"]
    assert git_state(repo) == before  # the broken URL stayed in the experiment's copy


@pytest.mark.slow
def test_serve_registers_both_deployments_and_runs_a_retrain(project, worker, client, prefect_server):
    """`python flows/serve.py`: the same deployments, re-registered and executed by that one process."""
    repo, _, gate = project
    _, env = prefect_server
    stop(worker)  # only the serve process may pick the run up
    assert pipeline.uncommitted_inputs(repo) == []  # no earlier test's overrides here: a plain run may start
    names = ("retrain/nightly", "validate-onnx/daily")
    # serve or a worker, not both under the same names: a served deployment re-registered over
    # a prefect.yaml one keeps its storage fields and its runs crash (docs/prefect.md says so).
    for n in names:
        client.delete_deployment(client.read_deployment_by_name(n).id)
    log = open(gate / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "flows/serve.py"], cwd=repo, env={**env, "GATE_DIR": str(gate)},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def served():
            from prefect.exceptions import ObjectNotFound

            try:
                return [client.read_deployment_by_name(n) for n in names]
            except ObjectNotFound:
                return None

        for d, cron in zip(wait_for(served, "serve.py to register the deployments"), ["0 2 * * *", "0 6 * * *"]):
            assert [s.schedule.cron for s in d.schedules] == [cron] and all(s.active for s in d.schedules)
        run = start_run(client, "retrain/nightly")
        state = final_state(client, run.id)
        assert state.is_completed(), f"{state}\n" + (gate / "serve.log").read_text()[-3000:]
        assert "retrain-report" in artifacts(client, run.id)
    finally:
        stop(proc)
        log.close()


def test_validation_run_on_a_perturbed_model_ends_failed_naming_model_shape_and_difference(
        prefect_server, client, tmp_path):
    """validate-onnx on exported tiny models whose ONNX CNN has one weight changed: Failed, the
    error names model, backend, shape and difference, the artifacts hold the per-shape tables."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from fixtures import write_models, write_prepared
    from ptpipe import export

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    write_prepared(repo)
    write_models(repo / "models")
    models = load_params(repo)["models"]
    for model in models:
        export.export(repo / "models" / model, repo / "params.yaml", revision="test")
    path = repo / "models/cnn/model.onnx"
    model = onnx.load(path)
    bias = next(i for i in model.graph.initializer if i.name == "model.fc3.bias")  # LeNet's last layer
    array = numpy_helper.to_array(bias).copy()
    array[3] += 0.01  # logit 3 of every image moves by 0.01
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    onnx.save(model, path)

    flows = load_flow_module("validate_onnx")
    state = flows.validate_onnx(repo=str(repo), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    diff = re.search(r"cnn onnxruntime batch=1: max \|diff\| ([0-9.e-]+)", message)
    assert diff and abs(float(diff.group(1)) - 0.01) < 1e-5, message  # the 0.01 put into the bias
    found = artifacts(client, state.state_details.flow_run_id)
    # one table per model + the detail
    assert set(found) - {None} == {*(flows.artifact_key(model) for model in models), "onnx-detail"}
    data = found["onnx-cnn"].data
    table = json.loads(data) if isinstance(data, str) else data
    rows = {row["backend"]: row for row in table}
    assert set(rows) == {"onnxruntime", "torchscript"}
    assert rows["onnxruntime"]["ok"] is False and rows["torchscript"]["ok"] is True
    assert abs(rows["onnxruntime"]["worst_max_abs_diff"] - 0.01) < 1e-5 and rows["onnxruntime"]["shapes_ok"] == "0/3"
    assert "| cnn | batch=7 | onnxruntime |" in found["onnx-detail"].data
    (incident,) = incidents_of(repo, state.state_details.flow_run_id)
    assert incident["flow"] == "validate-onnx" and "cnn onnxruntime batch=1" in incident["error"]
