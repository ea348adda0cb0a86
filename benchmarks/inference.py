"""CPU inference speed: eager PyTorch vs TorchScript vs onnxruntime, side by side in one run.

    python benchmarks/inference.py [--runs 300] [--out benchmarks/results/inference.json]

For each model: latency at batch 1 (median of `--runs` calls after warm-up), throughput at
batch 256 (median of `--runs // 10` calls), and for the LSTM generation speed (characters/s
over 1,000 sampled characters through ptpipe.generate's shared sampling loop, the real CLI
path: 1 / the median time per character). Models: the tutorial's LeNet (the issue's anchor), the default CNN
(params.yaml's `cnn.recipes.default`: its arch and model_args) and the default LSTM (params.yaml's `lstm`
section; vocabulary of 72). Weights are random (seeded): speed does not depend on them; pass --models-dir to time
trained files instead. Exports go through ptpipe.export exactly as the stage does. `ort` is the
project's inference path (ptpipe.inference's session options, its default thread count); `ort(1t)`
the same options with one intra-op thread (what `--threads 1` gives on a shared machine).
torch runs with its default threads (`eager`) and with one (`eager(1t)`); each ratio is `ort`
against the BETTER eager column. The machine's load average is printed and recorded: the numbers
are only comparable within one run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ptpipe import export, files, inference, kinds, params as params_mod
from ptpipe.inference import DEFAULT_THREADS, open_session

VOCAB = 72
PARAMS = params_mod.load(Path(__file__).resolve().parents[1] / "params.yaml")
DEFAULT_CNN = PARAMS.recipe("cnn")  # the tutorial CNN model's recipe (models.cnn)
CNN_MODELS = {"lenet": ("lenet", {}), "default": (DEFAULT_CNN.arch, DEFAULT_CNN.model_args)}
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def median_seconds(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class torch_threads:
    """Run a block with torch limited to n intra-op threads (restored after)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def timed(fns: dict, n: int) -> dict:
    """Median seconds per call of each function; "eager(1t)" re-runs eager on one torch thread."""
    with torch.inference_mode():
        secs = {k: median_seconds(f, n, warmup=max(5, n // 10)) for k, f in fns.items()}
        with torch_threads(1):
            secs["eager(1t)"] = median_seconds(fns["eager"], n, warmup=max(5, n // 10))
    return secs


def export_both(model: torch.nn.Module, config: dict, folder: Path):
    """(TorchScript module loaded back from its file, path of the ONNX file, metadata), as the stage writes them."""
    kind = kinds.get(config["kind"])
    meta = kind.describe(config)
    proto = export.to_onnx(kind, model, config, 17, meta)
    files.write_bytes(folder / f"{kind.name}.onnx", proto.SerializeToString())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(export.to_torchscript(model), str(folder / f"{kind.name}.ts"))
        scripted = torch.jit.load(str(folder / f"{kind.name}.ts")).eval()
    return scripted, folder / f"{kind.name}.onnx", meta


def bench_cnn(model: torch.nn.Module, config: dict, folder: Path, runs: int) -> dict:
    scripted, onnx_path, _ = export_both(model, config, folder)
    sessions = {"ort": open_session(onnx_path, DEFAULT_THREADS), "ort(1t)": open_session(onnx_path, threads=1)}
    result = {}
    for batch, label, n in ((1, "latency_us_b1", runs), (256, "throughput_img_s_b256", max(10, runs // 10))):
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        xn = x.numpy()
        fns = {"eager": lambda: model(x), "torchscript": lambda: scripted(x)}
        fns.update({k: (lambda s=s: s.run(None, {"images": xn})) for k, s in sessions.items()})
        secs = timed(fns, n)
        result[label] = {k: (s * 1e6 if batch == 1 else batch / s) for k, s in secs.items()}
    return result


def bench_lstm(model: torch.nn.Module, config: dict, folder: Path, runs: int) -> dict:
    scripted, onnx_path, meta = export_both(model, config, folder)
    sessions = {"ort": open_session(onnx_path, DEFAULT_THREADS), "ort(1t)": open_session(onnx_path, threads=1)}
    result = {}
    for batch, seq, label, n in ((1, 1, "step_latency_us_b1", runs),
                                 (256, 32, "throughput_chars_s_b256x32", max(10, runs // 30))):
        ids = torch.randint(0, model.embed.num_embeddings, (batch, seq))
        h, c = model.init_state(batch)
        feed = {"ids": ids.numpy(), "h0": h.numpy(), "c0": c.numpy()}
        fns = {"eager": lambda: model(ids, h, c), "torchscript": lambda: scripted(ids, h, c)}
        fns.update({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()})
        secs = timed(fns, n)
        result[label] = {k: (s * 1e6 if batch == 1 else batch * seq / s) for k, s in secs.items()}
    # generation: 1,000 characters through the shared sampler (numpy in, numpy out, state carried)
    runs_ = {"eager": kinds.runner(model, meta), "eager(1t)": kinds.runner(model, meta),
             "torchscript": kinds.runner(scripted, meta),
             **{k: inference.onnx_runner(s) for k, s in sessions.items()}}
    gen = {}
    texts = {}
    for name, run in runs_.items():
        threads = torch_threads(1) if name == "eager(1t)" else torch_threads(torch.get_num_threads())
        with threads:
            gen[name], texts[name] = _generate_speed(run, meta)
    result["generate_chars_s"] = gen
    result["generated_text_identical"] = len({tuple(t) for t in texts.values()}) == 1
    return result


def _generate_speed(run, meta) -> tuple[float, list[int]]:
    """(characters/s, the 1,000 sampled ids): one character = one sampling draw + one step call;
    the median interval between consecutive step calls over 1,000 characters, after a warm-up."""
    list(inference.sample_ids(run, meta, [1, 2, 3], 50, 0.8, 0))  # warm-up
    stamps = []

    def stamped(feeds):
        stamps.append(time.perf_counter())
        return run(feeds)

    ids = list(inference.sample_ids(stamped, meta, [1, 2, 3, 4, 5], 1000, 0.8, 1))
    intervals = np.diff(stamps[1:])  # stamps[0] is the prompt call
    return 1 / float(np.median(intervals)), ids


COLUMNS = ("eager", "eager(1t)", "torchscript", "ort", "ort(1t)")


def table(results: dict) -> str:
    """One row per measure; the ratio is the project's onnxruntime path (`ort`) over the BETTER eager column."""
    lines = [f"{'model':<9} {'measure':<27}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'ort/eager':>11}"]
    for model, measures in results.items():
        for measure, row in measures.items():
            if not isinstance(row, dict):
                continue
            latency = "latency" in measure
            best = min if latency else max
            eager, onnx = best(row["eager"], row["eager(1t)"]), row["ort"]
            ratio = eager / onnx if latency else onnx / eager
            cells = "".join(f"{row[c]:>12,.0f}" if c in row else f"{'':>12}" for c in COLUMNS)
            lines.append(f"{model:<9} {measure:<27}{cells}{ratio:>10.1f}x")
    return "\n".join(lines)


def one_round(args) -> dict:
    """Every model, every backend, once (fresh exports and sessions)."""
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.models_dir:
            _, cnn, cnn_config = kinds.load(Path(args.models_dir) / "cnn/model.pt")
            results["cnn"] = bench_cnn(cnn, cnn_config, tmp, args.runs)
            _, lstm, lstm_config = kinds.load(Path(args.models_dir) / "lstm/model.pt")
        else:
            for name, (arch, model_args) in CNN_MODELS.items():
                config = {"kind": "cnn", "model_args": {"arch": arch, **model_args, "num_classes": 10}, "params": {},
                          "data": {"classes": [str(i) for i in range(10)], "mean": MEAN, "std": STD}}
                results[name] = bench_cnn(kinds.get("cnn").build(config).eval(), config, tmp, args.runs)
            la = PARAMS.recipe("lstm")
            args_ = dict(vocab_size=VOCAB, embedding_size=la.embedding_size, hidden_size=la.hidden_size,
                         num_layers=la.num_layers, dropout=la.dropout, tie_weights=la.tie_weights)
            lstm_config = {"kind": "lstm", "model_args": args_, "params": {},
                           "data": {"vocab": [chr(32 + i) for i in range(VOCAB)]}}
            lstm = kinds.get("lstm").build(lstm_config).eval()
        results["lstm"] = bench_lstm(lstm, lstm_config, tmp, args.runs)
    print(f"round done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return results


def combine(rounds: list[dict]) -> dict:
    """Each cell: the median over rounds; the text check must hold in every round."""
    out = {}
    for model, measures in rounds[0].items():
        out[model] = {}
        for measure, row in measures.items():
            if isinstance(row, dict):
                out[model][measure] = {k: statistics.median(r[model][measure][k] for r in rounds) for k in row}
            else:
                out[model][measure] = all(r[model][measure] for r in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="timed calls at batch 1 (fewer at batch 256)")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    parser.add_argument("--models-dir", help="time models/cnn/model.pt and models/lstm/model.pt instead")
    parser.add_argument("--rounds", type=int, default=3,
                        help="whole benchmark repeated; each cell is the median over rounds (default 3)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rounds = [one_round(args) for _ in range(args.rounds)]
    results = combine(rounds)
    report = {
        "results": results,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "onnxruntime": ort.__version__, "ort_default_threads": DEFAULT_THREADS,
                    "python": platform.python_version()},
        "default_cnn": {"arch": DEFAULT_CNN.arch, "model_args": DEFAULT_CNN.model_args},
        "command": " ".join(["python", *sys.argv]),
        "runs": args.runs,
        "rounds": rounds,
    }
    print(table(results))
    print(f"LSTM generation identical across backends: {results['lstm']['generated_text_identical']}")
    print(f"load average before/after: {load_before[0]:.2f} / {report['machine']['loadavg_after'][0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    files.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
