"""Training throughput of this revision's loop vs an older revision's, side by side on the same data.

    git worktree add /tmp/before 61d1050      # the revision before the one training loop (issue 22)
    python benchmarks/loop_before_after.py --before /tmp/before --prepared data/prepared [--rounds 2]

For each model (the default CNN recipe, the LSTM, the gpt) it trains `--epochs` epochs with each revision's
own entry point, in a fresh process (threads 0, the default), alternating the revisions round after round so
that a drifting machine shares out evenly, and reads the per-epoch throughput from each run's history
(train/img_per_s, train/char_per_s). Prints a table (medians over rounds, new / before) and writes
benchmarks/results/loop_before_after.json with the load average and CPU steal of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each revision's way to train one model for N epochs on prepared data, printing its history as JSON.
BEFORE = {  # 61d1050: trainer.fit behind train_cnn / train_lstm / train_gpt, sections cnn / lstm / gpt
    "cnn": ("train_cnn", "cifar10", lambda p, n: p["cnn"]["recipes"]["default"].update(epochs=n, tta=0)),
    "lstm": ("train_lstm", "alice", lambda p, n: p["lstm"].update(epochs=n, patience=None)),
    "gpt": ("train_gpt", "alice", lambda p, n: p["gpt"].update(epochs=n)),
}
AFTER = {  # this revision: train.train(<model>) with recipes.<kind>.default
    "cnn": ("cifar10", lambda p, n: p["recipes"]["cnn"]["default"].update(epochs=n, tta=0)),
    "lstm": ("alice", lambda p, n: p["recipes"]["lstm"]["default"].update(epochs=n, patience=None)),
    "gpt": ("alice", lambda p, n: p["recipes"]["gpt"]["default"].update(epochs=n)),
}
RUN_BEFORE = """import json, sys
from ptpipe import {module}
res = {module}.main(sys.argv[1], sys.argv[2], sys.argv[3], None, *([None] if "{module}" != "train_lstm" else []),
                   progress=False)
print("HISTORY" + json.dumps(res.history))"""
RUN_AFTER = """import json, sys
from ptpipe import train
res = train.train(sys.argv[4], sys.argv[2], sys.argv[3], None, None, sys.argv[1], progress=False)
print("HISTORY" + json.dumps(res.history))"""


def steal_and_busy() -> tuple[int, int]:
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return fields[7], sum(fields)


def one_run(rev: str, src: Path, model: str, epochs: int, prepared: Path, tmp: Path) -> dict:
    import yaml

    params = yaml.safe_load((src.parent / "params.yaml").read_text())
    if rev == "before":
        module, data, edit = BEFORE[model]
        code = RUN_BEFORE.format(module=module)
    else:
        data, edit = AFTER[model]
        code = RUN_AFTER
    edit(params, epochs)
    params_file = tmp / f"params_{rev}_{model}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    steal0, total0 = steal_and_busy()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(params_file), str(prepared / data),
                          str(tmp / f"{rev}_{model}.pt"), model], env={**os.environ, "PYTHONPATH": str(src)},
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    steal1, total1 = steal_and_busy()
    history = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("HISTORY")))
    rate = next(k for k in history[0] if k.endswith("_per_s"))
    return {"rev": rev, "model": model, "rate_key": rate, "per_epoch": [row[rate] for row in history],
            "wall_s": round(wall, 1), "load_at_start": load,
            "steal_pct": round(100 * (steal1 - steal0) / max(1, total1 - total0), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout of the older revision (its src/ and params.yaml)")
    ap.add_argument("--prepared", default="data/prepared", help="prepared cifar10/ and alice/ (default %(default)s)")
    ap.add_argument("--models", nargs="+", default=["cnn", "lstm", "gpt"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/loop_before_after.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for model in args.models:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for rev in order:
                    src = Path(args.before) / "src" if rev == "before" else ROOT / "src"
                    runs.append(one_run(rev, src, model, args.epochs, Path(args.prepared), Path(tmp)))
                    print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'model':6} {'unit':16} {'before':>12} {'after':>12} {'after/before':>13}")
    table = {}
    for model in args.models:
        med = {rev: statistics.median(statistics.mean(x["per_epoch"]) for x in runs
                                      if x["model"] == model and x["rev"] == rev) for rev in ("before", "after")}
        unit = next(x["rate_key"] for x in runs if x["model"] == model)
        table[model] = {**med, "ratio": med["after"] / med["before"], "unit": unit}
        print(f"{model:6} {unit:16} {med['before']:12,.0f} {med['after']:12,.0f} {med['after'] / med['before']:13.3f}")
    Path(args.out).write_text(json.dumps({"table": table, "runs": runs, "epochs": args.epochs,
                                          "rounds": args.rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
