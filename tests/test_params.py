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
    p = params.load(ROOT / "params.yaml")
    assert p.lr == 0.001


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


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["cnn"]["recipes"]["default"].update(lr=50), "cnn.recipes.default.lr: Input should be less than or equal to 10"),
    (lambda d: d["lstm"].update(weight_decay=5), "lstm.weight_decay: Input should be less than 1"),
])
def test_lr_and_weight_decay_have_upper_bounds_everywhere(mutate, message):
    d = raw()
    mutate(d)
    with pytest.raises(StageError, match=message):
        params.parse(d)


def test_an_unknown_recipe_is_one_line_naming_the_recipes():
    d = raw()
    d["cnn"]["recipe"] = "nope"
    with pytest.raises(StageError) as err:
        params.parse(d)
    assert str(err.value).splitlines()[1:] == [
        "  params.yaml: cnn: recipe 'nope' is not one of cnn.recipes (airbench94, default, tutorial)"]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("lr: 0.001\n", "lr: 0.001\nlr: 0.01\n", 1), "line 4: duplicate key 'lr'"),
    (lambda t: t.replace("  seq_len: 100", "  seq_len: 100\n  seq_len: 50", 1), "duplicate key 'seq_len'"),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, edit, message):
    # DVC refuses such a file; PyYAML alone would silently keep the last value
    path = tmp_path / "params.yaml"
    path.write_text(edit((ROOT / "params.yaml").read_text()))
    with pytest.raises(StageError) as err:
        params.load(path)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
