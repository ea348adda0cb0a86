"""Text generation speed, side by side in one run: gpt with its key/value cache vs the window re-feed it
replaced, and `ptpipe serve` answering concurrent generate requests (continuous batching) vs one at a time.

    python benchmarks/generate.py                                   # the tiny fixture models (seeded weights)
    python benchmarks/generate.py --models models --prepared data/prepared/alice  # trained models

Models: `--models DIR` holds lstm/model.pt and gpt/model.pt (trained: the real ones), copied to a temporary
folder and exported there by ptpipe.export (so the files have the cache, whatever export DIR holds);
without it, tests/fixtures.write_models' tiny seeded models (speed figures of a 2-layer, 16-wide gpt
say little: use the real models for the targets). Prompts: the first characters of `--prepared`'s
validation text (else letters of the vocabulary).

1. gpt through onnxruntime (`--threads`, the session options of ptpipe.inference), batch 1, after a warm-up:
   - cached: `inference.TextGenerator.generate`, what `ptpipe generate --backend onnx` runs now;
   - window: the bare CharGPT (today's graph before the cache: ids -> logits) exported the same way,
     re-fed its last block_size ids every step, as `ptpipe generate` did before;
   - cached, keep = block_size: the same graph re-fed its whole window every step past the block, which
     gives the window re-feed's text to the character (`ptpipe generate --keep 128`);
   at two lengths: `--short` characters after a 5-character prompt (within the 128-position block: every
   step cached, all three give the same text) and `--long` (the issue's 500: past the block the model's
   keep, half the block, is re-fed when the cache is full, then it steps cached again: other text than
   the window re-feed past the block, docs/text-models.md). Same seed; "same text" is checked on the
   characters generated inside the block, and for keep = block_size on the whole text.
   What the re-prefill costs in quality (with `--prepared`): gpt's bits/char on the first
   `--quality-chars` characters of the validation text with the context the policy gives each character
   (keep..block_size characters: kinds.gpt.window_loss with stride block_size - keep + 1) vs the whole
   window for every character (stride 1, the window re-feed), eager PyTorch.
2. `ptpipe serve` (its defaults, --threads 1) in a subprocess: `--clients` streamed generate requests of
   `--length` characters each (16 different prompts and seeds), once one at a time and once all at
   once, `--rounds` times: aggregate characters/s, and the time to the first streamed character (p50/p99).
Prints a table and writes JSON with the load average before and after: on a shared machine the figures
are under load, and say so.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from serve import free_port, start, stop  # noqa: E402  (benchmarks/serve.py: the server helpers)

from ptpipe import export, inference  # noqa: E402

TARGETS = {"cached_over_window": 10.0, "cached_chars_per_s": 2300.0, "batched_over_serial": 4.0,
           "p99_first_char_ms": 100.0}


def models_folder(source: str | None, tmp: Path) -> Path:
    """tmp/{lstm,gpt}/ with model.pt (copied from `source`, or the tiny fixtures) and fresh exports."""
    if source:
        for kind in ("lstm", "gpt"):
            (tmp / kind).mkdir(parents=True)
            shutil.copy(Path(source) / kind / "model.pt", tmp / kind / "model.pt")
    else:
        from fixtures import write_models

        write_models(tmp)
    for kind in ("lstm", "gpt"):
        export.export(tmp / kind, ROOT / "params.yaml", revision="benchmark")
    return tmp


def window_graph(gpt_dir: Path) -> tuple[inference.Run, dict]:
    """The uncached gpt as it was exported before the cache (ids -> logits), run as `window` mode."""
    import onnxruntime as ort
    import torch

    from ptpipe import kinds

    _, module, config = kinds.load(gpt_dir / "model.pt")
    buf = io.BytesIO()
    torch.onnx.export(module.gpt, (torch.zeros(2, 5, dtype=torch.int64),), buf, dynamo=False, opset_version=17,
                      input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
    session = ort.InferenceSession(buf.getvalue(), inference.session_options(ARGS.threads),
                                   providers=["CPUExecutionProvider"])
    meta = {"vocab": config["data"]["vocab"], "generation": {"mode": "window",
                                                              "block_size": config["model_args"]["block_size"]},
            "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", "vocab_size"]}]}
    return inference.onnx_runner(session), meta


def chars_per_s(run: inference.Run, meta: dict, prompt: str, length: int) -> tuple[float, str]:
    "".join(inference.stream_text(run, meta, prompt, 20, 0.8, 1))  # warm-up: arenas, first shapes
    t0 = time.perf_counter()
    text = "".join(inference.stream_text(run, meta, prompt, length, 0.8, 1))
    return length / (time.perf_counter() - t0), text


def offline(models: Path, prompt: str) -> list[dict]:
    cached = inference.TextGenerator(models / "gpt/model.onnx", ARGS.threads)
    block = cached.meta["generation"]["block_size"]
    whole = inference.with_keep(cached.meta, block)
    window_run, window_meta = window_graph(models / "gpt")
    rows = []
    for length in (ARGS.short, ARGS.long):
        fast, text = chars_per_s(cached.run, cached.meta, prompt, length)
        exact, exact_text = chars_per_s(cached.run, whole, prompt, length)
        slow, ref = chars_per_s(window_run, window_meta, prompt, length)
        inside = block - len(prompt) + 1  # characters generated with the whole window either way
        rows.append({"length": length, "prompt_chars": len(prompt), "keep": cached.meta["generation"]["keep"],
                     "cached_chars_per_s": round(fast), "cached_keep_block_chars_per_s": round(exact),
                     "window_chars_per_s": round(slow), "ratio": round(fast / slow, 2),
                     "ratio_keep_block": round(exact / slow, 2), "same_text_inside_block": text[:inside] == ref[:inside],
                     "same_text": text == ref, "same_text_keep_block": exact_text == ref})
    return rows


def quality(models: Path, prepared: str) -> dict:
    """bits/char of the validation text's first --quality-chars characters: whole window vs the re-prefill."""
    import torch

    from ptpipe import kinds
    from ptpipe.kinds.gpt import bits, window_loss

    kind, module, config = kinds.load(models / "gpt/model.pt")
    block, keep = config["model_args"]["block_size"], kind.metadata(config)["generation"]["keep"]
    ids = torch.from_numpy(np.load(Path(prepared) / "val_ids.npy")[: ARGS.quality_chars].astype(np.int64))
    out = {"characters": int(ids.numel()), "block_size": block}
    with torch.no_grad():
        for name, k in (("whole_window", block), (f"keep_{keep}", keep)):
            nats, n = window_loss(module.gpt, ids, block, block - k + 1)
            out[name] = round(bits(nats / n), 4)
    out["cost_bits_per_char"] = round(out[f"keep_{keep}"] - out["whole_window"], 4)
    return out


