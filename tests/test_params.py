"""params.yaml validation: every stage refuses bad params with a message naming the key, before writing."""
import json
import subprocess
import sys

import pytest
import yaml

from fixtures import ROOT, sh, tool_env, write_params
from ptpipe import params
from ptpipe.stage import StageError


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems(d) -> list[str]:
    """The lines of the StageError that params.parse raises for `d` (one per problem)."""
    with pytest.raises(StageError) as err:
        params.parse(d)
    first, *lines = str(err.value).splitlines()
    assert first == "invalid params"
    return [line.strip() for line in lines]


def test_project_params_are_valid():
    # (no committed value is asserted: a user's "change a param, commit" must not break the suite)
    p = params.load(ROOT / "params.yaml")
    for name, model in p.models.items():
        assert model.data in p.datasets and model.recipe in p.recipes[model.kind]
        assert p.recipe(name).epochs >= 1  # the kind's own schema, typed
    assert p.recipe("lstm").lr > 0


def test_lstm_lr_is_required_since_the_lstm_does_not_read_the_top_level_lr():
    d = raw()
    d["recipes"]["lstm"]["default"]["lr"] = None
    with pytest.raises(StageError, match=r"recipes.lstm.default.lr: Input should be a valid number \(got None\)"):
        params.parse(d)


def stage_params_repo(tmp_path):
    """The project's params.yaml and its train stage's `foreach` with its `params:` list verbatim, on stand-in
    commands (each writes its output): what `dvc status` says is about that list alone."""
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"foreach": train["foreach"], "do": {
        "cmd": "python -c \"open('${key}.out', 'w').write('x')\"", "params": train["do"]["params"],
        "outs": ["${key}.out"]}}}}, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "repro", "-q", cwd=repo)
    return repo


def stale(repo) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=repo).stdout))


@pytest.mark.slow
def test_training_stages_depend_on_the_values_they_use_only(tmp_path):
    """Real dvc: editing a recipe no model uses, or the top-level lr the text models do not read, reruns
    nothing; editing what a model's stage reads makes that stage (and only it) stale."""
    repo = stage_params_repo(tmp_path)
    assert stale(repo) == set()
    selected = raw()["models"]["cnn"]["recipe"]
    unused = next(name for name in raw()["recipes"]["cnn"] if name != selected)
    write_params(repo, **{f"recipes.cnn.{unused}.epochs": 99})
    assert stale(repo) == set()  # an unused recipe: no stage reruns
    write_params(repo, **{f"recipes.cnn.{selected}.epochs": 99})
    assert stale(repo) == {"train@cnn"}
    write_params(repo, **{f"recipes.cnn.{selected}.epochs": raw()["recipes"]["cnn"][selected]["epochs"]})
    assert stale(repo) == set()
    write_params(repo, **{"recipes.lstm.default.lr": 0.005})
    assert stale(repo) == {"train@lstm"}  # gpt trains on the same data with its own recipe
    write_params(repo, **{"recipes.lstm.default.lr": raw()["recipes"]["lstm"]["default"]["lr"],
                          "models.cnn.recipe": unused})  # another recipe selected
    assert stale(repo) == {"train@cnn"}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(lrr=0.1), "lrr: unknown key"),
    (lambda d: d.update(lr=-0.1), "lr: Input should be greater than 0"),
    (lambda d: d.update(lr="fast"), "lr: Input should be a valid number"),
    (lambda d: d["datasets"]["cifar10"].update(md5="XYZ"), "datasets.cifar10.md5: Value error, must be 32"),
    (lambda d: d["datasets"]["alice"].update(url="ftp://x"), "datasets.alice.url: Value error, must start with"),
    (lambda d: d["download"].update(retries="3"), "download.retries: Input should be a valid integer"),
    (lambda d: d["datasets"]["alice"].update(val_fraction=0.9), "datasets.alice.val_fraction: Input should be less"),
    (lambda d: d["datasets"]["cifar10"].update(val_size=0),
     "datasets.cifar10.val_size: Input should be greater than or equal to 1"),
    (lambda d: d["datasets"]["alice"].update(val_size=10), "datasets.alice.val_size: unknown key"),  # a cifar key
    (lambda d: d["train"].update(device="tpu"), "train.device: Input should be 'auto'"),
    (lambda d: d.pop("train"), "train: missing"),
    (lambda d: d["evaluate"]["sample"].update(length=0), "evaluate.sample.length: Input should be greater"),
])
def test_bad_params_name_the_key(mutate, message):
    d = raw()
    mutate(d)
    with pytest.raises(StageError) as err:
        params.parse(d)
    assert message in str(err.value)


