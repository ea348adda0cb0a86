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

    from fixtures import train_command, write_params, write_prepared_text
    from test_lstm import PHRASE, lstm_params

    write_prepared_text(tmp_path, PHRASE * 40)
    lstm_params(tmp_path, epochs=3)
    write_params(tmp_path, **{"train.nproc": 2})
    run = subprocess.run(train_command(tmp_path, "lstm"), cwd=tmp_path, env=tool_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("best epoch") == 1  # rank 0 alone reports
    saved = torch.load(tmp_path / "models/lstm/model.pt", weights_only=True)
    assert saved["config"]["model_args"]["hidden_size"] == 32
    assert sorted(p.name for p in (tmp_path / "models/lstm").iterdir()) == ["model.pt"]
    assert len(json.loads((tmp_path / "dvclive/lstm/metrics.json").read_text())) > 0


@pytest.mark.slow
def test_cnn_stage_under_train_nproc_2_learns_and_only_rank_0_writes(tmp_path, tiny_params):
    from fixtures import train_command, write_params, write_prepared_cifar
    from test_cnn import small

    write_prepared_cifar(tmp_path)
    small(tmp_path, lr=0.01)
    write_params(tmp_path, **{"train.nproc": 2, "train.device": "cpu"})
    run = subprocess.run(train_command(tmp_path, "cnn"), cwd=tmp_path, env=tool_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("val/acc=") == 3  # one line per epoch, from rank 0 alone
    metrics = json.loads((tmp_path / "metrics/cnn/train.json").read_text())
    assert metrics["val_acc"] > 0.6  # the class patches are learnt with half-batches on two ranks
    assert sorted(p.name for p in (tmp_path / "models/cnn").iterdir()) == ["model.pt"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d_and_only_rank_0_writes(tmp_path):
    """README's multi-node command, two "nodes" on loopback: `torchrun --nnodes 2 --nproc-per-node 1
    --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT` started twice, each in its own directory."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in ("node_a", "node_b"):
        (tmp_path / node).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ptpipe-test",
               "--local-addr", "127.0.0.1", str(SCRIPT), "out"]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path / node, env=tool_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in nodes]
    for proc, output in zip(nodes, outputs):
        assert proc.returncode == 0, output
    ranks = [results(output) for output in outputs]  # each node's own stdout: its one rank
    assert sorted(r for found in ranks for r in found) == [0, 1]  # both ranks trained to the end
    (rank_a, (sum_a, _)), = ranks[0].items()
    (rank_b, (sum_b, _)), = ranks[1].items()
    assert sum_a == sum_b  # DDP kept the two nodes' replicas identical: they trained together
    main_node, other_node = ("node_a", "node_b") if rank_a == 0 else ("node_b", "node_a")
    assert sorted(p.name for p in (tmp_path / main_node / "out").iterdir()) == ["model.pt"]
    assert not (tmp_path / other_node / "out").exists()  # rank 1 wrote nothing


@pytest.mark.slow
def test_cnn_under_ddp_compiles_the_wrapped_module_through_the_wrapper(tmp_path, tiny_params):
    """DDP first, then compile the module it wraps, warmed up through the wrapper: dynamo compiles
    inside DDP's forward, so DDPOptimizer splits the graph at the gradient buckets."""
    from fixtures import write_prepared_cifar
    from test_cnn import small

    write_prepared_cifar(tmp_path, n_train=150, n_val=40, n_test=40)
    small(tmp_path, compile="always", autocast="bfloat16", epochs=2)
    env = {**tool_env(), "TORCH_LOGS": "+torch._dynamo.backends.distributed"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).with_name("ddp_compile_cnn.py"))]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DDPOptimizer used bucket cap" in run.stdout + run.stderr
    metrics = json.loads((tmp_path / "metrics/cnn/train.json").read_text())
    assert metrics["compiled"] is True and metrics["recompiles"] == 0 and metrics["graphs"] >= 2
