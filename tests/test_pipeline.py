"""The real `dvc` CLI on a fresh git repo holding the project: stages run, then nothing re-runs."""
import ast
import json

import pytest
import yaml

from fixtures import ROOT, copy_project, serve_data, sh

PLUMBING = {"files", "params", "stage"}  # cannot change a stage's result (see the head of dvc.yaml)


def _source(name: str):
    """src/ptpipe/<name>.py, or a package's __init__.py ("kinds", "kinds.cnn" -> kinds/cnn.py)."""
    path = ROOT / "src/ptpipe" / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def ptpipe_imports(module: str) -> set[str]:
    """The ptpipe modules `module` imports at module level, directly or through another
    ("kinds.cnn" for ptpipe/kinds/cnn.py, which brings its package "kinds" along)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if "." in name:
            todo.append(name.rsplit(".", 1)[0])  # a submodule imports its package first
        tree = ast.parse(_source(name).read_text())
        for node in tree.body:  # module level only: imports inside functions are optional paths
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptpipe"):
                package = node.module[len("ptpipe."):] if node.module != "ptpipe" else ""
                for alias in node.names:
                    sub = f"{package}.{alias.name}".strip(".")
                    if _source(sub).exists():  # `from ptpipe import kinds`, `from ptpipe.kinds import cnn`
                        todo.append(sub)
                if package:
                    todo.append(package)
    return seen


def expanded_stages() -> dict[str, dict]:
    """dvc.yaml's stages with `foreach` expanded (list: ${item}; dict: ${key}, ${item.<field>})."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
        for key, item in pairs:
            text = yaml.safe_dump(stage["do"]).replace("${key}", str(key))
            for field, value in (item.items() if isinstance(item, dict) else ()):
                text = text.replace("${item.%s}" % field, str(value))
            out[f"{name}@{key}"] = yaml.safe_load(text.replace("${item}", str(item)))
    return out


def test_every_stage_depends_on_the_code_it_runs():
    """A change to a module a stage imports must re-run the stage: dvc.yaml lists it in `deps`. A stage
    that runs one model kind (named in its cmd) also runs that kind's module, ptpipe/kinds/<kind>.py."""
    assert len(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == 8
    kind_names = {p.stem for p in (ROOT / "src/ptpipe/kinds").glob("*.py") if not p.stem.startswith("_")}
    for name, stage in expanded_stages().items():
        module, *args = stage["cmd"].split("python -m ptpipe.")[1].split()
        expected = ptpipe_imports(module)
        for kind in kind_names & set(args):
            expected |= ptpipe_imports(f"kinds.{kind}")
        listed = {dep[len("src/ptpipe/"):-3].replace("/__init__", "").replace("/", ".")
                  for dep in stage["deps"] if dep.startswith("src/ptpipe/")}
        assert listed == expected - PLUMBING, name


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
