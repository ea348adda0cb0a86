"""The real `dvc` CLI on a fresh git repo holding the project: stages run, then nothing re-runs."""
import json

import pytest

from fixtures import copy_project, serve_data, sh


@pytest.mark.slow
def test_dvc_repro_download_and_prepare_then_nothing_reruns(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    first = sh("dvc", "repro", "prepare", cwd=repo)
    for stage in ("download@cifar10", "download@alice", "prepare@cifar10", "prepare@alice"):
        assert f"Running stage '{stage}'" in first.stdout
    card = json.loads((repo / "data/prepared/cifar10/card.json").read_text())
    assert sum(card["counts"]["val"]) == 50 and sum(card["counts"]["train"]) == 250
    stats = json.loads((repo / "data/prepared/alice/stats.json").read_text())
    assert stats["vocab_size"] > 20
    assert (repo / "dvc.lock").exists()

    downloads = len(server.requests)
    again = sh("dvc", "repro", "prepare", cwd=repo)
    assert "Running stage" not in again.stdout
    assert len(server.requests) == downloads  # nothing fetched again
    assert sh("dvc", "status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."

    # changing one data set's params re-runs only that branch of the DAG
    sh("dvc", "exp", "run", "-S", "prepare.cifar10.val_size=60", "prepare", cwd=repo)
    card = json.loads((repo / "data/prepared/cifar10/card.json").read_text())
    assert sum(card["counts"]["val"]) == 60
    assert len(server.requests) == downloads
