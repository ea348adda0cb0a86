"""Versioned models end to end: real git, real dvc, a local DVC remote, loopback only.

Build a repo from the project, `dvc repro` the whole pipeline on the tiny fixtures, release
v1.0.0; change params, repro, release v1.1.0; from a fresh clone elsewhere, fetching either
version gives exactly the bytes its release pushed, and both predict.
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fixtures import copy_project, serve_data, sh, tool_env, write_params

TINY = {
    "cnn.recipes.default.epochs": 1, "cnn.recipes.default.model_args": {"widths": [8, 16, 16], "scale": 0.5},
    "cnn.recipes.default.tta": 0,
    "lstm.epochs": 1, "lstm.hidden_size": 32, "lstm.embedding_size": 32, "lstm.batch_size": 4,
    "lstm.seq_len": 20, "lstm.eval_streams": 2, "lstm.sample.length": 20,
}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ptpipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ptpipe.cli", *args], cwd=cwd, env=tool_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A project repo with cifar10-cnn v1.0.0 and v1.1.0 released to a local remote."""
    from fixtures import FixtureServer

    root = tmp_path_factory.mktemp("registry")
    server = FixtureServer()
    repo = copy_project(root / "repo")
    serve_data(server, repo)
    write_params(repo, **TINY)
    sh("dvc", "remote", "modify", "storage", "url", str(root / "remote"), cwd=repo)
    sh("git", "commit", "-qam", "tiny params, local remote", cwd=repo)

    first = sh("dvc", "repro", cwd=repo)
    assert "Running stage 'validate@" in first.stdout and "Running stage 'evaluate_lstm'" in first.stdout
    assert "Running stage" not in sh("dvc", "repro", cwd=repo).stdout  # a second repro runs nothing

    # a stale dvc.lock or a dirty workspace is refused, and nothing is tagged
    dirty = ptpipe("release", "cifar10-cnn", "v1.0.0", cwd=repo)
    assert dirty.returncode == 2 and "uncommitted changes" in dirty.stderr and "dvc.lock" in dirty.stderr
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "run 1", cwd=repo)
    shas = {}
    rel = ptpipe("release", "cifar10-cnn", "v1.0.0", cwd=repo)
    assert rel.returncode == 0, rel.stderr
    shas["v1.0.0"] = sha256(repo / "models/cnn/model.onnx")
    # a second version of the same commit is refused before anything is pushed or tagged
    pushed = sorted(p.name for p in (root / "remote").rglob("*") if p.is_file())
    again = ptpipe("release", "cifar10-cnn", "v1.0.1", cwd=repo)
    assert again.returncode == 2 and "already released as cifar10-cnn@v1.0.0" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr and not sh("git", "tag", "--list", "cifar10-cnn@v1.0.1", cwd=repo).stdout
    assert sorted(p.name for p in (root / "remote").rglob("*") if p.is_file()) == pushed

    write_params(repo, **{"cnn.recipes.default.seed": 1})
    sh("git", "commit", "-qam", "seed 1", cwd=repo)
    stale = ptpipe("release", "cifar10-cnn", "v1.1.0", cwd=repo)
    assert stale.returncode == 2 and "dvc.lock is stale" in stale.stderr
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "run 2", cwd=repo)
    assert ptpipe("release", "cifar10-cnn", "v1.1.0", cwd=repo).returncode == 0
    shas["v1.1.0"] = sha256(repo / "models/cnn/model.onnx")
    assert shas["v1.0.0"] != shas["v1.1.0"]
    assert ptpipe("promote", "cifar10-cnn", "v1.0.0", "prod", cwd=repo).returncode == 0
    unknown = ptpipe("promote", "cifar10-cnn", "v9.9.9", "prod", cwd=repo)
    assert unknown.returncode == 2 and "v9.9.9" in unknown.stderr and "Traceback" not in unknown.stderr
    yield root, repo, shas
    server.close()


@pytest.mark.slow
def test_tags_follow_gto_format(released):
    _, repo, _ = released
    tags = sh("git", "tag", cwd=repo).stdout.split()
    assert {"cifar10-cnn@v1.0.0", "cifar10-cnn@v1.1.0", "cifar10-cnn#prod#1"} <= set(tags)
    listing = ptpipe("versions", "cifar10-cnn", cwd=repo).stdout
    assert "v1.0.0" in listing and "v1.1.0" in listing and "prod" in listing
    again = ptpipe("release", "cifar10-cnn", "v1.0.0", cwd=repo)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_fresh_clone_pulls_each_version_byte_for_byte_and_predicts(released, tmp_path):
    root, repo, shas = released
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    image = tmp_path / "x.jpg"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    for version, expected in shas.items():
        # the DVC CLI, as users type it
        out = tmp_path / version
        sh("dvc", "artifacts", "get", str(clone), "cifar10-cnn", "--rev", version, "-o", str(out), cwd=tmp_path)
        assert sha256(out / "model.onnx") == expected
        assert (out / "model.ts").is_file()
        # the Python helper: a ready onnxruntime session, cached
        script = (f"from ptpipe import registry, inference; import json, pathlib; "
                  f"path = registry.fetch_model('cifar10-cnn', '{version}', repo='{clone}', "
                  f"cache_dir=pathlib.Path('{tmp_path / 'cache'}')); "
                  f"registry.load_model('cifar10-cnn', '{version}', repo='{clone}', "
                  f"cache_dir=pathlib.Path('{tmp_path / 'cache'}')); print(path)")
        fetched = subprocess.run([sys.executable, "-c", script], env=tool_env(), capture_output=True, text=True,
                                 cwd=tmp_path, timeout=300)
        assert fetched.returncode == 0, fetched.stderr
        from pathlib import Path

        assert sha256(Path(fetched.stdout.strip())) == expected
        predicted = ptpipe("predict", str(image), "--json", "--model", str(out / "model.onnx"), cwd=tmp_path)
        assert predicted.returncode == 0, predicted.stderr
        assert len(json.loads(predicted.stdout)["predictions"][str(image)]) == 3


@pytest.mark.slow
def test_missing_version_and_missing_remote_data_are_clear_errors(released, tmp_path):
    from ptpipe import registry
    from ptpipe.stage import StageError

    root, repo, _ = released
    with pytest.raises(StageError, match="no v9.9.9 of cifar10-cnn"):
        registry.fetch_model("cifar10-cnn", "v9.9.9", repo=str(repo), cache_dir=tmp_path / "cache")
    # a clone whose remote is empty: the version exists, its data does not
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "remote", "modify", "storage", "url", str(tmp_path / "empty-remote"), cwd=clone)
    sh("git", "commit", "-qam", "empty remote", cwd=clone)
    with pytest.raises(StageError, match="cannot fetch .*model.onnx of cifar10-cnn v1.0.0"):
        registry.fetch_model("cifar10-cnn", "v1.0.0", repo=str(clone), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model.onnx"))
