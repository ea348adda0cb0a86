"""benchmarks/gpu/run.sh --dry-run: the GPU machine's script end to end on the CPU (synthetic
archive -> download stage via file:// -> prepare -> train@cnn + evaluate@cnn, 1 seed, 1 epoch),
so the one device call it is written for does not fail on a typo. The real run needs the carried
.carry/ (JPEG archive, serve.py, wheels), which CI does not have."""
import json
import os
import subprocess
from pathlib import Path

from fixtures import ROOT, tool_env


def test_the_gpu_script_dry_run_writes_its_json_and_log(tmp_path):
    env = {**tool_env(), "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": os.sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out/cnn_gpu_recipe.json").read_text())
    assert summary["dry_run"] is True and summary["recipe"] == "airbench94" and len(summary["runs"]) == 1
    row = summary["runs"][0]
    assert 0 <= row["test_acc"] <= 1 and row["train_seconds"] > 0 and row["tta_seconds"] > 0
    assert row["compiled"] is False and row["recompiles"] == 0 and row["device"] == "cpu"  # auto: no compile on CPU
    assert {"torch", "cuda", "gpu", "test_acc_mean", "test_acc_sd", "train_seconds_median"} <= set(summary)
    assert "airbench94 x1: test acc" in (tmp_path / "out/log.txt").read_text()
    assert not (ROOT / "models/cnn/checkpoint.pt").exists()  # the repository's outputs were not touched


def test_the_gpu_script_fails_loudly_without_its_carried_files(tmp_path):
    env = {**tool_env(), "OUT": str(tmp_path / "out"), "CARRY": str(tmp_path / "missing"),
           "PYTHON": os.sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "serve.py" in (tmp_path / "out/log.txt").read_text()  # the missing file is named in the log
    assert not (tmp_path / "out/cnn_gpu_recipe.json").exists()
