"""HTTP serving throughput and latency: `ptpipe serve` with and without micro-batching vs the FastAPI +
eager PyTorch server a user would write first, side by side in one run.

    python benchmarks/serve.py [--clients 1 8 32] [--requests 400] [--out benchmarks/results/serve.json]

Model: the default CNN (params.yaml's `cnn.recipes.default`: airbench, its widths), random seeded
weights (speed does not depend on them), saved as train_cnn saves it and exported through
ptpipe.export like the stage. Servers, each in its own process on a free loopback port:
  (a) `ptpipe serve` (micro-batching on, defaults: 2 ms window, <= 64 images, 1 onnxruntime thread)
  (b) `ptpipe serve --no-batching` (one onnxruntime call per request, concurrent calls in threads)
  (c) a minimal FastAPI app: `def classify(images: UploadFile)` decoding with the same
      ptpipe.inference.load_image and running the eager nn.Module per request (torch's default threads)
The load: one client process (raw HTTP/1.1 keep-alive connections, asyncio) keeps exactly N requests in flight (N = 1, 8, 32
clients) until `--requests` have completed, after `--warmup` untimed ones; each request uploads
one 32 x 32 PNG (distinct images) to the classify endpoint and gets top-3 labels back. Reported:
requests/s, p50 and p99 latency, and the 1-minute load average before each cell. The client runs
on the same CPU as the server: the numbers are only comparable within one run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

EAGER_SERVER = '''
import io, sys
import numpy as np, torch, uvicorn
from fastapi import FastAPI, UploadFile
from ptpipe import kinds
from ptpipe.inference import load_image
_, model, config = kinds.load(sys.argv[1])
classes = config["data"]["classes"]
app = FastAPI()

@app.post("/v1/models/bench/classify")
def classify(images: UploadFile):
    x = torch.from_numpy(load_image(io.BytesIO(images.file.read()))[None])
    with torch.inference_mode():
        probs = torch.softmax(model(x), 1)[0]
    top = torch.topk(probs, 3)
    return {"predictions": [{"labels": [{"label": classes[i], "probability": float(p)}
                                        for p, i in zip(top.values.tolist(), top.indices.tolist())]}]}

@app.get("/v2/health/ready")
def ready():
    return {"ready": True}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
'''

CLIENT = r'''
# A load generator that costs little CPU next to the servers: raw HTTP/1.1 keep-alive connections on
# asyncio streams, each request pre-encoded (httpx spent ~4 ms of CPU per multipart request here).
import asyncio, json, sys, time
host, port, path = "127.0.0.1", int(sys.argv[1]), sys.argv[2]
clients, requests, warmup = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
blobs = [bytes.fromhex(b) for b in json.load(open(sys.argv[6]))]

def encode(blob):
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + blob + b"\r\n--b0undary--\r\n")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body

wire = [encode(b) for b in blobs]

async def call(reader, writer, i):
    writer.write(wire[i % len(wire)])
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return status

async def phase(n):
    latencies, failures, counter = [], [0], iter(range(n))
    async def worker():
        reader, writer = await asyncio.open_connection(host, port)
        for i in counter:
            start = time.perf_counter()
            if await call(reader, writer, i) != 200:
                failures[0] += 1
            latencies.append(time.perf_counter() - start)
        writer.close()
    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    return time.perf_counter() - start, latencies, failures[0]

async def main():
    await phase(warmup)
    wall, latencies, failures = await phase(requests)
    print(json.dumps({"wall_s": wall, "latencies": latencies, "failures": failures}))

asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path) -> Path:
    """models/cnn/model.pt (default recipe's arch and widths, random seeded weights) and its export."""
    import torch

    from ptpipe import export, params as params_mod
    from ptpipe.kinds.cnn import build_model

    recipe = params_mod.load(ROOT / "params.yaml").cnn.recipes["default"]
    args = {"arch": recipe.arch, **recipe.model_args, "num_classes": 10}
    torch.manual_seed(0)
    model = build_model(**args)
    (folder / "cnn").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": {
        "kind": "cnn", "model_args": args, "params": {"recipe": "default", "seed": 0},
        "data": {"classes": [f"class{i}" for i in range(10)], "mean": [0.49, 0.48, 0.45],
                 "std": [0.25, 0.24, 0.26]}}}, folder / "cnn" / "model.pt")
    export.export_model("cnn", folder / "cnn", opset=17, revision="benchmark")
    return folder / "cnn"


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {cmd} exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit(f"server {cmd} did not start:\n{log.read_text()}")


def _mean_batch(port: int) -> float:
    """Mean rows per onnxruntime call so far (ptpipe_batch_size histogram of `ptpipe serve`)."""
    import httpx

    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f"ptpipe_batch_size_{key}"):
                values[key] = float(line.split()[-1])
    return values.get("sum", 0) / max(values.get("count", 1), 1)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=400, help="timed requests per cell (default 400)")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    args = ap.parse_args()

    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = make_model(work / "models")
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue().hex())
    (work / "images.json").write_text(json.dumps(blobs))
    (work / "eager.py").write_text(EAGER_SERVER)
    (work / "client.py").write_text(CLIENT)

    servers = {
        "a: ptpipe serve (batching)": lambda p: [sys.executable, "-m", "ptpipe.cli", "serve", "--model",
                                                 f"bench={model_dir}", "--port", str(p)],
        "b: ptpipe serve --no-batching": lambda p: [sys.executable, "-m", "ptpipe.cli", "serve", "--model",
                                                    f"bench={model_dir}", "--port", str(p), "--no-batching"],
        "c: FastAPI + eager PyTorch": lambda p: [sys.executable, str(work / "eager.py"), str(model_dir / "model.pt"),
                                                 str(p)],
    }
    rows = []
    for label, command in servers.items():
        port = free_port()
        proc = start(command(port), port, work / f"{label[0]}.log")
        try:
            for clients in args.clients:
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, str(work / "client.py"), str(port), "/v1/models/bench/classify",
                                      str(clients),
                                      str(args.requests), str(args.warmup), str(work / "images.json")],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout)
                lat = sorted(result["latencies"])
                rows.append({"server": label, "clients": clients, "requests": len(lat),
                             "failures": result["failures"], "throughput_rps": len(lat) / result["wall_s"],
                             "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
                             "load_avg_1m_before": load})
                r = rows[-1]
                if label.startswith("a"):  # how much the micro-batcher gathered, from its own metrics
                    r["mean_batch"] = _mean_batch(port)
                print(f"{label:<32} {clients:>3} clients  {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  (load {load:.2f}, {r['failures']} failed"
                      + (f", mean batch so far {r['mean_batch']:.1f})" if "mean_batch" in r else ")"), flush=True)
        finally:
            stop(proc)

    by = {(r["server"][0], r["clients"]): r for r in rows}
    top = max(args.clients)
    ratios = {}
    if ("a", top) in by and ("c", top) in by:
        ratios = {f"a/c at {top}": by["a", top]["throughput_rps"] / by["c", top]["throughput_rps"],
                  f"a/b at {top}": by["a", top]["throughput_rps"] / by["b", top]["throughput_rps"]}
    print("\n| server | clients | req/s | p50 ms | p99 ms | load avg |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['load_avg_1m_before']:.2f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "rows": rows, "ratios": ratios, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_avg_end": os.getloadavg(), "requests": args.requests, "warmup": args.warmup}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