async def _one(client, url: str, body: dict) -> tuple[float, float, int]:
    """(seconds to the first streamed character, seconds to the end, characters) of one streamed request."""
    t0, first, chars = time.perf_counter(), None, 0
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        r.raise_for_status()
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line
            elif line.startswith("data: "):
                if event is None:
                    chars += 1
                    first = first or time.perf_counter() - t0
                event = None
    return first, time.perf_counter() - t0, chars


async def serving_cell(url: str, bodies: list[dict], concurrent: bool) -> dict:
    import httpx

    firsts, total_chars, wall = [], 0, 0.0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as client:
        await _one(client, url, {**bodies[0], "length": 20})  # warm-up
        for _ in range(ARGS.rounds):
            t0 = time.perf_counter()
            if concurrent:
                results = await asyncio.gather(*[_one(client, url, b) for b in bodies])
            else:
                results = [await _one(client, url, b) for b in bodies]
            wall += time.perf_counter() - t0
            firsts += [r[0] for r in results]
            total_chars += sum(r[2] for r in results)
    ms = sorted(1000 * f for f in firsts)
    return {"chars_per_s": round(total_chars / wall), "first_char_p50_ms": round(statistics.median(ms), 1),
            "first_char_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "requests": len(ms)}


def serving(models: Path, prompts: list[str], work: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "ptpipe.cli", "serve", "--port", str(port), "--threads", "1",
           "--model", f"alice-lstm={models / 'lstm'}", "--model", f"alice-gpt={models / 'gpt'}"]
    proc = start(cmd, port, work / "serve.log")
    out = {}
    try:
        for name in ("alice-lstm", "alice-gpt"):
            url = f"http://127.0.0.1:{port}/v1/models/{name}/generate"
            bodies = [{"prompt": p, "length": ARGS.length, "temperature": 0.8, "seed": i} for i, p in enumerate(prompts)]
            serial = asyncio.run(serving_cell(url, bodies, False))
            batched = asyncio.run(serving_cell(url, bodies, True))
            out[name] = {"one_at_a_time": serial, "concurrent": batched,
                         "ratio": round(batched["chars_per_s"] / serial["chars_per_s"], 2)}
            print(f"{name}: {json.dumps(out[name])}", flush=True)
    finally:
        stop(proc)
    return out


def prompts_from(prepared: str | None, vocab: list[str], n: int) -> list[str]:
    """n prompts of 5 to 20 characters: stretches of the validation text, or letters of the vocabulary."""
    if prepared:
        ids = np.load(Path(prepared) / "val_ids.npy")
        text = "".join(vocab[i] for i in ids[: 40 * n])
        return [text[40 * i: 40 * i + 5 + i % 16] for i in range(n)]
    letters = [c for c in vocab if c.isalpha()] or vocab
    return ["".join(letters[(i * 7 + j) % len(letters)] for j in range(5 + i % 16)) for i in range(n)]


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--models", help="a folder with lstm/model.pt and gpt/model.pt (default: tiny fixture models)")
    ap.add_argument("--prepared", help="prepared text data (val_ids.npy): where the prompts come from")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for part 1 (default 1)")
    ap.add_argument("--short", type=int, default=120, help="characters after a 5-character prompt within the block")
    ap.add_argument("--long", type=int, default=500, help="characters generated past the block (the issue's 500)")
    ap.add_argument("--quality-chars", type=int, default=5000,
                    help="validation characters scored for the re-prefill's quality cost (default 5000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent generate requests (default 16)")
    ap.add_argument("--length", type=int, default=200, help="characters per generate request (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each serving cell (default 3)")
    ap.add_argument("--label", default="", help="e.g. 'under load': written into the JSON and the table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/generate.json"))
    ARGS = ap.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models = models_folder(ARGS.models, Path(tmp) / "models")
        vocab = inference.TextGenerator(models / "gpt/model.onnx").vocab
        prompts = prompts_from(ARGS.prepared, vocab, ARGS.clients)
        gpt_rows = offline(models, prompts[0][:5])
        for row in gpt_rows:
            print(f"gpt onnxruntime: {json.dumps(row)}", flush=True)
        cost = quality(models, ARGS.prepared) if ARGS.prepared else None
        if cost:
            print(f"gpt quality past the block: {json.dumps(cost)}", flush=True)
        served = serving(models, prompts, Path(tmp))
    report = {"benchmark": "generate", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "label": ARGS.label,
              "models": ARGS.models or "tiny fixtures (tests/fixtures.write_models)", "prepared": ARGS.prepared,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "args": vars(ARGS), "targets": TARGETS,
              "gpt_onnxruntime": gpt_rows, "quality": cost, "serving": served}
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{ARGS.label + ', ' if ARGS.label else ''}load average {report['load_average_before']} -> "
          f"{report['load_average_after']}; models: {report['models']}")
    print(f"| gpt onnxruntime, batch 1 | cached (keep {gpt_rows[0]['keep']}) chars/s | cached, keep = block | "
          f"window re-feed chars/s | cached / window | keep = block / window | same text inside the block / "
          f"all / keep = block all |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in gpt_rows:
        print(f"| {r['prompt_chars']} + {r['length']} characters | {r['cached_chars_per_s']:,} "
              f"(target {TARGETS['cached_chars_per_s']:,.0f}) | {r['cached_keep_block_chars_per_s']:,} | "
              f"{r['window_chars_per_s']:,} | {r['ratio']:g}x (target {TARGETS['cached_over_window']:g}x) | "
              f"{r['ratio_keep_block']:g}x | {r['same_text_inside_block']} / {r['same_text']} / "
              f"{r['same_text_keep_block']} |")
    if cost:
        keep = gpt_rows[0]["keep"]
        print(f"\ngpt bits/char, first {cost['characters']:,} validation characters: whole window "
              f"{cost['whole_window']}, re-prefill of the last {keep} {cost[f'keep_{keep}']} "
              f"({cost['cost_bits_per_char']:+g})")
    print(f"\n| serve, {ARGS.clients} x {ARGS.length} characters | one at a time chars/s | concurrent chars/s | "
          f"concurrent / one at a time | first character p50 / p99 ms (concurrent) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in served.items():
        c = r["concurrent"]
        print(f"| {name} | {r['one_at_a_time']['chars_per_s']:,} | {c['chars_per_s']:,} | {r['ratio']:g}x "
              f"(target {TARGETS['batched_over_serial']:g}x) | {c['first_char_p50_ms']:g} / {c['first_char_p99_ms']:g} "
              f"(target p99 {TARGETS['p99_first_char_ms']:g}) |")
    print(f"wrote {ARGS.out}")


if __name__ == "__main__":
    main()