@pytest.mark.parametrize("stage", [
    ["ptpipe.download", "alice", "--raw", "data/raw/alice"],
    ["ptpipe.prepare", "cifar10", "--raw", "data/raw/cifar10", "--prepared", "data/prepared/cifar10"],
    ["ptpipe.train", "lstm", "--data", "data/prepared/alice", "--model", "models/lstm/model.pt",
     "--live", "dvclive/lstm", "--metrics", "metrics/lstm/train.json"],
], ids=["download", "prepare", "train"])
def test_stage_refuses_bad_params_before_writing(in_tmp, stage):
    write_params(in_tmp, lr=-1)
    result = subprocess.run([sys.executable, "-m", *stage], cwd=in_tmp, env=tool_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "params.yaml: lr: Input should be greater than 0 (got -1)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["recipes"]["cnn"]["default"].update(lr=50),
     "recipes.cnn.default.lr: Input should be less than or equal to 10"),
    (lambda d: d["recipes"]["lstm"]["default"].update(weight_decay=5),
     "recipes.lstm.default.weight_decay: Input should be less than 1"),
])
def test_lr_and_weight_decay_have_upper_bounds_everywhere(mutate, message):
    d = raw()
    mutate(d)
    with pytest.raises(StageError, match=message):
        params.parse(d)


# -- models, data sets and recipes: what binds them ------------------------------------------------

def test_an_unknown_recipe_is_one_line_naming_models_x_recipe_and_the_recipes():
    d = raw()
    d["models"]["cnn"]["recipe"] = "nope"
    assert problems(d) == [
        "params.yaml: models.cnn.recipe: 'nope' is not one of recipes.cnn (airbench94, default, tutorial)"]


def test_an_unknown_data_set_is_one_line_naming_models_x_data():
    d = raw()
    d["models"]["lstm"]["data"] = "alicee"
    assert problems(d) == ["params.yaml: models.lstm.data: no data set 'alicee' in datasets (there are "
                           + ", ".join(d["datasets"]) + ")"]


@pytest.mark.parametrize("kind, data, fmt, takes", [
    ("cnn", "alice", "text", "cifar10-python or image-folder"),
    ("lstm", "cifar10", "cifar10-python", "text"),
    ("gpt", "cifar10", "cifar10-python", "text"),
])
def test_a_kind_bound_to_data_of_another_format_is_one_line_naming_models_x_data(kind, data, fmt, takes):
    d = raw()
    d["models"]["mine"] = {"kind": kind, "data": data, "recipe": "default"}
    assert problems(d) == [f"params.yaml: models.mine.data: {data!r} is {fmt} data, and a {kind} model trains on "
                           f"{takes}: bind it to such a data set, or choose another kind"]


def test_an_unknown_kind_names_models_x_kind_and_the_known_kinds():
    d = raw()
    d["models"]["mine"] = {"kind": "resnet", "data": "cifar10", "recipe": "default"}
    assert problems(d) == ["params.yaml: models.mine.kind: unknown model kind 'resnet' (known kinds are cnn, lstm, gpt)"]


