"""The README's commands in the order a new user types them, on the tiny loopback fixtures, real dvc:
fresh clone -> the Offline section's `dvc exp run -S datasets...` -> its commit line -> the
Experiments section's `dvc exp run -S lr=0.01` -> a --temp run (what --queue workers do), which sees
only what git tracks: the committed dvc.lock lets it skip download and prepare.

README lines this test runs (each the first line matching; a `\\` continuation is joined):
  - `dvc exp run \\` followed by `-S datasets.<name>.url=...` and `-S datasets.<name>.md5=...` for every data
    set of params.yaml (the Offline section's mirror command)
  - `git add ... dvc.lock ... && git commit ...` (the Offline section's commit line; every path it names
    must exist after the run)
  - `dvc exp run -S lr=0.01` (the Experiments section)
"""
import re
import shlex

import pytest

from fixtures import ROOT, TINY_TRAINING, alice_text, cifar_archive, copy_project, load_params, md5, sh, write_params


def readme_command(pattern: str) -> str:
    """The first command of README.md matching `pattern`, continuation lines joined, comment cut."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    found = [line for line in text.splitlines() if re.match(pattern, line.strip())]
    assert found, f"README.md has no command matching {pattern!r} (tests/test_readme_sequence.py runs it)"
    return found[0].split(" #")[0].strip()


@pytest.mark.slow
def test_readme_offline_then_experiments_sequence_works_as_typed(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    write_params(repo, **TINY_TRAINING, **{"datasets.cifar10.val_size": 50})  # seconds, not minutes
    sh("git", "commit", "-qam", "tiny", cwd=repo)
    params = load_params(repo)
    cifar, text = cifar_archive(), alice_text()
    loopback = {"datasets.cifar10.url": server.add("/cifar-10-python.tar.gz", cifar),
                "datasets.cifar10.md5": md5(cifar),
                "datasets.alice.url": server.add("/pg11.txt", text), "datasets.alice.md5": md5(text)}
    assert {key.split(".")[1] for key in loopback} == set(params["datasets"])  # every data set of params.yaml

    offline = shlex.split(readme_command(r"dvc exp run\s+-S datasets\.\S+\.url="))
    overrides = [arg.split("=")[0] for arg in offline if arg.startswith("datasets.")]
    assert sorted(overrides) == sorted(loopback)  # the README sets exactly the url and md5 of each data set
    typed = [f"{arg.split('=')[0]}={loopback[arg.split('=')[0]]}" if arg.startswith("datasets.") else arg
             for arg in offline]
    first = sh(*typed, cwd=repo)
    for model in params["models"]:
        assert f"Running stage 'validate@{model}'" in first.stdout

    commit = readme_command(r"git add .*dvc\.lock.* git commit")
    sh("bash", "-c", commit, cwd=repo)
    assert sh("git", "status", "--short", "--untracked-files=all", cwd=repo).stdout.strip() == ""

    experiment = sh(*shlex.split(readme_command(r"dvc exp run -S lr=0.01")), cwd=repo)
    assert "Running stage 'train@cnn'" in experiment.stdout and "Running stage 'download" not in experiment.stdout

    # a temp-dir run (as every --queue experiment is) reuses the committed data from the DVC cache
    temp = sh("dvc", "exp", "run", "--temp", "-S", "recipes.lstm.default.lr=0.02", "train@lstm", cwd=repo)
    assert "Running stage 'train@lstm'" in temp.stdout
    assert "Running stage 'download" not in temp.stdout and "Running stage 'prepare" not in temp.stdout
