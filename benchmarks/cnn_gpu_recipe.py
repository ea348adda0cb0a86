"""The `airbench94` recipe through the real `train_cnn` + `evaluate_cnn` stages, N seeds:
mean and spread of test accuracy and of training seconds (compile warm-up reported apart),
with the GPU model and torch version; writes JSON.

    python benchmarks/cnn_gpu_recipe.py --prepared data/prepared/cifar10 --runs 5   # on a GPU
    python benchmarks/cnn_gpu_recipe.py --tiny                                       # CPU smoke check

Each run happens in its own temporary folder with a copy of params.yaml (recipe airbench94, seed i),
so the repository's outputs are untouched. `--tiny` writes a 256-image synthetic prepared set and
shrinks the recipe to 2 epochs on the CPU: it checks the script, not the recipe's accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from ptpipe import evaluate_cnn, train_cnn

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_prepared(dest: Path) -> None:
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True)
    for split, n in (("train", 256), ("val", 64), ("test", 64)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
        x[np.arange(n), y % 3, :8, :8] = 200 + y[:, None, None]  # class-dependent colour patch
        np.save(dest / f"{split}_images.npy", x)
        np.save(dest / f"{split}_labels.npy", y)
    (dest / "card.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)],
                                                "mean": [0.15] * 3, "std": [0.2] * 3}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="data/prepared/cifar10", help="the prepare stage's output")
    ap.add_argument("--runs", type=int, default=5, help="seeds 0..runs-1 (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="train.device (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check on synthetic data, 2 epochs")
    ap.add_argument("--out", default="benchmarks/results/cnn_gpu_recipe.json", help="JSON results")
    args = ap.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cnn"]["recipe"] = "airbench94"
    params["train"]["device"] = "cpu" if args.tiny else args.device
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(args.prepared).resolve()
        if args.tiny:
            prepared = Path(tmp) / "prepared"
            write_tiny_prepared(prepared)
            params["cnn"]["recipes"]["airbench94"]["epochs"] = 2
            args.runs = min(args.runs, 2)
        for seed in range(args.runs):
            work = Path(tmp) / f"run{seed}"
            work.mkdir()
            params["cnn"]["recipes"]["airbench94"]["seed"] = seed
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            cwd = os.getcwd()
            os.chdir(work)
            try:
                train_cnn.main(prepared_dir=prepared, live_dir=None, progress=False)
                train = json.loads(Path("metrics/cnn_train.json").read_text())
                test = evaluate_cnn.main(prepared_dir=prepared)["test"]
            finally:
                os.chdir(cwd)
            runs.append({"seed": seed, "test_acc": test["acc"], "train_seconds": train["train_seconds"],
                         "compile_seconds": train["compile_seconds"]})
            print(f"seed {seed}: test acc {test['acc']:.4f}  train {train['train_seconds']:.2f} s  "
                  f"compile {train['compile_seconds']:.1f} s", flush=True)

    accs = [r["test_acc"] for r in runs]
    secs = [r["train_seconds"] for r in runs]
    summary = {
        "recipe": "airbench94", "runs": runs, "tiny": args.tiny,
        "test_acc_mean": statistics.mean(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "train_seconds_median": statistics.median(secs), "train_seconds_mean": statistics.mean(secs),
        "train_seconds_min": min(secs), "train_seconds_max": max(secs),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else None,
        "torch": torch.__version__, "data": str(args.prepared) if not args.tiny else "synthetic (--tiny)",
    }
    print(f"airbench94 x{len(runs)}: test acc {summary['test_acc_mean']:.4f} +- {summary['test_acc_std']:.4f}, "
          f"train seconds median {summary['train_seconds_median']:.2f} (min {min(secs):.2f}, max {max(secs):.2f}); "
          f"gpu {summary['gpu']}, torch {summary['torch']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
