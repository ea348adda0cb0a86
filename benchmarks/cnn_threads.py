"""CPU threads: the real default CNN recipe and the default LSTM at `threads: 0` vs `1`, side by side.

    python benchmarks/cnn_threads.py --epochs 2 --rounds 1      # writes benchmarks/results/cnn_threads.json
    python benchmarks/cnn_threads.py --micro                    # the older per-step microbenchmark

Runs each model's stages exactly as dvc.yaml's `cmd` does (`train@cnn`, `train@lstm`, then
`evaluate@cnn`, `evaluate@lstm` on the model it wrote), in a scratch directory holding params.yaml
with only the model's recipe's `epochs` (and the LSTM's `patience: null`) and `threads` changed, and links to
`--prepared-cifar` / `--prepared-alice`. The settings alternate (0, 1, 0, 1, ... for `--rounds`) so
a change of machine load hits both. From the time stamps of the per-epoch lines it extrapolates the
full run: start-up + first epoch + (full epochs - 1) x the later epochs' mean + evaluate, printed
beside the targets (CNN train + evaluate <= 15 min, LSTM <= 2.0 bits/char within 10 min: epoch 16 of
30 in the measured default run). Prints a table; the JSON also holds the load average before and
after and torch's default thread count (0 = that many).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # params.yaml's models: the target of the default full run
    "cnn": {"target": "train + evaluate <= 900 s"},
    "lstm": {"target": "<= 2.0 bits/char (epoch 16 of 30) <= 600 s"},
}
EPOCH_LINE = re.compile(r"\bepoch=(\d+)\s*$")


def stage_cmd(stage: str, model: str, params: dict) -> str:
    """dvc.yaml's `cmd` of <stage>@<model> (its foreach over params.yaml's models, interpolated)."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]["cmd"]
    item = params["models"][model]
    for name, value in {"key": model, "item.data": item["data"], "item.kind": item["kind"],
                        "item.recipe": item["recipe"]}.items():
        cmd = cmd.replace("${" + name + "}", value)
    return cmd


