"""The monitoring loop end to end (issue 24), every piece real and started for real: a Prefect server on
loopback (`prefect server start`, as tests/test_flows.py starts it) with its automation services, the
project's prefect.yaml deployed by `prefect deploy` (the on-drift trigger with a 60 s cooldown instead of
6 h), a process worker, `ptpipe serve --model tiny-cnn#prod --poll-s 1 --log ...` answering real HTTP,
flows/monitor.py on the log, the real dvc and git CLIs and GTO tags.

What stands in: the project's `train` stage. Training, exporting and evaluating the real pipeline's three
models takes minutes per run on this machine, so the tiny project's one stage copies a model the test made
(an exported CNN with its drift reference, ptpipe.export) and the metrics the test says it has: the
retrain still runs `dvc repro` through flows/retrain.py, commits dvc.lock and passes the result through
flows/promote.py's gate; "new data arrived" is the test committing a new candidate, as a user would commit
new data. The models are untrained (seeded random weights): which is better is what their metrics say.

Order (one server, one project, the phases depend on each other):
1. unshifted traffic: the monitor flags nothing, no event, no retrain;
2. brightened traffic (a worse candidate committed): flagged, `ptpipe.model.drifted` fires, the automation
   creates one retrain run with the expected parameters, it runs, the gate keeps prod at v1.0.0;
3. a second drifted window inside the cooldown, checked by the monitor/hourly deployment on the worker: the
   event fires again, no second retrain;
4. after the cooldown, a better candidate committed: the next drifted window's retrain promotes v1.1.0 and
   the server following #prod answers with it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from fixtures import CLASSES, ROOT, cifar_images, sh, tool_env, write_models, write_prepared_cifar
from test_flows import PREFECT, client, final_state, load_flow_module, prefect_server, run_logs, stop, wait_for  # noqa: F401
from test_serve import Server, png
from ptpipe import export, predlog, registry

COOLDOWN_S = 60
WINDOW = 100  # requests per window (params.yaml monitor.window in the tiny project)
NAME = "tiny-cnn"


def exported_cnn(root: Path, seed: int) -> Path:
    """An exported CNN (random weights of `seed`) carrying the drift reference of `root`'s validation split."""
    data = write_prepared_cifar(root)
    write_models(root / "models", seed=seed)
    export.export(root / "models" / "cnn", ROOT / "params.yaml", revision="abc123", data_dir=data)
    return root / "models" / "cnn" / "model.onnx"


def commit_candidate(repo: Path, onnx_file: Path, acc: float, message: str) -> None:
    (repo / "candidate").mkdir(exist_ok=True)
    shutil.copy(onnx_file, repo / "candidate" / "model.onnx")
    (repo / "candidate" / "evaluate.json").write_text(json.dumps({"test": {"acc": acc}}))
    sh("git", "add", "candidate", cwd=repo)
    sh("git", "commit", "-qm", message, cwd=repo)


def tiny_project(tmp: Path, first_model: Path) -> Path:
    """git + DVC project: this project's params.yaml (a shorter monitor window), a `train` stand-in stage, the artifact
    tiny-cnn, this project's flows/ and prefect.yaml (cooldown shortened); v1.0.0 released and in prod."""
    repo = tmp / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "storage", str(tmp / "remote"), cwd=repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the retrain validates it whole
    if "monitor" in params:
        params["monitor"]["window"] = WINDOW
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"train": {  # stands in for train + export + evaluate (module docstring)
            "cmd": "mkdir -p models/cnn metrics/cnn && cp candidate/model.onnx models/cnn/model.onnx && "
                   "cp candidate/evaluate.json metrics/cnn/evaluate.json",
            "deps": ["candidate"], "outs": ["models/cnn/model.onnx"],
            "metrics": [{"metrics/cnn/evaluate.json": {"cache": False}}]}},
        "artifacts": {NAME: {"path": "models/cnn", "type": "model"}}}, sort_keys=False))
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (on_drift,) = [d for d in spec["deployments"] if d["name"] == "on-drift"]
    on_drift["triggers"][0]["within"] = COOLDOWN_S
    (repo / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (repo / ".gitignore").write_text("reports/\nlogs/\nincidents/\n")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "tiny project", cwd=repo)
    commit_candidate(repo, first_model, 0.5, "first model")
    sh("dvc", "repro", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "v1.0.0", cwd=repo)
    registry.release(NAME, "v1.0.0", repo=repo)
    registry.promote(NAME, "v1.0.0", "prod", repo=repo)
    return repo


