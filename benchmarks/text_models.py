"""The two text models side by side on the prepared Alice text: the char-LSTM and the char-transformer (gpt).

    python benchmarks/text_models.py --prepared data/prepared/alice --minutes 10 \
        --out benchmarks/results/text_models.json

For each model, in one run (so both see the same machine): the params.yaml recipe trained from
scratch through the project's own `train.fit` (the kind's `training`, as train@<model> runs it), on the
CPU with `--threads` torch threads, in a temporary folder; then exported (`ptpipe.export`) and
used for generation through onnxruntime (`ptpipe.inference.TextGenerator`, the same path as
`ptpipe generate --backend onnx`). Reported per model: parameters, epochs run, training seconds
(fit's, validation excluded) and wall seconds (validation included), the best validation
bits/char and when it was reached, the wall time until validation first reached `--target`, and
onnxruntime generation speed (characters per second, batch 1, after a warm-up).

`--minutes` is a budget per model: a run still going when it is spent stops after the epoch
that crossed it (reported as `over_budget`, with the best so far; its last weights are
exported for the generation figure). Prints a table and writes JSON with the load average
before and after: the 2 cores may be shared, and figures taken under load say so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ptpipe import data, export, files, kinds, params, train  # noqa: E402
from ptpipe.inference import TextGenerator  # noqa: E402

MODELS = ("lstm", "gpt")  # params.yaml's models (each trains with its models.<name>.recipe)


class OverBudget(Exception):
    pass


def timed(t: train.Training, budget_s: float, epochs: list) -> train.Training:
    """`t` whose batches and validation record, after every epoch, the wall seconds since the start, the
    training seconds so far (epoch start to validation start) and the validation metrics into `epochs`,
    and that stops the run (OverBudget) once the budget is spent."""
    start, clock = time.perf_counter(), {"train_s": 0.0, "epoch_start": None}

    def batches(epoch: int):
        clock["epoch_start"] = time.perf_counter()
        return t.batches(epoch)

    def evaluate(model):
        clock["train_s"] += time.perf_counter() - clock["epoch_start"]
        metrics = t.evaluate(model)
        epochs.append({"wall_s": time.perf_counter() - start, "train_s": clock["train_s"], **metrics})
        if epochs[-1]["wall_s"] > budget_s:
            raise OverBudget
        return metrics

    return t._replace(batches=batches, evaluate=evaluate)


def generation_speed(onnx_path: Path, threads: int, chars: int) -> float:
    model = TextGenerator(onnx_path, threads)
    prompt = "Alice" if set("Alice") <= set(model.vocab) else "".join(model.vocab[-5:])  # another corpus: its own
    model.generate(prompt, 20, 0.8, 1)  # warm-up: session arenas, first shapes
    t0 = time.perf_counter()
    model.generate(prompt, chars, 0.8, 1)
    return chars / (time.perf_counter() - t0)


def run_model(name: str, params_file: Path, prepared: Path, budget_s: float, target: float, threads: int,
              gen_chars: int, tmp: Path) -> dict:
    """models.<name> of params_file trained as train@<name> does it (its kind's `training`, then train.fit)."""
    p = params.load(params_file)
    m = p.models[name]
    cpu, ddp = torch.device("cpu"), train.Distributed()
    t = kinds.get(m.kind).training(p.recipe(name), prepared, cpu, ddp, key=f"recipes.{m.kind}.{m.recipe}",
                                   default_lr=p.lr)
    t = t._replace(config={**t.config, "data": {**data.describe(prepared, m.data, "text"), **t.config["data"]}})
    history: list[dict] = []
    folder = tmp / name
    over = False
    try:
        train.fit(timed(t, budget_s, history), folder / "model.pt", None, cpu, ddp, progress=False)
    except OverBudget:
        over = True
        files.save_torch(folder / "model.pt", {"state_dict": train.unwrap(t.model).state_dict(), "config": t.config})
    best = min(range(len(history)), key=lambda i: history[i]["val/loss"])
    reached = next((e for e in history if e["val/bits_per_char"] <= target), None)
    export.export(folder, params_file, revision="benchmark")
    return {
        "kind": m.kind,
        "parameters": sum(x.numel() for x in train.unwrap(t.model).parameters()),
        "epochs_run": len(history),
        "over_budget": over,
        "train_seconds": round(history[-1]["train_s"], 1),
        "wall_seconds": round(history[-1]["wall_s"], 1),
        "best_val_bits_per_char": round(history[best]["val/bits_per_char"], 4),
        "best_epoch": best + 1,
        "best_at_wall_s": round(history[best]["wall_s"], 1),
        f"wall_s_to_{target:g}_bits_per_char": None if reached is None else round(reached["wall_s"], 1),
        f"train_s_to_{target:g}_bits_per_char": None if reached is None else round(reached["train_s"], 1),
        "epochs": [{k: round(v, 4) for k, v in e.items()} for e in history],
        "onnx_generation_chars_per_s": round(generation_speed(folder / "model.onnx", threads, gen_chars)),
        "recipe": t.config["params"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--prepared", default=str(ROOT / "data/prepared/alice"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="text models of params.yaml (default: %(default)s)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    ap.add_argument("--target", type=float, default=2.1, help="val bits/char whose first crossing is timed")
    ap.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads; 0 = one per core")
    ap.add_argument("--gen-chars", type=int, default=500, help="characters generated for the speed figure")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/text_models.json"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            results[kind] = run_model(kind, Path(args.params), Path(args.prepared), args.minutes * 60, args.target,
                                      args.threads, args.gen_chars, Path(tmp))
            print(f"{kind}: {json.dumps({k: v for k, v in results[kind].items() if k not in ('recipe', 'epochs')})}",
                  flush=True)
    report = {
        "benchmark": "text_models", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "platform": platform.platform(), "minutes": args.minutes, "target_bits_per_char": args.target,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    to = f"train_s_to_{args.target:g}_bits_per_char"
    print(f"\nload average {report['load_average_before']} -> {report['load_average_after']}, "
          f"{report['torch_threads']} torch threads, budget {args.minutes:g} min per model")
    print(f"| model | params | epochs | train s | wall s | best val bits/char (epoch, wall s) | train s to {args.target:g} "
          f"| ORT generation chars/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {kind}{' (over budget)' if r['over_budget'] else ''} | {r['parameters']:,} | {r['epochs_run']} "
              f"| {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['best_val_bits_per_char']:.3f} ({r['best_epoch']}, "
              f"{r['best_at_wall_s']:.0f}) | {r[to] if r[to] is not None else '-'} "
              f"| {r['onnx_generation_chars_per_s']:,} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