def timed_run(cmd: str, cwd: Path, env: dict) -> tuple[float, list[float], str]:
    """(wall seconds, seconds since start at which each epoch line appeared, output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stamps, tail = [], []
    for line in proc.stdout:
        if EPOCH_LINE.search(line):
            stamps.append(time.perf_counter() - t0)
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise SystemExit(f"`{cmd}` failed ({proc.returncode}):\n{''.join(tail)}")
    return time.perf_counter() - t0, stamps, "".join(tail)


def measure(model: str, threads: int, epochs: int, prepared: dict[str, Path], params: dict) -> dict:
    spec, m = MODELS[model], params["models"][model]
    section_path = ("recipes", m["kind"], m["recipe"])  # the model's recipe
    full_epochs = _section(params, section_path)["epochs"]
    with tempfile.TemporaryDirectory(prefix=f"threads-{model}-") as tmp:
        work = Path(tmp)
        p = json.loads(json.dumps(params))  # a deep copy
        section = _section(p, section_path)
        section.update(epochs=epochs, threads=threads)
        if model == "lstm":
            section["patience"] = None
        (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        (work / "data/prepared").mkdir(parents=True)
        for name, path in prepared.items():
            (work / "data/prepared" / name).symlink_to(path.resolve())
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        train_s, stamps, _ = timed_run(stage_cmd("train", model, p), work, env)
        eval_s, _, _ = timed_run(stage_cmd("evaluate", model, p), work, env)
    later = [b - a for a, b in zip(stamps, stamps[1:])]
    epoch_s = statistics.mean(later) if later else stamps[0]
    first_s = stamps[0]  # start-up (imports, data, model) + epoch 1
    full_train_s = first_s + (full_epochs - 1) * epoch_s + (train_s - stamps[-1])  # + writing the model
    row = {"model": model, "threads": threads, "epochs_run": epochs, "full_epochs": full_epochs,
           "wall_train_s": round(train_s, 1), "first_epoch_incl_startup_s": round(first_s, 1),
           "epoch_s": round(epoch_s, 2), "evaluate_s": round(eval_s, 1),
           "full_train_s": round(full_train_s, 1), "full_total_s": round(full_train_s + eval_s, 1),
           "target": spec["target"]}
    if model == "lstm":  # the measured default run reaches 2.0 bits/char at epoch 16
        row["to_target_s"] = round(first_s + 15 * epoch_s, 1)
    return row


def _section(params: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        params = params[key]
    return params


def stages(args) -> dict:
    import torch

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    prepared = {"cifar10": Path(args.prepared_cifar), "alice": Path(args.prepared_alice)}
    results = {"loadavg_before": os.getloadavg(), "cpu_count": os.cpu_count(),
               "torch_default_threads": torch.get_num_threads(), "torch": torch.__version__, "runs": []}
    for model in args.models:
        for _ in range(args.rounds):
            for threads in (0, 1):
                row = measure(model, threads, args.epochs, prepared, params)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    results["loadavg_after"] = os.getloadavg()
    header = f"{'model':5} {'threads':>7} {'epoch s':>8} {'1st+startup s':>13} {'evaluate s':>10} " \
             f"{'full train s':>12} {'full total s':>12} {'to 2.0 b/c s':>12}  target"
    print(header)
    for r in results["runs"]:
        print(f"{r['model']:5} {r['threads']:>7} {r['epoch_s']:>8} {r['first_epoch_incl_startup_s']:>13} "
              f"{r['evaluate_s']:>10} {r['full_train_s']:>12} {r['full_total_s']:>12} "
              f"{r.get('to_target_s', '-'):>12}  {r['target']}")
    print(f"threads 0 = torch's default here: {results['torch_default_threads']}; load average before "
          f"{results['loadavg_before']}, after {results['loadavg_after']}")
    return results


# -- the per-step microbenchmark (1 vs 2 threads, random data) ------------------------------------

def ms_per_step(make_model, make_opt, batch: int, threads: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(4 * batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4 * batch,))
    model = make_model().to(memory_format=torch.channels_last)
    opt = make_opt(model.parameters())
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            t0 = time.perf_counter()
        j = (i % 4) * batch
        loss = F.cross_entropy(model(x[j: j + batch]), y[j: j + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def micro(args) -> dict:
    import torch

    from ptpipe.kinds.cnn import Airbench, LeNet

    workloads = {
        "lenet_b32_sgd": (LeNet, lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True), 32, 300),
        "airbench_16_64_128_b256_adamw": (lambda: Airbench([16, 64, 128], scale=0.5),
                                          lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 256, 8),
    }
    results = {"loadavg_before": os.getloadavg(), "cores": os.cpu_count(), "torch": torch.__version__}
    for name, (make_model, make_opt, batch, steps) in workloads.items():
        rows = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads in (1, 2):
                rows[threads].append(ms_per_step(make_model, make_opt, batch, threads, steps))
        results[name] = {f"{t}_threads_ms_per_step": v for t, v in rows.items()}
        print(f"{name:32} 1 thread: {' '.join(f'{v:8.1f}' for v in rows[1])} ms/step   "
              f"2 threads: {' '.join(f'{v:8.1f}' for v in rows[2])} ms/step")
    results["loadavg_after"] = os.getloadavg()
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", action="store_true", help="the per-step 1 vs 2 threads microbenchmark instead")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "lstm"])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2: the later ones time an epoch)")
    ap.add_argument("--rounds", type=int, default=1, help="times each setting runs, alternating")
    ap.add_argument("--prepared-cifar", default="data/prepared/cifar10")
    ap.add_argument("--prepared-alice", default="data/prepared/alice")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/cnn_threads[_micro].json)")
    args = ap.parse_args()
    results = micro(args) if args.micro else stages(args)
    out = Path(args.out or f"benchmarks/results/cnn_threads{'_micro' if args.micro else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
