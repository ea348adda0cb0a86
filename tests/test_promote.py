"""flows/promote.py under Prefect's test harness (a real temporary Prefect server), on a small
git + DVC registry repo (fixtures.model_registry): a better candidate is released and promoted,
a worse one leaves no tag and the stage where it was."""
from __future__ import annotations

import importlib.util
import time

import pytest

from fixtures import ROOT, add_candidate, model_registry, sh, write_models
from ptpipe import export, registry


def load_promote():
    spec = importlib.util.spec_from_file_location("flows_promote", ROOT / "flows" / "promote.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def onnx_file(root, seed):
    write_models(root / "models", seed=seed)
    export.export_model("cnn", root / "models" / "cnn", opset=17, revision="abc123")
    return root / "models" / "cnn" / "model.onnx"


def test_lower_is_better_for_bits_per_char():
    promote = load_promote()
    assert promote.is_better(1.9, 2.0, higher=False) and not promote.is_better(2.1, 2.0, higher=False)
    assert not promote.is_better(0.5, 0.5, higher=True) and promote.is_better(0.1, None, higher=True)


@pytest.mark.slow
def test_better_candidate_is_promoted_and_worse_one_is_not(harness, tmp_path):
    promote = load_promote()
    models = [onnx_file(tmp_path / f"m{seed}", seed) for seed in range(3)]
    repo = model_registry(tmp_path / "repo", tmp_path / "remote", [("v1.0.0", models[0], {"test": {"acc": 0.5}})])
    registry.promote("tiny-cnn", "v1.0.0", "prod", repo=repo)
    time.sleep(1.1)  # GTO orders stage assignments by tag time, in whole seconds

    add_candidate(repo, models[1], {"test": {"acc": 0.6}})
    better = promote.promote("tiny-cnn", "v1.1.0", repo=str(repo))
    assert better["promoted"] and better["current"] == {"version": "v1.0.0", "commit": better["current"]["commit"],
                                                        "metric": 0.5}
    assert registry.version_of("tiny-cnn", stage="prod", repo=str(repo)) == "v1.1.0"
    time.sleep(1.1)

    add_candidate(repo, models[2], {"test": {"acc": 0.4}})
    tags = sh("git", "tag", cwd=repo).stdout
    worse = promote.promote("tiny-cnn", "v1.2.0", repo=str(repo))
    assert not worse["promoted"] and worse["candidate"]["metric"] == 0.4
    assert sh("git", "tag", cwd=repo).stdout == tags  # no release, no stage tag
    assert registry.version_of("tiny-cnn", stage="prod", repo=str(repo)) == "v1.1.0"
