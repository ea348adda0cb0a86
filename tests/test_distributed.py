"""torchrun + DistributedDataParallel through the shared loop: 2 CPU processes (gloo) on loopback."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import tool_env

SCRIPT = Path(__file__).with_name("ddp_synthetic.py")


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, timeout=timeout)


def results(output):
    # numbers only: the ranks share one stdout, and one rank's line can run into the other's
    number = r"(-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"
    return {int(r): (float(c), float(v)) for r, c, v in
            re.findall(rf"rank (\d) checksum {number} val_loss {number}", output)}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = torchrun(2, tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    ranks = results(two.stdout)
    assert set(ranks) == {0, 1}
    assert ranks[0][0] == ranks[1][0]  # DDP kept the replicas identical, bit for bit
    # only rank 0 wrote outputs; the checkpoint is gone once the model file is in place
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model.pt"]

    one = torchrun(1, tmp_path / "one")
    assert one.returncode == 0, one.stdout + one.stderr
    (single_checksum, single_loss), = results(one.stdout).values()
    # each rank's half-batch is an interleaved half of the same global batch: same gradients up to rounding
    assert ranks[0][0] == pytest.approx(single_checksum, rel=1e-4)
    assert ranks[0][1] == pytest.approx(single_loss, rel=1e-3)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    t0 = time.monotonic()
    run = torchrun(2, tmp_path / "out", "--fail-rank", 1, timeout=240)
    assert run.returncode != 0
    assert "boom on rank 1" in run.stdout + run.stderr
    assert time.monotonic() - t0 < 200
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_lstm_stage_under_train_nproc_2(tmp_path):
    """`train.nproc: 2` makes the stage command launch torchrun itself; only rank 0 writes."""
    import torch

    from fixtures import write_prepared_text
    from test_lstm import PHRASE, write_params

    write_prepared_text(tmp_path, PHRASE * 40)
    params = write_params(tmp_path, epochs=3)
    text = params.read_text().replace("nproc: 1", "nproc: 2")
    assert "nproc: 2" in text
    params.write_text(text)
    run = subprocess.run([sys.executable, "-m", "ptpipe.train_lstm"], cwd=tmp_path, env=tool_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("best epoch") == 1  # rank 0 alone reports
    saved = torch.load(tmp_path / "models/lstm/model.pt", weights_only=True)
    assert saved["config"]["model_args"]["hidden_size"] == 32
    assert sorted(p.name for p in (tmp_path / "models/lstm").iterdir()) == ["model.pt"]
    assert len(json.loads((tmp_path / "dvclive/lstm/metrics.json").read_text())) > 0


@pytest.mark.slow
def test_cnn_stage_under_train_nproc_2_learns_and_only_rank_0_writes(in_tmp):
    from fixtures import write_params, write_prepared_cifar
    from test_cnn import small

    write_prepared_cifar(in_tmp)
    small(in_tmp, lr=0.01)
    write_params(in_tmp, **{"train.nproc": 2, "train.device": "cpu"})
    run = subprocess.run([sys.executable, "-m", "ptpipe.train_cnn"], cwd=in_tmp, env=tool_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("val/acc=") == 3  # one line per epoch, from rank 0 alone
    metrics = json.loads((in_tmp / "metrics/cnn_train.json").read_text())
    assert metrics["val_acc"] > 0.6  # the class patches are learnt with half-batches on two ranks
    assert sorted(p.name for p in (in_tmp / "models/cnn").iterdir()) == ["model.pt"]


@pytest.mark.slow
def test_cnn_under_ddp_compiles_the_wrapped_module_through_the_wrapper(in_tmp):
    """DDP first, then compile the module it wraps, warmed up through the wrapper: dynamo compiles
    inside DDP's forward, so DDPOptimizer splits the graph at the gradient buckets."""
    from fixtures import write_params, write_prepared_cifar
    from test_cnn import small

    write_prepared_cifar(in_tmp, n_train=150, n_val=40, n_test=40)
    small(in_tmp, compile="always", autocast="bfloat16", epochs=2)
    write_params(in_tmp, **{"train.device": "cpu"})
    env = {**tool_env(), "TORCH_LOGS": "+torch._dynamo.backends.distributed"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).with_name("ddp_compile_cnn.py"))]
    run = subprocess.run(cmd, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DDPOptimizer used bucket cap" in run.stdout + run.stderr
    metrics = json.loads((in_tmp / "metrics/cnn_train.json").read_text())
    assert metrics["compiled"] is True and metrics["recompiles"] == 0 and metrics["graphs"] >= 2