def classify(url: str, batch: np.ndarray) -> httpx.Response:
    r = httpx.post(f"{url}/v1/models/{NAME}/classify", files=[("images", (f"{i}.png", png(im)))
                                                                for i, im in enumerate(batch)], timeout=60)
    assert r.status_code == 200, r.text
    return r


def traffic(url: str, seed: int, brighten: int = 0, n: int = WINDOW, labelled: int = 0) -> None:
    """n images like the validation split's (another seed), brightened by `brighten` levels, 10 a request; the
    true class of the first `labelled` sent as feedback on their response ids."""
    x, classes = cifar_images(n, seed)
    x = np.clip(x.reshape(n, 3, 32, 32).astype(np.int16) + brighten, 0, 255).astype(np.uint8)
    ids = [p["id"] for i in range(0, n, 10) for p in classify(url, x[i: i + 10]).json()["predictions"]]
    for rid, label in zip(ids[:labelled], classes):
        r = httpx.post(f"{url}/v1/models/{NAME}/feedback", json={"id": rid, "label": CLASSES[label]}, timeout=30)
        assert r.status_code == 200, r.text


def drifted_events(client) -> list[dict]:
    """The `ptpipe.model.drifted` events the server has recorded (its events API)."""
    r = client._client.post("/events/filter", json={"filter": {"event": {"name": ["ptpipe.model.drifted"]}},
                                                    "limit": 50})
    r.raise_for_status()
    return r.json()["events"]


