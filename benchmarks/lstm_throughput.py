"""Char-LSTM training speed: the project's training loop vs a plain loop, and time to 2.0 bits/char.

    python benchmarks/lstm_throughput.py --prepared data/prepared/alice --out benchmarks/results/lstm_throughput.json

1. Throughput (training characters per second, validation excluded) of the same model and
   batches (the issue's anchor recipe: 2 x 256 LSTM, batch 32, window 100, Adam 2e-3, dropout 0.2)
   through a plain TBPTT loop and through `ptpipe.train.fit` (the kind's `lstm.training`, as train@lstm
   runs it), alternated `--rounds` times in one run so both see the same machine load; plus the default
   params' model (models.lstm's recipe) through the loop.
2. Time to target: the default params.yaml run (as train@lstm does it), wall time from the start
   of training until validation first reaches `--target` bits/char, and the best it reaches.
Prints a table and writes JSON. The load average is recorded: the 2 cores may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe import data, params, train
from ptpipe.kinds import lstm
from ptpipe.kinds.lstm import batchify, build_model, windows

ANCHOR = dict(embedding_size=256, hidden_size=256, num_layers=2, dropout=0.2, tie_weights=False)


def plain_epoch(train_ids: torch.Tensor, vocab_size: int, seed: int) -> float:
    """The anchor recipe as a plain loop, one epoch: chars/s."""
    torch.manual_seed(seed)
    model = build_model(vocab_size, **ANCHOR)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rows = batchify(train_ids, 32)
    h, c = model.init_state(32)
    n, t0 = 0, time.perf_counter()
    for x, y in windows(rows, 100):
        logits, h, c = model(x, h, c)
        h, c = h.detach(), c.detach()
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += y.numel()
    return n / (time.perf_counter() - t0)


def loop_epoch(prepared: Path, recipe: lstm.Recipe, tmp: Path) -> float:
    """One epoch of `recipe` through train.fit (checkpoint + clip + guard included): chars/s of the steps."""
    t = lstm.training(recipe.model_copy(update={"epochs": 1}), prepared, torch.device("cpu"), train.Distributed(),
                      key="recipes.lstm.bench", default_lr=recipe.lr)
    result = train.fit(t, tmp / "model.pt", None, torch.device("cpu"), train.Distributed(), progress=False)
    return result.history[0]["train/char_per_s"]


def first_chars(prepared: Path, chars: int | None, tmp: Path) -> Path:
    """`prepared` with its training text cut to the first `chars` characters (a copy in tmp), or itself."""
    if chars is None:
        return prepared
    import shutil

    import numpy as np

    cut = tmp / "prepared"
    shutil.copytree(prepared, cut)
    np.save(cut / "train_ids.npy", np.load(prepared / "train_ids.npy")[:chars])
    return cut


def time_to_target(params_file: str, prepared: str, target: float, tmp: Path) -> dict:
    p = params.load(params_file)
    device = torch.device("cpu")
    t = lstm.training(p.recipe("lstm"), Path(prepared), device, train.Distributed(),
                      key=f"recipes.lstm.{p.models['lstm'].recipe}", default_lr=p.lr)
    curve, t0 = [], time.perf_counter()
    validate = t.evaluate

    def timed_validate(m):  # stamp each epoch's validation with the wall time since training began
        metrics = validate(m)
        curve.append({"seconds": time.perf_counter() - t0, "bits_per_char": metrics["val/bits_per_char"]})
        print(f"  epoch {len(curve)}: {curve[-1]['seconds']:.0f} s, val {metrics['val/bits_per_char']:.3f} bits/char")
        return metrics

    t0 = time.perf_counter()
    train.fit(t._replace(evaluate=timed_validate), tmp / "model.pt", None, device, train.Distributed(), progress=False)
    reached = next((row for row in curve if row["bits_per_char"] <= target), None)
    best = min(curve, key=lambda r: r["bits_per_char"])
    return {"target_bits_per_char": target, "seconds_to_target": reached and reached["seconds"],
            "best_bits_per_char": best["bits_per_char"], "best_at_seconds": best["seconds"],
            "epochs_run": len(curve), "total_seconds": curve[-1]["seconds"], "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="data/prepared/alice", help="prepared Alice text (prepare's layout)")
    ap.add_argument("--params", default="params.yaml", help="params file whose models.lstm is the default run")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of plain loop / train.fit (one epoch each)")
    ap.add_argument("--chars", type=int, default=None,
                    help="train on the first N characters in the throughput part (default: the whole split)")
    ap.add_argument("--target", type=float, default=2.0, help="validation bits/char to reach")
    ap.add_argument("--skip-target", action="store_true", help="only the throughput part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/lstm_throughput.json", help="JSON results")
    args = ap.parse_args()

    train_ids, val_ids, vocab = data.load_text(args.prepared)
    bench_ids = train_ids[: args.chars]
    p = params.load(args.params)
    default = p.recipe("lstm")
    # the anchor recipe in the default recipe's schema: no schedule, clip 1, Adam (beta1 = momentum 0.9)
    anchor = default.model_copy(update={**ANCHOR, "batch_size": 32, "seq_len": 100, "lr": 2e-3, "optimizer": "adam",
                                        "momentum": 0.9, "weight_decay": 0.0, "clip": 1.0, "schedule": "constant",
                                        "patience": None, "seed": args.seed, "eval_streams": 8})
    load_before = os.getloadavg()
    rates = {"plain loop (anchor recipe)": [], "ptpipe loop (anchor recipe)": [], "ptpipe loop (default params)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_dir = first_chars(Path(args.prepared), args.chars, tmp)
        for r in range(args.rounds):
            rates["plain loop (anchor recipe)"].append(plain_epoch(bench_ids, len(vocab), args.seed))
            rates["ptpipe loop (anchor recipe)"].append(loop_epoch(bench_dir, anchor, tmp))
            rates["ptpipe loop (default params)"].append(loop_epoch(bench_dir, default, tmp))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
        target = None if args.skip_target else time_to_target(args.params, args.prepared, args.target, tmp)

    plain = statistics.median(rates["plain loop (anchor recipe)"])
    print("\n| path | median chars/s | ratio to plain loop | runs |\n|---|---|---|---|")
    for name, values in rates.items():
        m = statistics.median(values)
        print(f"| {name} | {m:,.0f} | {m / plain:.2f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    if target:
        print(f"\ndefault params: {target['seconds_to_target'] and round(target['seconds_to_target'])} s to "
              f"{args.target} bits/char; best {target['best_bits_per_char']:.3f} at {target['best_at_seconds']:.0f} s; "
              f"{target['epochs_run']} epochs in {target['total_seconds']:.0f} s")
    result = {
        "command": "python benchmarks/lstm_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not False and v is not None),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seed": args.seed, "chars_per_s": rates, "time_to_target": target,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
