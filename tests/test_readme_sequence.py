"""The README's commands in the order a new user types them, on the tiny loopback fixtures, real dvc:
fresh clone -> the Offline section's `dvc exp run -S download...` -> its commit line -> the
Experiments section's `dvc exp run -S lr=0.01` -> a --temp run (what --queue workers do), which sees
only what git tracks: the committed dvc.lock lets it skip download and prepare."""
import re
import shlex

import pytest

from fixtures import ROOT, TINY_TRAINING, alice_text, cifar_archive, copy_project, md5, sh, write_params


def readme_command(pattern: str) -> str:
    """The first command of README.md matching `pattern`, continuation lines joined, comment cut."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if re.match(pattern, line.strip()))
    return line.split(" #")[0].strip()


@pytest.mark.slow
def test_readme_offline_then_experiments_sequence_works_as_typed(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    write_params(repo, **TINY_TRAINING, **{"prepare.cifar10.val_size": 50})  # seconds, not minutes
    sh("git", "commit", "-qam", "tiny", cwd=repo)
    cifar, text = cifar_archive(), alice_text()
    loopback = {"download.cifar10.url": server.add("/cifar-10-python.tar.gz", cifar),
                "download.cifar10.md5": md5(cifar),
                "download.alice.url": server.add("/pg11.txt", text), "download.alice.md5": md5(text)}

    offline = shlex.split(readme_command(r"dvc exp run\s+-S download\.cifar10\.url="))
    overrides = [arg.split("=")[0] for arg in offline if arg.startswith("download.")]
    assert sorted(overrides) == sorted(loopback)  # the README sets exactly these four
    typed = [f"{arg.split('=')[0]}={loopback[arg.split('=')[0]]}" if arg.startswith("download.") else arg
             for arg in offline]
    first = sh(*typed, cwd=repo)
    assert "Running stage 'validate@cnn'" in first.stdout and "Running stage 'validate@gpt'" in first.stdout

    commit = readme_command(r"git add .*dvc\.lock.* git commit")
    sh("bash", "-c", commit, cwd=repo)
    assert sh("git", "status", "--short", "--untracked-files=all", cwd=repo).stdout.strip() == ""

    experiment = sh(*shlex.split(readme_command(r"dvc exp run -S lr=0.01")), cwd=repo)
    assert "Running stage 'train_cnn'" in experiment.stdout and "Running stage 'download" not in experiment.stdout

    # a temp-dir run (as every --queue experiment is) reuses the committed data from the DVC cache
    temp = sh("dvc", "exp", "run", "--temp", "-S", "lstm.lr=0.02", "train_lstm", cwd=repo)  # lstm.lr: its own
    assert "Running stage 'train_lstm'" in temp.stdout
    assert "Running stage 'download" not in temp.stdout and "Running stage 'prepare" not in temp.stdout