def markdown_artifact(client) -> str:
    """The latest `monitor-tiny-cnn` markdown artifact's text."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    (latest,) = client.read_latest_artifacts(
        artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[f"monitor-{NAME}"])))
    return latest.data


def runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def on_drift_runs(client) -> list:
    return runs_of(client, client.read_deployment_by_name("retrain/on-drift").id)


@pytest.mark.slow
def test_drift_triggers_one_retrain_per_cooldown_and_only_a_better_model_reaches_the_server(
        prefect_server, client, tmp_path):
    _, env = prefect_server
    env = {**env, "PTPIPE_CACHE": str(tmp_path / "cache")}
    models = [exported_cnn(tmp_path / f"m{seed}", seed) for seed in range(3)]
    repo = tiny_project(tmp_path, models[0])
    for cmd in ([PREFECT, "work-pool", "create", "ptpipe-local", "--type", "process"],
                [PREFECT, "--no-prompt", "deploy", "--name", "on-drift", "--name", "hourly"]):
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}"
    hourly = client.read_deployment_by_name("monitor/hourly")
    assert [sch.schedule.cron for sch in hourly.schedules] == ["15 * * * *"]
    for sch in hourly.schedules:  # this test starts its runs itself, with its log and server
        client.update_deployment_schedule(hourly.id, sch.id, active=False)
    for scheduled in runs_of(client, hourly.id):  # what the scheduler made before
        client.delete_flow_run(scheduled.id)
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "ptpipe-local"], cwd=repo, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    log = tmp_path / "logs" / "predictions.sqlite"
    log.parent.mkdir()
    server = None
    flows = load_flow_module("monitor")

    def window_logged() -> None:
        wait_for(lambda: len(predlog.read_window(log, NAME, WINDOW).ids) == WINDOW, "the log's window")

    def monitor_once() -> dict:
        window_logged()
        (result,) = flows.monitor(request, str(repo))
        return result

    try:
        server = Server(tmp_path / "serve", "--model", f"{NAME}#prod", "--repo", str(repo), "--poll-s", "1",
                        "--log", str(log), cwd=repo)
        request = flows.MonitorRequest(log=str(log), server=server.url)
        # a model the project does not have: Failed, naming the key, an incident, nothing else written
        failed = flows.monitor(flows.MonitorRequest(log=str(log), models=["nope"]), str(repo), return_state=True)
        assert failed.is_failed() and failed.message.startswith("monitor failed: request.models: 'nope' is no artifact")
        assert not (repo / "reports").exists() and len(list((repo / "incidents").glob("*-monitor-*.json"))) == 1
        # 1. like the validation data: nothing flagged, nothing emitted
        traffic(server.url, seed=10, labelled=30)
        wait_for(lambda: sum(label is not None for label in predlog.read_window(log, NAME, WINDOW).labels) == 30,
                 "the feedback in the log (committed by its writer thread)")
        quiet = monitor_once()
        assert quiet["version"] == "v1.0.0" and quiet["n"] == WINDOW and not quiet["drifted"], quiet["reasons"]
        assert quiet["n_labelled"] == 30 and 0 <= quiet["accuracy"] <= 1  # live accuracy on the feedback
        report = repo / "reports" / "monitor" / NAME
        assert (report / "report.html").is_file() and len((report / "history.tsv").read_text().splitlines()) == 2
        assert "no drift" in markdown_artifact(client) and not drifted_events(client)

        # 2. brightened: flagged; the automation starts one retrain, on a worse candidate: not promoted
        commit_candidate(repo, models[1], 0.4, "new data: a worse model")
        traffic(server.url, seed=11, brighten=90)
        flagged = monitor_once()
        assert flagged["drifted"] and any(r.startswith("input_drift") for r in flagged["reasons"])
        assert "**drifted**" in markdown_artifact(client)
        (event,) = wait_for(lambda: drifted_events(client), "the drifted event")
        assert event["resource"] == {"prefect.resource.id": f"ptpipe.model.{NAME}", "prefect.resource.name": NAME,
                                     "ptpipe.version": "v1.0.0"}
        assert event["payload"]["reasons"] == flagged["reasons"] and event["payload"]["n"] == WINDOW
        assert event["payload"]["figures"]["input_drift.p_value"] < 0.01
        (run,) = wait_for(lambda: on_drift_runs(client), "the automation to create a retrain run", timeout=60)
        assert run.parameters["request"]["promote"] == NAME
        assert run.parameters["request"]["reason"].startswith(f"retrain {NAME}: v1.0.0 drifted (input_drift")
        assert final_state(client, run.id, timeout=300).is_completed(), "\n".join(run_logs(client, run.id))
        wait_for(lambda: f"{NAME} v1.1.0: not promoted, prod stays at v1.0.0" in run_logs(client, run.id),
                 "the gate's decision in the run's log (sent after its state)", timeout=30)
        assert registry.version_of(NAME, stage="prod", repo=str(repo)) == "v1.0.0"
        assert not sh("git", "tag", "--list", f"{NAME}@v1.1.0", cwd=repo).stdout
        first_event = time.time()

        # 3. drifted again inside the cooldown, this time the monitor/hourly deployment run by the worker: the
        # event is there, the retrain is not
        traffic(server.url, seed=12, brighten=90)
        window_logged()
        scheduled = client.create_flow_run_from_deployment(hourly.id, parameters={
            "request": {"log": str(log), "server": server.url}, "repo": str(repo)})
        assert final_state(client, scheduled.id).is_completed(), "\n".join(run_logs(client, scheduled.id))
        wait_for(lambda: f"{NAME} v1.0.0: drifted: input_drift" in "\n".join(run_logs(client, scheduled.id)),
                 "the verdict in the monitor run's log", timeout=30)
        wait_for(lambda: len(drifted_events(client)) == 2, "the second drifted event")
        time.sleep(5)  # the automation reacted to the first within seconds; give it as long again
        assert len(on_drift_runs(client)) == 1

        # 4. after the cooldown, with a better candidate: promoted, and the server swaps to it
        commit_candidate(repo, models[2], 0.9, "new data: a better model")
        time.sleep(max(0.0, first_event + COOLDOWN_S + 2 - time.time()))
        assert monitor_once()["drifted"]
        runs = wait_for(lambda: [r for r in on_drift_runs(client) if r.id != run.id], "the second retrain run")
        assert final_state(client, runs[0].id, timeout=300).is_completed(), "\n".join(run_logs(client, runs[0].id))
        assert registry.version_of(NAME, stage="prod", repo=str(repo)) == "v1.1.0"
        one = cifar_images(1, 13)[0].reshape(1, 3, 32, 32)
        wait_for(lambda: classify(server.url, one).headers["x-model-version"] == "v1.1.0",
                 "the server following #prod to answer with v1.1.0", timeout=60)
    finally:
        if server:
            server.stop()
        stop(worker)
        worker_log.close()
