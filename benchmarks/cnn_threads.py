"""CPU threads for the CNN recipes: time one training step at 1 vs 2 torch threads, side by side.

    python benchmarks/cnn_threads.py --out benchmarks/results/cnn_threads.json

Random data (the speed of these ops does not depend on the values), channels_last as train_cnn.
Workloads: LeNet at batch 32 with SGD (the tutorial recipe) and the default recipe's airbench net
(widths 16/64/128) at batch 256 with fused AdamW. Alternates 1 and 2 threads `--rounds` times, so a
change of machine load hits both; prints ms/step per round and writes JSON with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe.kinds.cnn import Airbench, LeNet


def ms_per_step(make_model, make_opt, batch: int, threads: int, steps: int) -> float:
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


WORKLOADS = {
    "lenet_b32_sgd": (LeNet, lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True), 32, 300),
    "airbench_16_64_128_b256_adamw": (lambda: Airbench([16, 64, 128], scale=0.5),
                                      lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 256, 8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cnn_threads.json")
    args = ap.parse_args()
    results = {"loadavg_before": os.getloadavg(), "cores": os.cpu_count(), "torch": torch.__version__}
    for name, (make_model, make_opt, batch, steps) in WORKLOADS.items():
        rows = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads in (1, 2):
                rows[threads].append(ms_per_step(make_model, make_opt, batch, threads, steps))
        results[name] = {f"{t}_threads_ms_per_step": v for t, v in rows.items()}
        print(f"{name:32} 1 thread: {' '.join(f'{v:8.1f}' for v in rows[1])} ms/step   "
              f"2 threads: {' '.join(f'{v:8.1f}' for v in rows[2])} ms/step")
    results["loadavg_after"] = os.getloadavg()
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
