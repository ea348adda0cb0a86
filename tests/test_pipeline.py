"""The real `dvc` CLI on a fresh git repo holding the project: stages run, then nothing re-runs."""
import ast
import json

import pytest
import yaml

from fixtures import ROOT, copy_project, serve_data, sh

PLUMBING = {"files", "params", "stage"}  # cannot change a stage's result (see the head of dvc.yaml)


def ptpipe_imports(module: str) -> set[str]:
    """The ptpipe modules `module` imports at module level, directly or through another."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "src/ptpipe" / f"{name}.py").read_text())
        for node in tree.body:  # module level only: imports inside functions are optional paths
            if isinstance(node, ast.ImportFrom) and node.module == "ptpipe":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ptpipe."):
                todo.append(node.module.split(".")[1])
    return seen


def test_every_stage_depends_on_the_code_it_runs():
    """A change to a module a stage imports must re-run the stage: dvc.yaml lists it in `deps`."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert len(stages) == 8
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages
        module = stage["cmd"].split("python -m ptpipe.")[1].split()[0]
        listed = {dep[len("src/ptpipe/"):-3] for dep in stage["deps"] if dep.startswith("src/ptpipe/")}
        assert listed == ptpipe_imports(module) - PLUMBING, name


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
    # (the stages after prepare have not run: ask about the prepare stages only)
    assert sh("dvc", "status", "prepare", cwd=repo).stdout.strip() == "Data and pipelines are up to date."

    # changing one data set's params re-runs only that branch of the DAG
    sh("dvc", "exp", "run", "-S", "prepare.cifar10.val_size=60", "prepare", cwd=repo)
    card = json.loads((repo / "data/prepared/cifar10/card.json").read_text())
    assert sum(card["counts"]["val"]) == 60
    assert len(server.requests) == downloads


def test_dvc_plots_page_is_git_ignored():
    """`dvc plots show` writes dvc_plots/; the docs' `git add -A` must not commit it."""
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert ignored.returncode == 0
