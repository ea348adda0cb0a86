"""params.yaml validation: every stage refuses bad params with a message naming the key, before writing."""
import subprocess
import sys

import pytest
import yaml

from fixtures import ROOT, tool_env, write_params
from ptpipe import params
from ptpipe.stage import StageError


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_are_valid():
    # (no committed value is asserted: a user's "change a param, commit" must not break the suite)
    p = params.load(ROOT / "params.yaml")
    assert p.cnn.recipe in p.cnn.recipes and p.lstm.lr > 0


def test_lstm_lr_is_required_since_train_lstm_does_not_read_the_top_level_lr():
    d = raw()
    d["lstm"]["lr"] = None
    with pytest.raises(StageError, match=r"lstm.lr: Input should be a valid number \(got None\)"):
        params.parse(d)


def stage_params_repo(tmp_path):
    """The project's params.yaml and the `params:` lists of its training stages, verbatim, on
    stand-in commands (each writes its output): what `dvc status` says is about those lists alone."""
    from fixtures import sh

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        name: {"cmd": f"python -c \"open('{name}.out', 'w').write('x')\"", "params": stages[name]["params"],
               "outs": [f"{name}.out"]} for name in ("train_cnn", "train_lstm")}}, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "repro", "-q", cwd=repo)
    return repo


def stale(repo) -> set[str]:
    from fixtures import sh

    out = sh("dvc", "status", "--json", cwd=repo).stdout
    return set(__import__("json").loads(out))


@pytest.mark.slow
def test_training_stages_depend_on_the_values_they_use_only(tmp_path):
    """Real dvc: editing a recipe that is not selected, or the top-level lr the LSTM does not
    read, reruns nothing; editing what a stage reads makes it stale."""
    from fixtures import write_params

    repo = stage_params_repo(tmp_path)
    assert stale(repo) == set()
    selected = yaml.safe_load((repo / "params.yaml").read_text())["cnn"]["recipe"]
    unused = next(name for name in raw()["cnn"]["recipes"] if name != selected)
    write_params(repo, **{f"cnn.recipes.{unused}.epochs": 99})
    assert stale(repo) == set()  # an unused recipe: neither stage reruns
    write_params(repo, **{f"cnn.recipes.{selected}.epochs": 99})
    assert stale(repo) == {"train_cnn"}
    write_params(repo, **{f"cnn.recipes.{selected}.epochs": raw()["cnn"]["recipes"][selected]["epochs"]})
    assert stale(repo) == set()
    write_params(repo, lr=0.01)  # the top-level lr: the CNN's (recipes with lr null), not the LSTM's
    assert stale(repo) == {"train_cnn"}
    write_params(repo, lr=raw()["lr"], **{"lstm.lr": 0.005})
    assert stale(repo) == {"train_lstm"}
    write_params(repo, **{"lstm.lr": raw()["lstm"]["lr"], "cnn.recipe": unused})  # another recipe selected
    assert stale(repo) == {"train_cnn"}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(lrr=0.1), "lrr: unknown key"),
    (lambda d: d.update(lr=-0.1), "lr: Input should be greater than 0"),
    (lambda d: d.update(lr="fast"), "lr: Input should be a valid number"),
    (lambda d: d["download"]["cifar10"].update(md5="XYZ"), "download.cifar10.md5: Value error, must be 32"),
    (lambda d: d["download"]["alice"].update(url="ftp://x"), "download.alice.url: Value error, must start with"),
    (lambda d: d["download"].update(retries="3"), "download.retries: Input should be a valid integer"),
    (lambda d: d["prepare"]["alice"].update(val_fraction=0.9), "prepare.alice.val_fraction: Input should be less"),
    (lambda d: d["prepare"]["cifar10"].update(val_size=0), "prepare.cifar10.val_size: Input should be greater than or equal to 1"),
    (lambda d: d["train"].update(device="tpu"), "train.device: Input should be 'auto'"),
    (lambda d: d.pop("train"), "train: missing"),
])
def test_bad_params_name_the_key(mutate, message):
    d = raw()
    mutate(d)
    with pytest.raises(StageError) as err:
        params.parse(d)
    assert message in str(err.value)


@pytest.mark.parametrize("stage", [["ptpipe.download", "alice"], ["ptpipe.prepare", "cifar10"]])
def test_stage_refuses_bad_params_before_writing(in_tmp, stage):
    write_params(in_tmp, lr=-1)
    result = subprocess.run([sys.executable, "-m", *stage], cwd=in_tmp, env=tool_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "params.yaml: lr: Input should be greater than 0 (got -1)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["params.yaml"]
