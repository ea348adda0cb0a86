"""1 vs N processes (torchrun + DistributedDataParallel) for both models, side by side in one run.

    python benchmarks/ddp_scaling.py --prepared data/prepared --nproc 2 --out benchmarks/results/ddp_scaling.json

Each row runs the real stage command (`python -m ptpipe.train cnn` / `lstm`, as dvc.yaml's train@) in a scratch
folder holding params.yaml with `train.nproc` set and the prepared data linked in, and reads the
training throughput the training loop logged (DVCLive, last epoch). CNN: the `tutorial` recipe (LeNet,
batch 32), 1 epoch; LSTM: the default params, 2 epochs. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # model: (its data set, the throughput key DVCLive logs, unit, the params edit)
    "cnn": ("cifar10", "train/img_per_s", "img/s",
            lambda p: (p["models"]["cnn"].update(recipe="tutorial"), p["recipes"]["cnn"]["tutorial"].update(epochs=1))),
    "lstm": ("alice", "train/char_per_s", "char/s",
             lambda p: p["recipes"]["lstm"]["default"].update(epochs=2, patience=None)),
}
EDIT = {}  # --smoke: recipe keys set on top (a seconds-long run that checks the script, not the scaling)


def run(model: str, nproc: int, prepared: Path) -> dict:
    dataset, key, unit, shrink = RUNS[model]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        shrink(params)
        m = params["models"][model]
        params["recipes"][m["kind"]][m["recipe"]].update(EDIT.get(model, {}))
        params["train"].update(nproc=nproc, device="cpu")
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp / "data" / "prepared").mkdir(parents=True)
        (tmp / "data" / "prepared" / dataset).symlink_to(prepared.resolve() / dataset)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ptpipe.train", model, "--data", f"data/prepared/{dataset}",
                        "--model", f"models/{model}/model.pt", "--live", f"dvclive/{model}",
                        "--metrics", f"metrics/{model}/train.json"], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        metrics = json.loads((tmp / "dvclive" / model / "metrics.json").read_text())
    section, name = key.split("/")
    return {"model": model, "nproc": nproc, "throughput": metrics[section][name], "unit": unit, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="folder with cifar10/ and alice/")
    ap.add_argument("--nproc", type=int, default=2, help="processes to compare with 1")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddp_scaling.json")
    ap.add_argument("--smoke", action="store_true", help="tiny models, seconds: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        EDIT.update(cnn={"threads": 1}, lstm={"epochs": 1, "hidden_size": 32, "embedding_size": 32, "threads": 1})
    rows = [run(model, n, args.prepared) for model in RUNS for n in (1, args.nproc)]
    print("\n| model | processes | throughput | vs 1 process | wall s |\n|---|---:|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["nproc"] == 1)
        row["speedup"] = row["throughput"] / base["throughput"]
        print(f"| {row['model']} | {row['nproc']} | {row['throughput']:,.0f} {row['unit']} | "
              f"{row['speedup']:.2f}x | {row['wall_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "cpus": os.cpu_count(),
                                    "machine": platform.processor() or platform.machine(),
                                    "load_average": os.getloadavg()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
