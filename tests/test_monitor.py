"""flows/monitor.py's pieces without a server: what it writes (atomically), what it refuses (naming the key),
and the retrain request the on-drift automation sends. The loop end to end is tests/test_monitor_loop.py."""
from __future__ import annotations

import os

import pytest
import yaml
from pydantic import ValidationError

from fixtures import ROOT, sh
from test_flows import load_flow_module
from ptpipe.stage import StageError

RESULT = {"model": "tiny-cnn", "version": "v1.0.0", "time": 1_700_000_000.0, "n": 500, "drifted": True,
          "reasons": ["input drift: mean_r p=0.001 < 0.01"],
          "input_drift": {"mean_r": {"p_value": 0.001}, "share": 0.5}, "accuracy": None, "confidence": 0.8}


@pytest.fixture(scope="module")
def monitor():
    return load_flow_module("monitor")


def test_figures_are_the_numbers_of_a_check_result_flattened(monitor):
    assert monitor.figures(RESULT) == {"n": 500.0, "drifted": 1.0,
                                       "input_drift.mean_r.p_value": 0.001, "input_drift.share": 0.5,
                                       "confidence": 0.8}


def test_a_window_spanning_a_swap_is_judged_on_the_newest_versions_rows(monitor):
    import numpy as np
    from ptpipe import drift, predlog

    n = 5
    window = predlog.Window("m", [f"r{i}" for i in range(n)], np.arange(n, dtype=np.float64),
                            ["v1.0.0", "v1.0.0", "v1.1.0", "v1.0.0", "v1.1.0"], np.eye(n, dtype=np.float32),
                            np.arange(n * 6, dtype=np.float32).reshape(n, 6), drift.IMAGE_STATS, [None, "cat", None, None, "dog"])
    newest = monitor.newest_version_only(window)
    assert newest.ids == ["r2", "r4"] and newest.versions == ["v1.1.0"] * 2 and newest.labels == [None, "dog"]
    assert newest.times.tolist() == [2.0, 4.0] and newest.stats[:, 0].tolist() == [12.0, 24.0]
    assert newest.outputs.shape == (2, n) and newest.stat_names == drift.IMAGE_STATS
    same = window._replace(versions=["v1.0.0"] * n)
    assert monitor.newest_version_only(same) is same


