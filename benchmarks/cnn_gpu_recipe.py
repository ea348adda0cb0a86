"""The `airbench94` recipe through the real download, prepare, train and evaluate stages (model cnn), N seeds:
test accuracy (mean, sd), training seconds (median, spread) and what ran (compiled or not, graphs,
recompiles, GPU, torch, CUDA); writes JSON. benchmarks/gpu/run.sh runs it on the GPU machine.

    python benchmarks/cnn_gpu_recipe.py --archive /tmp/mirror/cifar-10-python.tar.gz --runs 5 --out-dir OUT
    python benchmarks/cnn_gpu_recipe.py --prepared data/prepared/cifar10 --runs 5     # already prepared
    python benchmarks/cnn_gpu_recipe.py --dry-run --out-dir /tmp/gpu-dry              # CPU check, seconds

`--archive`: a cifar-10-python.tar.gz (the mirror's, from serve.py --build-only) goes through the
download stage as a file:// URL with its md5, then the prepare stage (45,000 train / 5,000 val),
in `--work`. Each run happens in its own folder with a copy of params.yaml (models.cnn.recipe airbench94,
seed i), so the repository's outputs are untouched. `--dry-run` does the same on a synthetic
archive of 240 images with the recipe shrunk to 1 epoch of a tiny net on the CPU, 1 seed: it
checks the script end to end, not the recipe.

Times per run: `train_seconds` is train@cnn's timed region (CUDA events around the whitening init
and the training steps, airbench's); `tta_seconds` the same kind of timing of the test-set forward
passes with TTA (airbench adds these to its total); warm-up (compile), set-up and the rest of the
loop (validation, checkpoints) are reported apart.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ptpipe import data, download, evaluate, prepare, train
from ptpipe.kinds.cnn import load_model, normalize, predict

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "airbench94"
# --dry-run: a net and a run small enough for a CI machine's CPU
DRY_RECIPE = {"model_args": {"widths": [8, 16, 16], "scale": 1 / 9, "zero_whiten_bias": True}, "epochs": 1,
              "batch_size": 32, "tta": 2, "threads": 1}


def write_tiny_archive(path: Path, per_batch: int = 40, n_test: int = 40) -> None:
    """A cifar-10-python.tar.gz in the official layout (5 training batches, test_batch, batches.meta):
    noise with a class-coloured patch, so the dry run's numbers are not all chance."""
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 80, (n, 3, 32, 32)).astype(np.uint8)
        x[np.arange(n), y % 3, :8, :8] = (120 + 13 * y)[:, None, None]
        return {b"labels": y.tolist(), b"data": x.reshape(n, 3072)}

    members = {f"cifar-10-batches-py/data_batch_{b}": batch(per_batch) for b in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(n_test)
    members["cifar-10-batches-py/batches.meta"] = {
        b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck")], b"num_cases_per_batch": per_batch}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def prepare_from_archive(archive: Path, work: Path, params: dict, val_size: int) -> Path:
    """The download stage (file:// URL + md5) and the prepare stage, in `work`: its data/prepared/cifar10."""
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    params = json.loads(json.dumps(params))
    params["datasets"]["cifar10"].update(url=archive.resolve().as_uri(), md5=md5, val_size=val_size)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    download.download("cifar10", work / "data/raw/cifar10", work / "params.yaml")
    prepare.prepare("cifar10", work / "data/raw/cifar10", work / "data/prepared/cifar10", work / "params.yaml")
    return work / "data/prepared/cifar10"


def tta_seconds(prepared: Path, model_path: Path, device: torch.device) -> float:
    """The test set's TTA forward passes as airbench times them (CUDA events; one warm-up call first)."""
    model, config = load_model(model_path)
    model = model.to(device, memory_format=torch.channels_last)
    images, _ = data.load_images(prepared, "test")
    x = normalize(images.to(device), config["data"]["mean"], config["data"]["std"]).contiguous(
        memory_format=torch.channels_last)
    watch = train.Stopwatch(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        predict(model, x[:2000], tta=config["params"]["tta"], batch_size=2000)  # cuDNN autotuning, outside the timing
        with watch.timing():
            predict(model, x, tta=config["params"]["tta"], batch_size=2000)
    return watch.seconds


def run_seed(seed: int, params: dict, prepared: Path, work: Path) -> dict:
    work.mkdir(parents=True)
    params["recipes"]["cnn"][RECIPE]["seed"] = seed
    params_file, model_path = work / "params.yaml", work / "models/cnn/model.pt"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    train.train("cnn", prepared, model_path, None, work / "metrics/cnn/train.json", params_file, progress=False)
    stage_seconds = time.perf_counter() - t0
    trained = json.loads((work / "metrics/cnn/train.json").read_text())
    test = evaluate.evaluate(prepared, model_path, work / "metrics/cnn/evaluate.json", work / "reports/cnn/evaluate",
                             params_file)["test"]
    tta = tta_seconds(prepared, model_path, train.resolve_device(params["train"]["device"]))
    keep = ("train_seconds", "warmup_seconds", "setup_seconds", "other_seconds", "compiled", "compile_error",
            "graphs", "graph_breaks", "recompiles", "autocast", "device")
    row = {"seed": seed, "test_acc": test["acc"], **{k: trained.get(k) for k in keep}, "tta_seconds": round(tta, 3),
           "train_stage_wall_seconds": round(stage_seconds, 3)}
    print(f"seed {seed}: test acc {row['test_acc']:.4f}  train {row['train_seconds']:.3f} s  tta {tta:.3f} s  "
          f"warm-up {row['warmup_seconds']:.1f} s  compiled {row['compiled']}  graphs {row['graphs']}  "
          f"recompiles {row['recompiles']}" + (f"  compile error: {row['compile_error']}" if row["compile_error"] else ""),
          flush=True)
    return row


def summarize(runs: list[dict], runtime: dict, extra: dict) -> dict:
    accs, secs = [r["test_acc"] for r in runs], [r["train_seconds"] for r in runs]
    totals = [r["train_seconds"] + r["tta_seconds"] for r in runs]
    return {
        "recipe": RECIPE, **extra, **runtime, "runs": runs,
        "test_acc_mean": statistics.mean(accs), "test_acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "train_seconds_median": statistics.median(secs), "train_seconds_min": min(secs),
        "train_seconds_max": max(secs), "train_plus_tta_seconds_median": statistics.median(totals),
        "compiled_all": all(r["compiled"] for r in runs), "recompiles_total": sum(r["recompiles"] or 0 for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--archive", type=Path, help="a cifar-10-python.tar.gz: download + prepare it first")
    src.add_argument("--prepared", type=Path, default=Path("data/prepared/cifar10"), help="an existing prepare output")
    src.add_argument("--dry-run", action="store_true", help="CPU, synthetic archive, tiny net, 1 epoch, 1 seed")
    ap.add_argument("--runs", type=int, default=5, help="seeds 0..runs-1 (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="train.device (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cnn-gpu-recipe"), help="scratch folder (emptied)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks/results", help="where cnn_gpu_recipe.json goes")
    args = ap.parse_args()

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["cnn"]["recipe"] = RECIPE
    params["train"]["device"] = args.device
    prepared, source = args.prepared.resolve(), str(args.prepared)
    if args.dry_run:
        params["train"]["device"] = "cpu"
        params["recipes"]["cnn"][RECIPE].update(DRY_RECIPE)
        args.runs = 1
        args.archive = args.work / "tiny-cifar-10-python.tar.gz"
        args.work.mkdir(parents=True)
        write_tiny_archive(args.archive)
    if args.archive is not None:
        prepared = prepare_from_archive(args.archive, args.work / "data", params, val_size=20 if args.dry_run else 5000)
        source = "synthetic (--dry-run)" if args.dry_run else f"{args.archive.name} md5 " + \
            hashlib.md5(args.archive.read_bytes()).hexdigest()

    runs = [run_seed(seed, params, prepared, args.work / f"run{seed}") for seed in range(args.runs)]
    runtime = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else None}
    summary = summarize(runs, runtime, {"dry_run": args.dry_run, "data": source,
                                        "params": params["recipes"]["cnn"][RECIPE]})
    print(f"{RECIPE} x{len(runs)}: test acc {summary['test_acc_mean']:.4f} +- {summary['test_acc_sd']:.4f}; "
          f"train seconds median {summary['train_seconds_median']:.3f} (min {summary['train_seconds_min']:.3f}, "
          f"max {summary['train_seconds_max']:.3f}); + TTA {summary['train_plus_tta_seconds_median']:.3f}; "
          f"compiled {summary['compiled_all']}, recompiles {summary['recompiles_total']}; "
          f"gpu {runtime['gpu']}, torch {runtime['torch']}, cuda {runtime['cuda']}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cnn_gpu_recipe.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
