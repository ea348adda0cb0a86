"""The tests' project copies are the same in a used workspace (after `dvc repro`, `dvc exp run`) as in a
fresh clone: dvc.lock, outputs, metrics and DVCLive's records never travel into them."""
import subprocess

import yaml

from fixtures import KEPT_IN_RESULTS, PIPELINE_RESULTS, ROOT, copy_project, expanded_stages, project_files, sh

# What a used workspace holds beside the source: some committed (dvc.lock, the cache: false metrics,
# as the README says to), some untracked (DVCLive's params.yaml, a failed flow's incident).
PLANTED = {
    "dvc.lock": ("schema: '2.0'\nstages:\n  train@cnn:\n    cmd: python -m ptpipe.train cnn\n", True),
    "metrics/cnn/evaluate.json": ('{"test": {"acc": 0.84}}\n', True),
    "metrics/cnn/train.json": ('{"train_seconds": 500}\n', True),
    "dvclive/cnn/metrics.json": ('{"val": {"acc": 0.82}}\n', True),
    "reports/lstm/evaluate/samples.txt": ("Alice\n", True),
    "dvclive/cnn/params.yaml": ("lr: 0.01\n", False),
    "reports/cnn/evaluate/confusion.json": ("[]\n", False),
    "reports/gpt/validate.json": ("{}\n", False),
    "models/cnn/model.pt": ("not a model\n", False),
    "models/my-pets/model.onnx": ("a user's model\n", False),
    "data/raw/cifar10/cifar-10-python.tar.gz": ("not an archive\n", False),
    "data/prepared/alice/stats.json": ("{}\n", False),
    "incidents/2026-01-01T00-00-00-retrain-x.json": ("{}\n", False),
}


def test_every_output_dvc_yaml_declares_is_left_out_of_the_test_projects():
    declared = []
    for stage, _, _ in expanded_stages().values():  # every data set's and every model's
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                declared.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots", []):  # top-level plots
        if not isinstance(entry, dict):
            declared.append(entry)
            continue
        (name, spec), = entry.items()  # a path, or a plot's id whose y (and x) name the files
        files = [f for axis in ("x", "y") if isinstance((spec or {}).get(axis), dict) for f in spec[axis]]
        declared += files or [name]
    assert declared and not any("${" in path for path in declared)
    for path in declared:
        assert any(path.startswith(r) for r in PIPELINE_RESULTS), f"{path}: add its folder to PIPELINE_RESULTS"


def test_a_used_workspace_copies_like_a_fresh_clone(tmp_path):
    fresh = copy_project(tmp_path / "fresh")
    used = copy_project(tmp_path / "used")
    for rel, (text, commit) in PLANTED.items():
        (used / rel).parent.mkdir(parents=True, exist_ok=True)
        (used / rel).write_text(text)
        if commit:
            sh("git", "add", "-f", rel, cwd=used)
    sh("git", "commit", "-qm", "a pipeline run", cwd=used)

    copy = copy_project(tmp_path / "copy", source=used)
    assert project_files(copy) == project_files(fresh)
    for rel in PLANTED:
        assert not (copy / rel).exists(), rel
    for rel in ("dvc.yaml", "params.yaml", "src/ptpipe/train.py", *KEPT_IN_RESULTS):
        assert (copy / rel).is_file(), rel
    tracked = subprocess.run(["git", "ls-files"], cwd=copy, capture_output=True, text=True, check=True).stdout
    assert "dvc.lock" not in tracked.split()
