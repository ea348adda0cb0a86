"""The real `dvc` CLI on a fresh git repo holding the project: stages run, then nothing re-runs.

What is checked is derived from dvc.yaml and params.yaml (no literal stage counts): one download@ and
prepare@ stage per data set (`datasets`), one train@, evaluate@, export@ and validate@ stage per model
(`models`). A user's data set and model are a params block: the side-by-side tests add a second text
and a second LSTM with no dvc.yaml edit, and take them away again.
"""
import ast
import json

import pytest
import yaml

from fixtures import (ROOT, TINY_TRAINING, alice_text, copy_project, expanded_stages, load_params, md5, serve_data, sh,
                      write_params)

PLUMBING = {"files", "params", "stage"}  # cannot change a stage's result (see the head of dvc.yaml)
DATA_STAGES = ("download", "prepare")  # per data set
MODEL_STAGES = ("train", "evaluate", "export", "validate")  # per model


def _source(name: str):
    """src/ptpipe/<name>.py, or a package's __init__.py ("kinds", "kinds.cnn" -> kinds/cnn.py)."""
    path = ROOT / "src/ptpipe" / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def ptpipe_imports(module: str, anywhere: bool = False) -> set[str]:
    """The ptpipe modules `module` imports at module level (`anywhere`: in functions too), directly or
    through another ("kinds.cnn" for ptpipe/kinds/cnn.py, which brings its package "kinds" along)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if "." in name:
            todo.append(name.rsplit(".", 1)[0])  # a submodule imports its package first
        tree = ast.parse(_source(name).read_text())
        for node in ast.walk(tree) if anywhere else tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptpipe"):
                package = node.module[len("ptpipe."):] if node.module != "ptpipe" else ""
                for alias in node.names:
                    sub = f"{package}.{alias.name}".strip(".")
                    if _source(sub).exists():  # `from ptpipe import kinds`, `from ptpipe.kinds import cnn`
                        todo.append(sub)
                if package:
                    todo.append(package)
    return seen


def expected_stages(params: dict) -> set[str]:
    return ({f"{s}@{d}" for s in DATA_STAGES for d in params["datasets"]}
            | {f"{s}@{m}" for s in MODEL_STAGES for m in params["models"]})


def stage_list(repo) -> set[str]:
    """The stages as the real dvc sees them."""
    return set(sh("dvc", "stage", "list", "--name-only", cwd=repo).stdout.split())


def test_stages_are_one_per_data_set_and_per_model_with_their_own_outputs(tmp_path):
    params = load_params()
    stages = expanded_stages()
    assert set(stages) == expected_stages(params)
    assert stage_list(copy_project(tmp_path / "repo")) == expected_stages(params)  # dvc agrees
    # every stage writes under its own entry's name: no two stages share an output
    outs = {}
    for name, (stage, group, key) in stages.items():
        for entry in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            assert key in path.split("/"), (name, path)
            assert path not in outs, f"{path}: written by {outs.get(path)} and {name}"
            outs[path] = name
    # a model's stages read the data set params names for it, and run its kind's module
    for model, m in params["models"].items():
        train = stages[f"train@{model}"][0]
        assert f"data/prepared/{m['data']}" in train["deps"] and f"src/ptpipe/kinds/{m['kind']}.py" in train["deps"]
        assert f"recipes.{m['kind']}.{m['recipe']}" in train["params"]
        for stage in ("evaluate", "validate"):
            assert f"--data data/prepared/{m['data']}" in stages[f"{stage}@{model}"][0]["cmd"]


def test_every_stage_depends_on_the_code_it_runs():
    """A change to a module a stage imports must re-run the stage: dvc.yaml lists every module it imports at
    module level in `deps`, and lists no module it never imports (in a function: a path some models take,
    e.g. evaluate's text generation). A stage of a model also runs that model's kind module,
    ptpipe/kinds/<kind>.py (params.yaml models.<name>.kind)."""
    models = load_params()["models"]
    pending = []
    for name, (stage, group, key) in expanded_stages().items():
        module = stage["cmd"].split("python -m ptpipe.")[1].split()[0]
        expected, possible = ptpipe_imports(module), ptpipe_imports(module, anywhere=True)
        if key in models:
            expected |= ptpipe_imports(f"kinds.{models[key]['kind']}")
            possible |= ptpipe_imports(f"kinds.{models[key]['kind']}", anywhere=True)
        listed = {dep[len("src/ptpipe/"):-3].replace("/__init__", "").replace("/", ".")
                  for dep in stage["deps"] if dep.startswith("src/ptpipe/")}
        pending += [f"{name}: src/ptpipe/{m}.py" for m in listed if not _source(m).exists()]
        listed = {m for m in listed if _source(m).exists()}
        assert expected - PLUMBING <= listed, f"{name}: add {sorted(expected - PLUMBING - listed)} to its deps"
        assert listed <= possible, f"{name}: {sorted(listed - possible)} in its deps, never imported"
    if pending:  # dvc.yaml names a module another branch is writing (src/ptpipe/images.py)
        pytest.xfail("dvc.yaml names modules that do not exist yet: " + ", ".join(pending))


@pytest.mark.slow
def test_dvc_repro_download_and_prepare_then_nothing_reruns(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    datasets = load_params(repo)["datasets"]
    first = sh("dvc", "repro", "prepare", cwd=repo)
    for data_set in datasets:
        for stage in DATA_STAGES:
            assert f"Running stage '{stage}@{data_set}'" in first.stdout
        assert len(list((repo / "data/raw" / data_set).iterdir())) == 1  # the file as it came, not unpacked
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
    changed = sh("dvc", "exp", "run", "-S", "datasets.cifar10.val_size=60", "prepare", cwd=repo)
    assert "Running stage 'prepare@cifar10'" in changed.stdout and "Running stage 'prepare@alice'" not in changed.stdout
    card = json.loads((repo / "data/prepared/cifar10/card.json").read_text())
    assert sum(card["counts"]["val"]) == 60
    assert len(server.requests) == downloads


# -- side by side: a user's data set and model are a params block ------------------------------------

POEM = ("Tyger Tyger, burning bright,\nIn the forests of the night;\nWhat immortal hand or eye,\n"
        "Could frame thy fearful symmetry?\n\n") * 40


def poems_block(server) -> dict:
    body = POEM.encode()
    return {"datasets.poems": {"format": "text", "url": server.add("/poems.txt", body), "md5": md5(body),
                               "gutenberg": False, "val_fraction": 0.1},
            "models.poems-lstm": {"kind": "lstm", "data": "poems", "recipe": "default"}}


def exp_show_metrics(repo) -> dict:
    """{metrics file: its data} of the workspace row of `dvc exp show --json`."""
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    workspace = next(row for row in shown if row.get("rev") == "workspace" or row.get("name") == "workspace")
    return {path: entry["data"] for path, entry in workspace["data"]["metrics"].items() if "data" in entry}


@pytest.mark.slow
def test_a_second_lstm_on_a_second_text_is_one_params_block_and_trains_beside_the_first(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    write_params(repo, **TINY_TRAINING)
    sh("git", "commit", "-qam", "tiny fixtures", cwd=repo)
    dvc_yaml = (repo / "dvc.yaml").read_text()

    write_params(repo, **poems_block(server))  # the user's whole change
    assert (repo / "dvc.yaml").read_text() == dvc_yaml
    assert sh("git", "diff", "--name-only", cwd=repo).stdout.split() == ["params.yaml"]
    params = load_params(repo)
    assert stage_list(repo) == expected_stages(params)
    assert {"download@poems", "prepare@poems", *(f"{s}@poems-lstm" for s in MODEL_STAGES)} <= stage_list(repo)
    sh("git", "commit", "-qam", "my poems and their LSTM", cwd=repo)

    run = sh("dvc", "repro", "evaluate@lstm", "evaluate@poems-lstm", cwd=repo)
    for stage in ("prepare@alice", "prepare@poems", "train@lstm", "train@poems-lstm", "evaluate@lstm",
                  "evaluate@poems-lstm"):
        assert f"Running stage '{stage}'" in run.stdout
    assert "Running stage 'prepare@cifar10'" not in run.stdout  # other branches are not run
    # each model: its own files, trained on its own data
    import torch

    for model, data_set, text in (("lstm", "alice", alice_text(False).decode()), ("poems-lstm", "poems", POEM)):
        config = torch.load(repo / f"models/{model}/model.pt", weights_only=True)["config"]
        assert config["data"]["name"] == data_set
        assert config["data"]["vocab"] == sorted(set(text.replace("\r\n", "\n")))
        assert (repo / f"reports/{model}/evaluate/samples.txt").is_file()
    metrics = exp_show_metrics(repo)
    for model in ("lstm", "poems-lstm"):
        assert metrics[f"metrics/{model}/evaluate.json"]["val_bits_per_char"] > 0
        assert metrics[f"metrics/{model}/train.json"]
    assert (metrics["metrics/lstm/evaluate.json"]["val_bits_per_char"]
            != metrics["metrics/poems-lstm/evaluate.json"]["val_bits_per_char"])
    shown = sh("dvc", "exp", "show", "--json", cwd=repo).stdout
    assert "models.poems-lstm.data" in shown or '"poems-lstm"' in shown  # its params are columns too

    # taking the block away leaves the tutorial's stages as they were: up to date, nothing to rerun
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "both trained", cwd=repo)
    data = load_params(repo)
    del data["datasets"]["poems"], data["models"]["poems-lstm"]
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert not any("poems" in s for s in stage_list(repo))
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    ran = ("download@alice", "prepare@alice", "train@lstm", "evaluate@lstm")
    assert not set(ran) & set(status), status
    for stage in ran:
        assert sh("dvc", "status", stage, cwd=repo).stdout.strip() == "Data and pipelines are up to date."
    assert "Running stage" not in sh("dvc", "repro", "evaluate@lstm", cwd=repo).stdout


@pytest.mark.parametrize("kind, data_set, takes", [
    ("cnn", "alice", "cifar10-python or image-folder"),
    ("lstm", "cifar10", "text"),
    ("gpt", "cifar10", "text"),
])
def test_a_kind_bound_to_data_it_cannot_take_is_refused_naming_the_models_data_key(in_tmp, kind, data_set, takes):
    from ptpipe import params
    from ptpipe.stage import StageError

    write_params(in_tmp, **{"models.mine": {"kind": kind, "data": data_set, "recipe": "default"}})
    with pytest.raises(StageError) as err:
        params.load("params.yaml")
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 1, err.value  # one line, naming the key
    fmt = load_params(in_tmp)["datasets"][data_set]["format"]
    assert problems[0].strip() == (f"params.yaml: models.mine.data: {data_set!r} is {fmt} data, and a {kind} model "
                                   f"trains on {takes}: bind it to such a data set, or choose another kind")


@pytest.mark.slow
def test_dvc_repro_of_a_model_on_the_wrong_data_stops_at_the_first_stage_and_writes_nothing(server, tmp_path):
    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    write_params(repo, **{"models.text-cnn": {"kind": "cnn", "data": "alice", "recipe": "default"}})
    sh("git", "commit", "-qam", "a CNN on text", cwd=repo)
    result = sh("dvc", "repro", cwd=repo, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("Running stage") == 1, output  # the first stage, whichever it is, and no other
    named = [line for line in output.splitlines() if "models.text-cnn" in line]
    assert len(named) == 1 and "models.text-cnn.data: 'alice' is text data" in named[0], output
    assert "Traceback" not in output
    assert server.requests == []  # nothing downloaded
    for folder in ("data/raw", "data/prepared", "models/text-cnn", "metrics"):
        assert not (repo / folder).exists() or not any((repo / folder).iterdir()), folder
    assert not (repo / "dvc.lock").exists()


def test_dvc_plots_page_is_git_ignored():
    """`dvc plots show` writes dvc_plots/; the docs' `git add -A` must not commit it."""
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert ignored.returncode == 0
