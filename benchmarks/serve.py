"""HTTP serving throughput and latency: `ptpipe serve` with and without micro-batching vs the FastAPI +
eager PyTorch server a user would write first, side by side in one run.

    python benchmarks/serve.py [--clients 1 8 32] [--requests 2000] [--repeat 3] [--out benchmarks/results/serve.json]

Model: the default CNN (params.yaml's `cnn.recipes.default`: airbench, its widths), random seeded
weights (speed does not depend on them), saved as train_cnn saves it and exported through
ptpipe.export like the stage. Servers, each in its own process on a free loopback port:
  (a) `ptpipe serve` (micro-batching on, defaults: 2 ms window, <= 64 images and <= half the requests
      in flight per call, 1 onnxruntime thread)
  (b) `ptpipe serve --no-batching` (one onnxruntime call per request, concurrent calls in threads)
  (c) a minimal FastAPI app: `def classify(images: UploadFile)` decoding with the same
      ptpipe.inference.load_image and running the eager nn.Module per request (torch's default threads)
The load: one client process (raw HTTP/1.1 keep-alive connections, asyncio) keeps exactly N requests in flight (N = 1, 8, 32
clients) until `--requests` have completed, after `--warmup` untimed ones; each request uploads
one 32 x 32 PNG (distinct images) to the classify endpoint and gets top-3 labels back. Reported:
requests/s, p50 and p99 latency, the 1-minute load average before each cell and the share of CPU
time the hypervisor gave to other guests during it (steal, from /proc/stat: this VM's neighbours
take 0-30% in bursts, and a cell with steal is slower by about as much). `--repeat N` runs the
whole sweep N times, servers interleaved round by round, and reports each cell's median: a burst
of steal then spoils one round, not one server. The client runs on the same CPU as the server:
the numbers are only comparable within one run.
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


def _batches(port: int) -> tuple[float, float]:
    """(rows, onnxruntime calls) of the micro-batcher so far (ptpipe_batch_size histogram of `ptpipe serve`)."""
    import httpx

    values = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        for key in values:
            if line.startswith(f"ptpipe_batch_size_{key}"):
                values[key] = float(line.split()[-1])
    return values["sum"], values["count"]


def _cpu_times() -> list[int]:
    """The machine's CPU time counters (user ... steal) from /proc/stat; [] where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return []


def _shares(before: list[int], after: list[int]) -> dict:
    """% of the CPU time between two _cpu_times() that was idle, and stolen by other guests."""
    if not before:
        return {"idle_pct": None, "steal_pct": None}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta) or 1
    return {"idle_pct": 100 * (delta[3] + delta[4]) / total, "steal_pct": 100 * delta[7] / total}


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _cell(label: str, clients: int, port: int, work: Path, args, round_: int) -> dict:
    """One (server, clients) measurement: the client process's latencies, the CPU shares, the batch sizes."""
    load, before = os.getloadavg()[0], _cpu_times()
    batches = _batches(port) if label.startswith("a") else None
    out = subprocess.run([sys.executable, str(work / "client.py"), str(port), "/v1/models/bench/classify",
                          str(clients), str(args.requests), str(args.warmup), str(work / "images.json")],
                         capture_output=True, text=True, check=True)
    result, shares = json.loads(out.stdout), _shares(before, _cpu_times())
    lat = sorted(result["latencies"])
    r = {"server": label, "clients": clients, "round": round_, "requests": len(lat), "failures": result["failures"],
         "throughput_rps": len(lat) / result["wall_s"], "p50_ms": 1000 * statistics.median(lat),
         "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "load_avg_1m_before": load, **shares}
    if batches:  # rows per onnxruntime call in this cell (warm-up included), from the server's own metrics
        rows, calls = (after - before for after, before in zip(_batches(port), batches))
        r["mean_batch"] = rows / max(calls, 1)
    print(f"round {round_}  {label:<32} {clients:>3} clients  {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
          f"p99 {r['p99_ms']:6.1f} ms  (load {load:.2f}, steal {r['steal_pct'] or 0:.1f}%, {r['failures']} failed"
          + (f", mean batch {r['mean_batch']:.1f})" if "mean_batch" in r else ")"), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="timed requests per cell (default 2000)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the whole sweep; cells report medians (default 3)")
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
    for round_ in range(1, args.repeat + 1):
        for label, command in servers.items():
            port = free_port()
            proc = start(command(port), port, work / f"{label[0]}.log")
            try:
                for clients in args.clients:
                    rows.append(_cell(label, clients, port, work, args, round_))
            finally:
                stop(proc)

    cells = {}
    for r in rows:
        cells.setdefault((r["server"], r["clients"]), []).append(r)
    median = {key: {k: statistics.median(r[k] for r in group) for k in ("throughput_rps", "p50_ms", "p99_ms")}
              for key, group in cells.items()}
    top = max(args.clients)
    label = {s[0]: s for s in servers}
    ratios = {}
    if (label["a"], top) in median:
        a, b, c = (median[label[k], top]["throughput_rps"] for k in "abc")
        ratios = {f"a/c at {top}": a / c, f"a/b at {top}": a / b}
    print(f"\nmedians of {args.repeat} round(s), {args.requests} requests a cell; steal = % of CPU time taken by other guests\n")
    print("| server | clients | req/s | p50 ms | p99 ms | mean batch | load avg | steal % |\n|---|---|---|---|---|---|---|---|")
    for (server, clients), m in median.items():
        group = cells[server, clients]
        batch = statistics.median(r["mean_batch"] for r in group) if "mean_batch" in group[0] else None
        steal = [r["steal_pct"] for r in group if r["steal_pct"] is not None]
        print(f"| {server} | {clients} | {m['throughput_rps']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
              + (f"{batch:.1f}" if batch else "-") + f" | {max(r['load_avg_1m_before'] for r in group):.2f} | "
              + (f"{min(steal):.1f}-{max(steal):.1f}" if steal else "-") + " |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "rows": rows, "medians": [{"server": k[0], "clients": k[1], **v} for k, v in median.items()],
        "ratios": ratios, "repeat": args.repeat, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_avg_end": os.getloadavg(), "requests": args.requests, "warmup": args.warmup}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
