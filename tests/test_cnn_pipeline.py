"""`dvc repro` through download@cifar10 -> prepare@cifar10 -> train@cnn -> evaluate@cnn on the loopback fixture,
then experiments."""
import json

import pytest

from fixtures import copy_project, serve_data, sh, write_params


@pytest.mark.slow
def test_dvc_repro_cnn_end_to_end_then_experiments(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    write_params(repo, **{"recipes.cnn.default.model_args": {"widths": [8, 16, 16], "scale": 0.5},
                          "recipes.cnn.default.epochs": 2, "recipes.cnn.default.batch_size": 64,
                          "recipes.cnn.default.tta": 1})
    sh("git", "commit", "-qam", "tiny cnn", cwd=repo)
    first = sh("dvc", "repro", "evaluate@cnn", cwd=repo)
    for stage in ("download@cifar10", "prepare@cifar10", "train@cnn", "evaluate@cnn"):
        assert f"Running stage '{stage}'" in first.stdout
    assert "Running stage 'download@alice'" not in first.stdout  # the text's branch is not needed
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    assert "metrics/cnn/evaluate.json" in json.dumps(metrics) and "metrics/cnn/train.json" in json.dumps(metrics)
    rows = json.loads((repo / "reports/cnn/evaluate/confusion.json").read_text())
    assert len(rows) == 100  # the fixture's test batch
    assert (repo / "reports/cnn/evaluate/predictions.png").is_file()
    assert "Running stage" not in sh("dvc", "repro", "evaluate@cnn", cwd=repo).stdout

    # an experiment as users type it: the top-level lr reaches the default recipe
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline", cwd=repo)
    exp = sh("dvc", "exp", "run", "-S", "lr=0.01", "evaluate@cnn", cwd=repo)
    assert "Running stage 'train@cnn'" in exp.stdout and "Running stage 'download" not in exp.stdout
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    assert "0.01" in json.dumps(shown)
    # the baseline commit and the experiment both carry their metrics (cache: false outputs live in git)
    baseline = next(row for row in shown if row.get("name") == "main")
    experiment = baseline["experiments"][0]["revs"][0]
    for row in (baseline, experiment):
        assert row["data"]["metrics"]["metrics/cnn/evaluate.json"]["data"]["test"]["acc"] >= 0, row
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=repo).stdout)
    assert "old" in diff["metrics/cnn/evaluate.json"]["test.acc"], diff  # HEAD's value is readable
    import torch

    assert torch.load(repo / "models/cnn/model.pt", weights_only=True)["config"]["params"]["lr"] == 0.01

    # the queue: three experiments, two workers
    for lr in ("0.002", "0.003", "0.004"):
        sh("dvc", "exp", "run", "--queue", "-S", f"lr={lr}", "evaluate@cnn", cwd=repo)
    sh("dvc", "queue", "start", "-j", "2", cwd=repo)
    sh("dvc", "queue", "status", cwd=repo)
    import time

    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        status = sh("dvc", "queue", "status", cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 3, status
    table = sh("dvc", "exp", "show", "--csv", cwd=repo).stdout
    for lr in ("0.002", "0.003", "0.004"):
        assert lr in table
