"""How long `/v2/health/live` and `/metrics` wait while `ptpipe serve` handles the largest requests
its limits allow (the event loop must never decode or parse them itself).

    python benchmarks/serve_stall.py [--seconds 20] [--heavy 4] [--out benchmarks/results/serve_stall.json]

One `ptpipe serve` (the default CNN, as benchmarks/serve.py builds it) on a loopback port. `--heavy`
clients send, in a loop, the worst allowed requests in turn: 8 PNGs of 4000 x 4000 (16 MP, the
pixel limit) to classify, a 64-image JSON infer (0.86 MiB of JSON numbers), and the same as binary
tensors. Meanwhile one prober asks /v2/health/live and /metrics alternately, one at a time, and
records each answer's latency. Reported: the probes' p50/p99/max, the heavy requests answered, the
1-minute load average and the CPU steal over the run. Target (docs/serving.md): p99 <= 50 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve import ROOT, _cpu_times, _shares, free_port, make_model, start, stop  # noqa: E402  benchmarks/serve.py


def heavy_requests() -> list[dict]:
    """httpx request kwargs of the three worst allowed requests (see the docstring)."""
    from PIL import Image

    photo = io.BytesIO()
    # a gradient: decoding costs what any 16-MP image costs, the file stays small (8 fit in one body)
    Image.linear_gradient("L").resize((4000, 4000)).convert("RGB").save(photo, "PNG")
    x = np.random.default_rng(1).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    tensor = {"name": "images", "shape": list(x.shape), "datatype": "UINT8"}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.size}}]}).encode()
    files = [("images", (f"{i}.png", photo.getvalue())) for i in range(8)]
    assert len(photo.getvalue()) * 8 < 16 * 2**20, "the uploads must fit in one body"
    return [{"url": "/v1/models/bench/classify", "files": files},
            {"url": "/v2/models/bench/infer", "json": {"inputs": [{**tensor, "data": x.ravel().tolist()}]}},
            {"url": "/v2/models/bench/infer", "content": head + x.tobytes(),
             "headers": {"Inference-Header-Content-Length": str(len(head))}}]


async def run(url: str, seconds: float, heavy: int, requests: list[dict]) -> tuple[list[float], int]:
    import httpx

    stop_at, probes, answered = time.perf_counter() + seconds, [], [0]
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=heavy + 2)) as client:
        async def load(i: int):
            while time.perf_counter() < stop_at:
                r = await client.post(**requests[i % len(requests)])
                assert r.status_code == 200, r.text
                answered[0] += 1
                i += 1

        async def probe():
            await asyncio.sleep(1)  # the heavy requests are under way
            while time.perf_counter() < stop_at:
                for path in ("/v2/health/live", "/metrics"):
                    start_ = time.perf_counter()
                    assert (await client.get(path)).status_code == 200
                    probes.append(time.perf_counter() - start_)
                await asyncio.sleep(0.01)

        await asyncio.gather(probe(), *[load(i) for i in range(heavy)])
    return probes, answered[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--heavy", type=int, default=4, help="clients sending the heaviest requests (default 4)")
    ap.add_argument("--only", choices=("png", "json", "binary"), default=None,
                    help="send only this one of the three heavy requests (default: all three in turn)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_stall.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    model_dir, port = make_model(work / "models"), free_port()
    proc = start([sys.executable, "-m", "ptpipe.cli", "serve", "--model", f"bench={model_dir}", "--port", str(port)],
                 port, work / "serve.log")
    try:
        load, before = os.getloadavg()[0], _cpu_times()
        requests = heavy_requests()
        if args.only:
            requests = [requests[("png", "json", "binary").index(args.only)]]
        probes, answered = asyncio.run(run(f"http://127.0.0.1:{port}", args.seconds, args.heavy, requests))
        shares = _shares(before, _cpu_times())
    finally:
        stop(proc)
    ms = sorted(1000 * p for p in probes)
    result = {"probes": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
              "max_ms": ms[-1], "heavy_answered": answered, "heavy_clients": args.heavy, "only": args.only, "seconds": args.seconds,
              "load_avg_1m_before": load, "load_avg_end": os.getloadavg()[0], **shares, "cpu_count": os.cpu_count()}
    print(f"health/metrics probes while the largest requests run: {len(ms)} probes, p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms (target p99 <= 50 ms); {answered} heavy "
          f"requests answered; load {load:.2f} -> {result['load_avg_end']:.2f}, steal {shares['steal_pct'] or 0:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
