"""Versioned models end to end: real git, real dvc, a local DVC remote, loopback only.

Build a repo from the project, `dvc repro` the whole pipeline on the tiny fixtures, release
v1.0.0; change params, repro, release v1.1.0; from a fresh clone elsewhere, with an empty DVC
cache and the original repository's cache moved away (so only the remote can serve the files),
fetching either version gives exactly the bytes its release pushed, and both predict.
"""
import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures import TINY_TRAINING as TINY
from fixtures import copy_project, serve_data, sh, tool_env, write_params


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def cache_moved_away(repo: Path):
    """The repository's DVC cache out of reach: DVC would serve a local repo's files from it."""
    cache = repo / ".dvc" / "cache"
    aside = repo.parent / "cache-aside"
    cache.rename(aside)
    try:
        yield
    finally:
        aside.rename(cache)


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
    # the gpt without a dvc.yaml artifact entry: a params model is released under its own name
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    del dvc_yaml["artifacts"]["alice-gpt"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sh("dvc", "remote", "modify", "storage", "url", str(root / "remote"), cwd=repo)
    sh("git", "commit", "-qam", "tiny params, local remote, gpt undeclared", cwd=repo)

    first = sh("dvc", "repro", cwd=repo)
    assert "Running stage 'validate@" in first.stdout and "Running stage 'evaluate@lstm'" in first.stdout
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
    own = ptpipe("release", "gpt", "v1.0.0", cwd=repo)  # models.gpt, named by no artifact
    assert own.returncode == 0, own.stderr
    shas["gpt"] = sha256(repo / "models/gpt/model.onnx")
    # an edit on the released commit: the workspace is checked first, nothing else is said
    write_params(repo, **{"recipes.cnn.default.seed": 7})
    edited = ptpipe("release", "cifar10-cnn", "v1.0.1", cwd=repo)
    assert edited.returncode == 2 and "uncommitted changes" in edited.stderr and "params.yaml" in edited.stderr
    assert "already released" not in edited.stderr, edited.stderr
    sh("git", "checkout", "params.yaml", cwd=repo)
    # a second version of the same commit is refused before anything is pushed or tagged
    pushed = sorted(p.name for p in (root / "remote").rglob("*") if p.is_file())
    again = ptpipe("release", "cifar10-cnn", "v1.0.1", cwd=repo)
    assert again.returncode == 2 and "already released as cifar10-cnn@v1.0.0" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr and not sh("git", "tag", "--list", "cifar10-cnn@v1.0.1", cwd=repo).stdout
    assert sorted(p.name for p in (root / "remote").rglob("*") if p.is_file()) == pushed

    write_params(repo, **{"recipes.cnn.default.seed": 1})
    sh("git", "commit", "-qam", "seed 1", cwd=repo)
    stale = ptpipe("release", "cifar10-cnn", "v1.1.0", cwd=repo)
    assert stale.returncode == 2 and "dvc.lock is stale" in stale.stderr
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "run 2", cwd=repo)
    assert ptpipe("release", "cifar10-cnn", "v1.1.0", cwd=repo).returncode == 0
    shas["v1.1.0"] = sha256(repo / "models/cnn/model.onnx")
    assert shas["v1.0.0"] != shas["v1.1.0"]
    gpt_sha = shas.pop("gpt")
    assert ptpipe("promote", "cifar10-cnn", "v1.0.0", "prod", cwd=repo).returncode == 0
    unknown = ptpipe("promote", "cifar10-cnn", "v9.9.9", "prod", cwd=repo)
    assert unknown.returncode == 2 and "v9.9.9" in unknown.stderr and "Traceback" not in unknown.stderr
    yield root, repo, {**shas, "gpt@v1.0.0": gpt_sha}
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
    assert not (clone / ".dvc" / "cache").exists()  # a fresh clone: nothing cached
    image = tmp_path / "x.jpg"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    with cache_moved_away(repo):  # only the remote has the files now
        pull_each_version(clone, {v: s for v, s in shas.items() if v.startswith("v")}, image, tmp_path)


def pull_each_version(clone: Path, shas: dict, image: Path, tmp_path: Path) -> None:
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


