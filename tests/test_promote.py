"""flows/promote.py under Prefect's test harness (a real temporary Prefect server), on a small
git + DVC registry repo (fixtures.model_registry): a better candidate is released and promoted,
a worse one leaves no tag and the stage where it was. The metric is the one the model's kind declares
(params.yaml models.<model>.kind), read from metrics/<model>/evaluate.json: higher test accuracy for
an image classifier, lower bits/char for a text model; or the one the command line names."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

import yaml

from fixtures import ROOT, add_candidate, model_registry, sh, tool_env, write_models
from ptpipe import export, registry
from ptpipe.stage import StageError


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


def onnx_file(root, seed, model="cnn"):
    (root / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_models(root / "models", seed=seed)
    export.export(root / "models" / model, root / "params.yaml", revision="abc123")
    return root / "models" / model / "model.onnx"


def test_lower_is_better_for_bits_per_char():
    promote = load_promote()
    assert promote.is_better(1.9, 2.0, higher=False) and not promote.is_better(2.1, 2.0, higher=False)
    assert not promote.is_better(0.5, 0.5, higher=True) and promote.is_better(0.1, None, higher=True)


def test_the_criterion_is_the_models_kind_unless_the_command_line_names_one(tmp_path):
    """No git or Prefect needed: params.yaml's models and dvc.yaml's artifacts decide."""
    promote = load_promote()
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("dvc", "init", "--no-scm", "-q", cwd=repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": {"pets-cnn": {"path": "models/pets", "type": "model"},
                                                                 "loose": {"path": "elsewhere/x", "type": "model"}}}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"models": {
        "pets": {"kind": "cnn", "data": "my-pets", "recipe": "default"},
        "poems": {"kind": "lstm", "data": "poems", "recipe": "default"},
        "poems-gpt": {"kind": "gpt", "data": "poems", "recipe": "default"}}}))
    r = str(repo)
    assert promote.criterion(r, "pets-cnn", None, None, None) == ("metrics/pets/evaluate.json", "test.acc", True)
    # models no artifact names are released under their own names
    assert promote.criterion(r, "poems", None, None, None) == ("metrics/poems/evaluate.json", "val_bits_per_char", False)
    assert promote.criterion(r, "poems-gpt", None, None, None) == (
        "metrics/poems-gpt/evaluate.json", "val_bits_per_char", False)
    # the command line overrides any part
    assert promote.criterion(r, "poems", None, "loss", True) == ("metrics/poems/evaluate.json", "loss", True)
    assert promote.criterion(r, "loose", "m.json", "score", True) == ("m.json", "score", True)
    with pytest.raises(StageError, match=r"loose's folder models/x is no model of params.yaml: pass --metric-file, "
                                         r"--metric-key and --higher-is-better"):
        promote.criterion(r, "loose", None, None, None)
    with pytest.raises(StageError, match=r"no artifact 'nope' in dvc.yaml or params.yaml models; known: loose, "
                                         r"pets-cnn, poems, poems-gpt"):
        promote.criterion(r, "nope", None, None, None)


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


@pytest.mark.slow
def test_a_text_model_is_promoted_by_lower_bits_per_char_with_no_metric_arguments(harness, tmp_path):
    """`python flows/promote.py alice-gpt vX` as typed: the gpt kind's metric, val_bits_per_char, lower is better."""
    from prefect.settings import PREFECT_API_URL

    promote = load_promote()
    models = [onnx_file(tmp_path / f"m{seed}", seed, "gpt") for seed in range(3)]
    repo = model_registry(tmp_path / "repo", tmp_path / "remote", [("v1.0.0", models[0], {"val_bits_per_char": 2.4})],
                          name="alice-gpt", model="gpt", kind="gpt", data="alice")
    registry.promote("alice-gpt", "v1.0.0", "prod", repo=repo)
    time.sleep(1.1)  # GTO orders stage assignments by tag time, in whole seconds

    add_candidate(repo, models[1], {"val_bits_per_char": 2.1, "perplexity": 4.3}, "gpt")
    env = {**tool_env(), "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server
    typed = subprocess.run([sys.executable, str(ROOT / "flows" / "promote.py"), "alice-gpt", "v1.1.0",
                            "--repo", str(repo)], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert typed.returncode == 0, typed.stderr
    better = json.loads(typed.stdout[typed.stdout.index("{"):])
    assert better["promoted"] and better["metric"] == "val_bits_per_char"
    assert better["candidate"]["metric"] == 2.1 and better["current"]["metric"] == 2.4
    assert registry.version_of("alice-gpt", stage="prod", repo=str(repo)) == "v1.1.0"
    time.sleep(1.1)

    add_candidate(repo, models[2], {"val_bits_per_char": 2.3}, "gpt")  # better than v1.0.0, worse than prod's
    tags = sh("git", "tag", cwd=repo).stdout
    worse = promote.promote("alice-gpt", "v1.2.0", repo=str(repo))
    assert not worse["promoted"] and worse["candidate"]["metric"] == 2.3
    assert sh("git", "tag", cwd=repo).stdout == tags  # no release, no stage tag
    assert registry.version_of("alice-gpt", stage="prod", repo=str(repo)) == "v1.1.0"
    # a metric named on the command line that the committed file lacks: the run fails saying so
    missing = promote.promote("alice-gpt", "v1.2.0", repo=str(repo), metric_key="perplexity", return_state=True)
    assert missing.is_failed() and "has no perplexity" in str(missing.result(raise_on_failure=False))