@pytest.mark.parametrize("kind, key, value, message", [
    ("cnn", "optimiser", "sgd", "recipes.cnn.tutorial.optimiser: unknown key (check its spelling and section)"),
    ("lstm", "hiden_size", 32, "recipes.lstm.default.hiden_size: unknown key (check its spelling and section)"),
    ("gpt", "n_embed", 32, "recipes.gpt.default.n_embed: unknown key (check its spelling and section)"),
])
def test_an_unknown_key_in_a_recipe_names_recipes_kind_name_key(kind, key, value, message):
    d = raw()
    d["recipes"][kind]["tutorial" if kind == "cnn" else "default"][key] = value
    assert problems(d) == [f"params.yaml: {message}"]


def test_an_unused_recipe_is_checked_too():
    d = raw()
    d["recipes"]["cnn"]["unused"] = {**d["recipes"]["cnn"]["tutorial"], "epochs": 0}
    assert problems(d) == ["params.yaml: recipes.cnn.unused.epochs: Input should be greater than or equal to 1 (got 0)"]


def image_folder(image_size: int) -> dict:
    return {"format": "image-folder", "url": "file:///tmp/my-pets", "md5": "", "image_size": image_size,
            "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}


@pytest.mark.parametrize("recipe, size, least", [("tutorial", 12, 16), ("default", 8, 9)])
def test_an_image_size_too_small_for_the_arch_names_the_model_and_the_data_set(recipe, size, least):
    d = raw()
    d["datasets"]["pets"] = image_folder(size)
    d["models"]["pets"] = {"kind": "cnn", "data": "pets", "recipe": recipe}
    arch = d["recipes"]["cnn"][recipe]["arch"]
    assert problems(d) == [f"params.yaml: models.pets: recipes.cnn.{recipe} on datasets.pets: image_size {size} is "
                           f"too small for arch {arch} (at least {least}): raise the data set's image_size or "
                           f"choose another recipe"]
    d["datasets"]["pets"] = image_folder(least)  # the smallest size the arch takes
    params.parse(d)


def test_several_problems_are_one_line_each():
    d = raw()
    d["models"]["a"] = {"kind": "cnn", "data": "nope", "recipe": "nope"}
    d["models"]["b"] = {"kind": "lstm", "data": "cifar10", "recipe": "default"}
    lines = problems(d)
    assert [line.split(":")[1].strip() for line in lines] == ["models.a.data", "models.a.recipe", "models.b.data"]


@pytest.mark.parametrize("section, name", [
    ("datasets", "my pets"), ("datasets", "../up"), ("datasets", "-dash"), ("models", "a/b"), ("models", "_x"),
])
def test_bad_data_set_and_model_names_are_refused(section, name):
    d = raw()
    d[section][name] = d[section]["alice" if section == "datasets" else "lstm"]
    assert problems(d) == [f"params.yaml: {section}: name {name!r}: use letters, digits, '-' and '_' "
                           f"(it names stages and folders)"]


def test_an_unknown_data_set_format_names_the_key():
    d = raw()
    d["datasets"]["alice"]["format"] = "csv"
    assert any(line.startswith("params.yaml: datasets.alice") and "format" in line for line in problems(d))


def test_validate_shapes_of_an_unknown_kind_are_refused():
    d = raw()
    d["validate"]["shapes"]["resnet"] = {"batch": [1]}
    assert any("validate.shapes" in line and "unknown model kind 'resnet'" in line for line in problems(d))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("\nlr: 0.001\n", "\nlr: 0.001\nlr: 0.01\n", 1),
     lambda t: f"line {t.splitlines().index('lr: 0.01') + 1}: duplicate key 'lr'"),
    (lambda t: t.replace("      seq_len: 100", "      seq_len: 100\n      seq_len: 50", 1),
     lambda t: "duplicate key 'seq_len'"),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, edit, message):
    # DVC refuses such a file; PyYAML alone would silently keep the last value
    path = tmp_path / "params.yaml"
    text = edit((ROOT / "params.yaml").read_text())
    assert text != (ROOT / "params.yaml").read_text()
    path.write_text(text)
    with pytest.raises(StageError) as err:
        params.load(path)
    assert message(text) in str(err.value) and len(str(err.value).splitlines()) == 1