@pytest.mark.slow
def test_release_refuses_to_tag_when_the_remote_lacks_a_file(released, tmp_path, monkeypatch):
    """`dvc push` reporting success while the remote lacks files (a mock of Repo.push: a real push
    cannot be made to fail silently here) must not end in a tag promising those files."""
    from dvc.repo import Repo

    from ptpipe import registry
    from ptpipe.stage import StageError

    _, repo, _ = released
    (repo / "NOTES.md").write_text("a commit no stage depends on\n")
    sh("git", "add", "NOTES.md", cwd=repo)
    sh("git", "commit", "-qm", "notes", cwd=repo)
    sh("dvc", "remote", "add", "--local", "-d", "empty", str(tmp_path / "empty-remote"), cwd=repo)
    monkeypatch.setattr(Repo, "push", lambda self, *args, **kwargs: 0)
    try:
        missing = registry.missing_on_remote(repo, ["models/cnn/model.onnx"])
        assert missing == ["models/cnn/model.onnx"]
        with pytest.raises(StageError, match=r"the DVC remote lacks models/cnn/model.onnx.*nothing tagged"):
            registry.release("cifar10-cnn", "v1.2.0", repo=repo)
        assert not sh("git", "tag", "--list", "cifar10-cnn@v1.2.0", cwd=repo).stdout
    finally:
        sh("dvc", "remote", "remove", "--local", "empty", cwd=repo)
    assert registry.missing_on_remote(repo, ["models/cnn/model.onnx"]) == []  # the real remote has it


@pytest.mark.slow
def test_registry_commands_work_from_any_folder_and_with_repo(released, tmp_path):
    _, repo, _ = released
    inside = ptpipe("versions", "cifar10-cnn", cwd=repo / "src" / "ptpipe")
    assert inside.returncode == 0 and "v1.0.0" in inside.stdout, inside.stderr
    elsewhere = ptpipe("versions", "cifar10-cnn", "--repo", str(repo), cwd=tmp_path)
    assert elsewhere.returncode == 0 and "v1.1.0" in elsewhere.stdout, elsewhere.stderr
    outside = ptpipe("versions", "cifar10-cnn", cwd=tmp_path)
    assert outside.returncode == 2 and "is not inside a DVC repository" in outside.stderr
    assert "Traceback" not in outside.stderr
    for command in (["release", "cifar10-cnn", "v9.0.0"], ["promote", "cifar10-cnn", "v1.0.0", "dev"],
                    ["unassign", "cifar10-cnn", "v1.0.0", "dev"]):
        out = ptpipe(*command, cwd=tmp_path)
        assert out.returncode == 2 and "--repo" in out.stderr and "Traceback" not in out.stderr, (command, out.stderr)


@pytest.mark.slow
def test_promote_again_needs_force_and_a_stage_can_be_unassigned(released, tmp_path):
    _, repo, _ = released
    sub = repo / "models"  # from a folder inside the repository
    assert ptpipe("promote", "cifar10-cnn", "v1.1.0", "staging", cwd=sub).returncode == 0
    again = ptpipe("promote", "cifar10-cnn", "v1.1.0", "staging", cwd=sub)
    assert again.returncode == 2 and "ptpipe promote --force" in again.stderr, again.stderr
    assert "ptpipe unassign cifar10-cnn v1.1.0 staging" in again.stderr and "Traceback" not in again.stderr
    forced = ptpipe("promote", "cifar10-cnn", "v1.1.0", "staging", "--force", cwd=sub)
    assert forced.returncode == 0, forced.stderr
    assert "cifar10-cnn#staging#2" in sh("git", "tag", cwd=repo).stdout.split()

    def stages_of(version):
        listing = ptpipe("versions", "cifar10-cnn", "--repo", str(repo), cwd=tmp_path).stdout
        return next(line for line in listing.splitlines() if line.startswith(version)).split()[4:]

    assert "staging" in " ".join(stages_of("v1.1.0"))
    unassigned = ptpipe("unassign", "cifar10-cnn", "v1.1.0", "staging", cwd=sub)
    assert unassigned.returncode == 0, unassigned.stderr
    assert "staging" not in " ".join(stages_of("v1.1.0"))
    not_there = ptpipe("unassign", "cifar10-cnn", "v1.1.0", "staging", cwd=sub)
    assert not_there.returncode == 2 and "is not in stage 'staging'" in not_there.stderr


@pytest.mark.slow
def test_a_params_model_no_artifact_names_is_released_and_fetched_under_its_own_name(released, tmp_path):
    from ptpipe import registry

    _, repo, shas = released
    assert "gpt@v1.0.0" in sh("git", "tag", cwd=repo).stdout.split()
    listing = ptpipe("versions", "gpt", cwd=repo)
    assert listing.returncode == 0 and "v1.0.0" in listing.stdout, listing.stderr
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    with cache_moved_away(repo):  # from the remote, through the models/<name> fallback
        path = registry.fetch_model("gpt", "v1.0.0", repo=str(clone), cache_dir=tmp_path / "cache")
    assert sha256(path) == shas["gpt@v1.0.0"]
    from ptpipe.inference import TextGenerator

    assert TextGenerator(path).generate("Alice", 5, 0.8, 1).startswith("Alice")