def test_history_gains_one_row_per_run_with_new_columns_and_a_failed_write_leaves_it_whole(monitor, tmp_path,
                                                                                          monkeypatch):
    path = tmp_path / "history.tsv"
    monitor.append_history(path, {"time": "t1", "a": 1.0})
    rows = monitor.append_history(path, {"time": "t2", "a": 2.0, "b": 3.0})
    assert path.read_text() == "time\ta\tb\nt1\t1.0\t\nt2\t2.0\t3.0\n" and len(rows) == 2
    before = path.read_text()

    def killed(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(OSError, match="disk full"):
        monitor.append_history(path, {"time": "t3", "a": 4.0})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.tsv"]  # no temporary left


def test_report_renders_offline_with_every_figure_and_its_history(monitor):
    history = [{"time": "t1", "confidence": "0.9", "input_drift.share": "0.1"},
               {"time": "t2", **{k: str(v) for k, v in monitor.figures(RESULT).items()}}]
    page = monitor.render_html(RESULT, history, p_value=0.01)
    assert "<script" not in page and "http" not in page and "<link" not in page  # nothing to fetch
    assert "drifted: input drift: mean_r p=0.001 &lt; 0.01" in page
    assert page.count("<polyline") == len(monitor.figures(RESULT))
    assert "<h2>input_drift</h2>" in page and "<h2>window</h2>" in page  # one table per part of the check
    assert "<summary>1 more: per feature / per class</summary>" in page  # input_drift.mean_r.p_value, folded
    assert page.count("stroke-dasharray") == 1  # the p_value threshold, on the one p-value's chart
    assert "<th>confidence</th><td>0.8</td>" in page
    markdown = monitor.render_markdown(RESULT, ROOT / "reports/monitor/tiny-cnn/report.html")
    assert markdown.startswith("# tiny-cnn v1.0.0: **drifted**") and "| input_drift.share | 0.5 |" in markdown
    assert "mean_r.p_value" not in markdown.split("- input drift")[1].split("Report:")[0].replace("mean_r p=", "")  # detail: in the report only


def test_bad_requests_are_refused_naming_the_key(monitor, tmp_path):
    with pytest.raises(ValidationError, match=r"window\n.*Extra inputs are not permitted"):
        monitor.MonitorRequest(log="x", window=10)  # params.yaml monitor.window is the one place
    with pytest.raises(ValidationError, match=r"models\n.*valid list"):
        monitor.MonitorRequest(log="x", models="cifar10-cnn")
    with pytest.raises(ValidationError, match=r"log\n.*Field required"):
        monitor.MonitorRequest(models=["a"])
    with pytest.raises(StageError, match="request.models is empty and request.server is not set"):
        monitor.served_models(monitor.MonitorRequest(log="x"))
    with pytest.raises(StageError, match=r"request.server http://127.0.0.1:9: cannot list its models"):
        monitor.served_models(monitor.MonitorRequest(log="x", server="http://127.0.0.1:9"))


def registry_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    (repo / "params.yaml").write_text(yaml.safe_dump({"models": {"cnn": {"kind": "cnn", "data": "cifar10",
                                                                         "recipe": "default"}}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {}, "artifacts": {"tiny-cnn": {"path": "models/cnn",
                                                                                           "type": "model"}}}))
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def test_an_unknown_model_and_bad_thresholds_are_refused_naming_the_key(monitor, tmp_path):
    repo = registry_repo(tmp_path)
    with pytest.raises(StageError, match=r"params.yaml has no monitor section"):
        monitor.thresholds(str(repo))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["monitor"]
    (repo / "params.yaml").write_text(yaml.safe_dump({"monitor": {**params, "p_value": 2}}))
    with pytest.raises(StageError, match=r"params.yaml: monitor.p_value: Input should be less than 1"):
        monitor.thresholds(str(repo))
    with pytest.raises(StageError, match=r"request.models: 'nope' is no artifact .* known: tiny-cnn$"):
        monitor.artifact_path(str(repo), "nope")


def test_the_on_drift_request_is_checked_before_anything_runs(tmp_path):
    retrain = load_flow_module("retrain")
    repo = str(registry_repo(tmp_path))
    with pytest.raises(StageError, match=r"request.promote: no artifact 'cifar10-cnn'; known: tiny-cnn"):
        retrain.check_promote(repo, retrain.RetrainRequest(promote="cifar10-cnn"))
    with pytest.raises(StageError, match="request.promote releases the workspace's committed results: run without "
                                         "request.set_params"):
        retrain.check_promote(repo, retrain.RetrainRequest(promote="tiny-cnn", set_params=["lr=0.1"]))
    retrain.check_promote(repo, retrain.RetrainRequest(promote="tiny-cnn"))  # accepted


def test_a_retrain_is_released_as_the_next_minor_version(tmp_path):
    promote = load_flow_module("promote")
    repo = str(registry_repo(tmp_path))
    assert promote.next_version(repo, "tiny-cnn") == "v0.1.0"
    for tag in ("tiny-cnn@v1.0.0", "tiny-cnn@v1.4.2", "tiny-cnn@v0.9.0"):
        sh("git", "tag", "-a", tag, "-m", tag, cwd=tmp_path / "repo")
    assert promote.next_version(repo, "tiny-cnn") == "v1.5.0"


def test_the_automation_in_prefect_yaml_starts_a_promoting_retrain_once_per_cooldown():
    """The trigger as `prefect deploy` reads it: Prefect's own schema, and the parameters it renders."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert spec["on-drift"]["entrypoint"] == "flows/retrain.py:retrain"
    (trigger,) = [DeploymentEventTrigger(**t) for t in spec["on-drift"]["triggers"]]
    assert trigger.expect == {"ptpipe.model.drifted"} and trigger.for_each == {"prefect.resource.id"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1 and trigger.within.total_seconds() >= 3600
    assert trigger.parameters["request"]["promote"] == "{{ event.resource.name }}"
    assert spec["hourly"]["entrypoint"] == "flows/monitor.py:monitor" and spec["hourly"]["schedules"]
