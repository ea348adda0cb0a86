"""`ptpipe serve` end to end: the real CLI in a subprocess where `import torch` fails, real uvicorn on
a free loopback port, httpx clients, onnxruntime sessions of the tiny seeded fixture models
(tests/fixtures.write_models + the project's export, as test_export does).

Every server here runs under a meta-path blocker that refuses torch and logs the attempt; stopping a
server asserts nothing tried. Waits are bounded polls, no timed assertions.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fixtures import ROOT, cifar_images, model_registry, tool_env, write_models
from ptpipe import export, files, inference, registry, serve

NO_TORCH = '''
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            sys.stderr.write(f"BLOCKED import of {name}\\n")
            raise ImportError(f"torch is not importable in this process ({name})")
sys.meta_path.insert(0, NoTorch())
from ptpipe.cli import main
sys.exit(main(sys.argv[1:]))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ptpipe_no_torch(tmp: Path, *args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp / "no_torch.py"
    script.write_text(NO_TORCH)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=tool_env(), capture_output=True,
                          text=True, timeout=timeout)


class Server:
    """`ptpipe serve ARGS` under the torch blocker; `url` once /v2/health/ready answers."""

    def __init__(self, tmp: Path, *args: str, cwd: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "no_torch.py").write_text(NO_TORCH)
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(tmp / "no_torch.py"), "serve", "--port", str(port),
                                          "--threads", "1", *args], cwd=cwd, env=tool_env(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ptpipe serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ptpipe serve did not get ready:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        output = self.log.read_text()
        assert "BLOCKED import" not in output and "Traceback" not in output, output
        return output


def png(array_chw: np.ndarray, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    img = Image.fromarray(array_chw.transpose(1, 2, 0))
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def images(n: int, seed: int) -> np.ndarray:
    return cifar_images(n, seed)[0].reshape(n, 3, 32, 32)


def export_models(root: Path, seed: int = 0) -> Path:
    write_models(root / "models", seed=seed)
    for kind in ("cnn", "lstm"):
        export.export(root / "models" / kind, ROOT / "params.yaml", revision="abc123")
    return root / "models"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project folder: the project's dvc.yaml (artifact names), models/{cnn,lstm} exported."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    export_models(root)
    return root


@pytest.fixture(scope="module")
def server(workspace):
    srv = Server(workspace / "tmp", "--max-body-mb", "1", cwd=workspace)
    yield srv
    srv.stop()


def test_health_metadata_and_versions(server, workspace):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert f"listening on {server.url} (Ctrl-C stops)" in server.log.read_text()  # where to point a client
    assert httpx.get(server.url + "/v2").json()["extensions"] == ["binary_tensor_data", "classification",
                                                                  "model_repository"]
    cnn_md5 = files.digest(workspace / "models/cnn/model.onnx", "md5")
    listed = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert listed["cifar10-cnn"]["version"] == cnn_md5 and listed["alice-lstm"]["task"] == "text-generation"
    meta = httpx.get(server.url + "/v2/models/cifar10-cnn")
    assert meta.headers["x-model-version"] == cnn_md5
    assert meta.json()["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert meta.json()["versions"] == [cnn_md5] and meta.json()["outputs"][0]["datatype"] == "FP32"
    assert httpx.get(server.url + f"/v2/models/cifar10-cnn/versions/{cnn_md5}/ready").json()["ready"]
    lstm = httpx.get(server.url + "/v2/models/alice-lstm").json()
    assert [i["name"] for i in lstm["inputs"]] == ["ids", "h0", "c0"]


def test_classify_and_infer_match_the_runtime(server, workspace):
    classifier = inference.ImageClassifier(workspace / "models/cnn/model.onnx")
    x = images(3, seed=7)
    uploads = [png(x[0]), png(x[1], "JPEG", (64, 48)), png(x[2], size=(100, 100))]
    decoded = np.stack([inference.load_image(io.BytesIO(b)) for b in uploads])
    expected = classifier.top_k(decoded, 2)
    r = httpx.post(server.url + "/v1/models/cifar10-cnn/classify", data={"top_k": "2"},
                   files=[("images", (f"im{i}", b)) for i, b in enumerate(uploads)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cifar10-cnn" and body["version"] == r.headers["x-model-version"]
    for got, want in zip(body["predictions"], expected):
        assert [l["label"] for l in got["labels"]] == [c for c, _ in want]
        assert [l["probability"] for l in got["labels"]] == pytest.approx([p for _, p in want], abs=1e-5)

    infer = httpx.post(server.url + "/v2/models/cifar10-cnn/infer", json={"id": "r1", "inputs": [
        {"name": "images", "shape": [2, 3, 32, 32], "datatype": "UINT8", "data": x[:2].ravel().tolist()}]})
    assert infer.status_code == 200, infer.text
    out = infer.json()
    assert out["id"] == "r1" and out["model_name"] == "cifar10-cnn" and out["outputs"][0]["shape"] == [2, 10]
    assert np.allclose(np.reshape(out["outputs"][0]["data"], (2, 10)), classifier.logits(x[:2]), atol=1e-5)

    step = httpx.post(server.url + "/v2/models/alice-lstm/infer", json={"inputs": [
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]]},
        {"name": "h0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0.0] * 32},
        {"name": "c0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0.0] * 32}],
        "outputs": [{"name": "h"}]})
    assert step.status_code == 200, step.text
    assert [o["name"] for o in step.json()["outputs"]] == ["h"] and step.json()["outputs"][0]["shape"] == [2, 1, 16]


def test_generate_gives_ptpipe_generates_text_and_streams_it(server, workspace, tmp_path):
    args = {"prompt": "Alice", "length": 40, "temperature": 0.8, "seed": 3}
    r = httpx.post(server.url + "/v1/models/alice-lstm/generate", json=args)
    assert r.status_code == 200, r.text
    cli = ptpipe_no_torch(tmp_path, "generate", "--prompt", "Alice", "--length", "40", "--temperature", "0.8",
                          "--seed", "3", "--backend", "onnx", "--model", str(workspace / "models/lstm/model.onnx"),
                          cwd=workspace)
    assert cli.returncode == 0, cli.stderr
    assert r.json()["text"] == cli.stdout.rstrip("\n") and r.json()["text"].startswith("Alice")
    with httpx.stream("POST", server.url + "/v1/models/alice-lstm/generate", json={**args, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [block for block in s.read().decode().split("\n\n") if block]
    chars = [json.loads(e[len("data: "):])["text"] for e in events if e.startswith("data: ")]
    assert "".join(chars) == r.json()["text"][len("Alice"):] and len(chars) == 40
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done") and done["text"] == r.json()["text"]
    assert done["version"] == files.digest(workspace / "models/lstm/model.onnx", "md5")


def test_the_blocker_refuses_torch(workspace, tmp_path):
    # proof that the servers above ran where torch cannot be imported
    torch_backend = ptpipe_no_torch(tmp_path, "generate", "--prompt", "A", "--backend", "torch", cwd=workspace)
    assert torch_backend.returncode != 0 and "BLOCKED import of torch" in torch_backend.stderr


def test_multipart_bodies_are_read_as_clients_write_them():
    # what httpx/curl/browsers send: quoted and raw UTF-8 file names (RFC 7578 4.2), a plain field beside the
    # files, a file under another field name (ignored), a delimiter string inside the data that is
    # not at a line start, transport padding after a delimiter, a preamble and an epilogue
    body = (b"preamble\r\n--B\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a; b.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nfirst--B\r\nstill first\r\n--B  \r\n"
            b"content-disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n--B\r\n"
            b"Content-Disposition: form-data; name=\"other\"; filename=\"c.png\"\r\n\r\nnot ours\r\n--B\r\n"
            + "Content-Disposition: form-data; name=images; filename=\"\u00e9t\u00e9.png\"\r\n\r\n".encode()
            + b"\r\n--B--\r\nepilogue")
    uploads, fields = serve._multipart(body, "multipart/form-data; boundary=B", max_files=64)
    assert uploads == [("a; b.png", b"first--B\r\nstill first"), ("\u00e9t\u00e9.png", b"")]
    assert fields == {"top_k": "2"}
    with pytest.raises(serve.ApiError, match="at most 2 images"):
        serve._multipart(body, "multipart/form-data; boundary=B", max_files=2)
    field = b"--B\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n"
    with pytest.raises(serve.ApiError, match=r"too many form fields \(at most 16\)"):
        serve._multipart(field * 17 + b"--B--\r\n", "multipart/form-data; boundary=B", max_files=64)
    with pytest.raises(serve.ApiError, match="too many parts"):  # parts without a name count too
        serve._multipart(b"--B\r\nX: y\r\n\r\nx\r\n" * 100 + b"--B--\r\n", "multipart/form-data; boundary=B",
                         max_files=64)


def test_a_batch_takes_at_most_half_of_the_requests_in_flight():
    # two groups keep the event loop and the batch thread both busy (ptpipe.batching says why)
    from ptpipe.batching import MicroBatcher

    async def scenario(in_flight: int, sizes: list[int]) -> tuple[list[int], list[np.ndarray]]:
        calls = []
        batcher = MicroBatcher(lambda x: calls.append(len(x)) or x * 2, max_items=64, arriving=lambda: 0,
                               in_flight=lambda: in_flight)
        rows = [np.full((n, 1), i) for i, n in enumerate(sizes)]
        futures = [batcher.submit(r) for r in rows]  # all queued before the worker first runs
        out = await asyncio.gather(*futures)
        batcher.close()
        assert all((o == 2 * r).all() for o, r in zip(out, rows))  # each request gets its own rows back
        return calls, out

    assert asyncio.run(scenario(8, [1] * 8))[0] == [4, 4]
    assert asyncio.run(scenario(32, [1] * 40))[0] == [16, 16, 8]
    assert asyncio.run(scenario(1, [1, 1]))[0] == [1, 1]
    assert asyncio.run(scenario(8, [10, 1, 1, 1, 1]))[0] == [13, 1]  # half of the requests, whatever their rows
    assert asyncio.run(scenario(32, [60, 10, 1]))[0] == [60, 11]  # and at most max_items rows


def test_a_batch_filled_while_the_model_runs_is_handed_to_the_thread_at_once():
    """The next batch gathers beside the running one and, once it holds half the requests in flight, goes to
    the model thread without waiting for the event loop: here the loop is blocked when the first batch ends,
    and the second still runs; the third (at most two handed over) waits for the loop."""
    from ptpipe.batching import MicroBatcher

    release, loop_blocked, seen = threading.Event(), threading.Event(), []

    def run(x):
        if not seen:
            release.wait(5)  # the first batch is held until the loop is blocked
        seen.append((len(x), loop_blocked.is_set()))
        return x * 2

    async def scenario():
        batcher = MicroBatcher(run, max_items=64, arriving=lambda: 0, in_flight=lambda: 8)
        first = batcher.submit(np.zeros((1, 1)))
        await asyncio.sleep(0.05)  # the first batch is in the thread
        rest = [batcher.submit(np.full((1, 1), i)) for i in range(8)]  # two batches of 4: half of 8 in flight
        await asyncio.sleep(0.05)  # the second is gathered and handed over while the first runs
        loop_blocked.set()
        release.set()
        time.sleep(0.3)  # the event loop does nothing meanwhile
        loop_blocked.clear()
        out = await asyncio.gather(first, *rest)
        batcher.close()
        return out

    out = asyncio.run(scenario())
    assert seen == [(1, True), (4, True), (4, False)]
    assert [int(o[0, 0]) for o in out[1:]] == [2 * i for i in range(8)]  # each request its own rows


BAD = [  # (method path, request kwargs, status, field, words in the message)
    ("/v1/models/nope/classify", {"files": {"images": b"x"}}, 404, "name", "unknown model 'nope'"),
    ("/v1/models/cifar10-cnn/classify", {"files": {"images": ("a.txt", b"not an image")}}, 400, "images[0]",
     "not a readable image"),
    ("/v1/models/cifar10-cnn/classify", {"json": {"images": []}}, 400, "images", "multipart/form-data"),
    ("/v1/models/cifar10-cnn/classify", {"files": [("images", (f"{i}.png", b"x")) for i in range(65)]}, 400,
     "images", "at most 64"),
    ("/v1/models/cifar10-cnn/classify", {"files": {"images": b"x"}, "data": {"top_k": "11"}}, 400, "top_k",
     "1 to 10"),
    ("/v1/models/alice-lstm/classify", {"files": {"images": b"x"}}, 400, "name", "text-generation model"),
    ("/v1/models/cifar10-cnn/classify", {"content": b"--zz\r\nContent-Disposition: form-data; name=images; "
                                                   b"filename=a.png\r\n\r\n\x89PNG", "headers": {
        "content-type": "multipart/form-data; boundary=zz"}}, 400, "images", "no closing --zz--"),
    ("/v1/models/cifar10-cnn/classify", {"content": b"--zz\r\nX: y\r\n\r\ndata\r\n--zz--\r\n", "headers": {
        "content-type": "multipart/form-data; boundary=zz"}}, 400, "images", "no Content-Disposition"),
    ("/v1/models/cifar10-cnn/classify", {"content": b"", "headers": {"content-type": "multipart/form-data"}}, 400,
     "images", "no boundary"),
    ("/v2/models/cifar10-cnn/infer", {"content": b"{not json"}, 400, "body", "not JSON"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 3, 32, 32],
                                                            "datatype": "FP32", "data": [0] * 3072}]}}, 400,
     "inputs[0].datatype", "must be UINT8"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 3, 16, 16],
                                                            "datatype": "UINT8", "data": [0] * 768}]}}, 400,
     "inputs[0].shape", "axis 2 must be 32"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [65, 3, 32, 32],
                                                            "datatype": "UINT8", "data": []}]}}, 400,
     "inputs[0].shape", "over the limit of 64"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 3, 32, 32],
                                                            "datatype": "UINT8", "data": [0] * 3071}]}}, 400,
     "inputs[0].data", "3071 values"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 3, 32, 32],
                                                            "datatype": "UINT8", "data": [256] * 3072}]}}, 400,
     "inputs[0].data", "0..255"),
    ("/v2/models/cifar10-cnn/infer", {"json": {"inputs": [{"name": "pixels"}]}}, 400, "inputs[0].name",
     "unknown input 'pixels'"),
    ("/v2/models/alice-lstm/infer", {"json": {"inputs": [{"name": "ids", "shape": [1, 1], "datatype": "INT64",
                                                          "data": [1]}]}}, 400, "inputs", "missing input(s) h0, c0"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": "Alice\u00e9#"}}, 400, "prompt", "'#', 'é'"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": "Alice", "length": 5001}}, 400, "length", "0 to 5000"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": "Alice", "temperature": -1}}, 400, "temperature", ">= 0"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": "Alice", "seed": "one"}}, 400, "seed", "integer"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": "Alice", "lenght": 3}}, 400, "lenght", "unknown field"),
    ("/v1/models/alice-lstm/generate", {"json": {"prompt": ""}}, 400, "prompt", "1 to 2000"),
    ("/v2/models/cifar10-cnn/versions/v9/infer", {"json": {}}, 404, "version", "'v9' is not served"),
    ("/v2/models/cifar10-cnn/infer", {"content": b"0" * (2 * 2**20)}, 413, "body", "over the limit"),
    ("/v2/models/cifar10-cnn/infer", {"content": (b"0" * 2**16 for _ in range(40))}, 413, "body", "over the limit"),
]


@pytest.mark.parametrize("path,kwargs,status,field,words", BAD, ids=[f"{b[3]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_4xx_naming_the_field(server, path, kwargs, status, field, words):
    r = httpx.post(server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_metrics_count_requests_errors_batches_and_versions(server, workspace):
    httpx.post(server.url + "/v1/models/cifar10-cnn/classify", files={"images": png(images(1, 1)[0])})
    httpx.post(server.url + "/v1/models/nope/classify", files={"images": b"x"})
    text = httpx.get(server.url + "/metrics").text
    md5 = files.digest(workspace / "models/cnn/model.onnx", "md5")
    assert 'ptpipe_requests_total{endpoint="classify",model="cifar10-cnn"}' in text
    assert 'ptpipe_request_errors_total{endpoint="classify",model="_unknown",status="404"}' in text
    assert 'ptpipe_request_duration_seconds_bucket{endpoint="classify",le="0.001",model="cifar10-cnn"}' in text
    assert 'ptpipe_batch_size_count{model="cifar10-cnn"}' in text
    assert f'ptpipe_model_info{{kind="cnn",model="cifar10-cnn",source="workspace",task="image-classification",' \
           f'version="{md5}"}} 1.0' in text


async def _classify(client: httpx.AsyncClient, url: str, blob: bytes) -> httpx.Response:
    return await client.post(url, files={"images": ("x.png", blob)})


def test_concurrent_clients_get_their_own_answers_in_shared_batches(server, workspace):
    classifier = inference.ImageClassifier(workspace / "models/cnn/model.onnx")
    x = images(48, seed=11)
    blobs = [png(im) for im in x]
    expected = [row[0][0] for row in classifier.top_k(np.stack([inference.load_image(io.BytesIO(b)) for b in blobs]), 1)]
    before = _batch_counts(server.url)

    async def clients():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=48)) as client:
            return await asyncio.gather(*[_classify(client, server.url + "/v1/models/cifar10-cnn/classify", b)
                                          for b in blobs])

    responses = asyncio.run(clients())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["predictions"][0]["labels"][0]["label"] for r in responses] == expected
    assert len(set(expected)) > 1  # the answers differ, so a mixed-up batch would show
    after = _batch_counts(server.url)
    assert after["sum"] - before["sum"] == 48  # every image ran exactly once
    assert after["count"] - before["count"] < 48  # ... in fewer calls than requests: they shared batches


def _batch_counts(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f'ptpipe_batch_size_{key}{{model="cifar10-cnn"}}'):
                out[key] = float(line.split()[-1])
    return out


def test_version_swap_under_load_fails_no_request(workspace, tmp_path):
    v2_dir = export_models(tmp_path / "v2", seed=1)
    served = tmp_path / "served" / "model.onnx"
    served.parent.mkdir()
    shutil.copy(workspace / "models/cnn/model.onnx", served)  # no model.pt beside: a bare deployed file
    versions = {files.digest(p, "md5"): inference.ImageClassifier(p) for p in (served, v2_dir / "cnn/model.onnx")}
    old, new = list(versions)
    x = images(8, seed=5)
    blobs = [png(im) for im in x]
    decoded = np.stack([inference.load_image(io.BytesIO(b)) for b in blobs])
    answers = {v: [row[0] for row in c.top_k(decoded, 1)] for v, c in versions.items()}
    srv = Server(tmp_path, "--model", f"clf={served}", cwd=tmp_path)
    try:
        async def load_and_swap():
            results, swapped = [], asyncio.Event()
            async with httpx.AsyncClient(timeout=60) as client:
                async def client_loop(i: int):
                    extra = 0
                    while extra < 5:  # keep going until 5 requests after the swap returned
                        after = swapped.is_set()
                        r = await _classify(client, srv.url + "/v1/models/clf/classify", blobs[i])
                        results.append((i, after, r))
                        extra += after

                async def swap():
                    await asyncio.sleep(0.3)
                    tmp = served.with_suffix(".tmp")
                    shutil.copy(v2_dir / "cnn/model.onnx", tmp)
                    os.replace(tmp, served)
                    r = await client.post(srv.url + "/v2/repository/models/clf/load")
                    assert r.status_code == 200 and r.json() == {"name": "clf", "version": new, "previous": old,
                                                                 "changed": True}, r.text
                    swapped.set()

                await asyncio.gather(swap(), *[client_loop(i) for i in range(8)])
            return results

        results = asyncio.run(load_and_swap())
        assert all(r.status_code == 200 for _, _, r in results), [r.text for _, _, r in results if r.status_code != 200]
        for i, after, r in results:
            version = r.json()["version"]
            assert version == new or not after  # sent after the swap returned: the new version
            label, prob = answers[version][i]
            assert r.json()["predictions"][0]["labels"][0]["label"] == label  # computed by the version it names
        assert {r.json()["version"] for _, _, r in results} == {old, new}
        again = httpx.post(srv.url + "/v2/repository/models/clf/load").json()
        assert again == {"name": "clf", "version": new, "changed": False}
        metrics = httpx.get(srv.url + "/metrics").text
        assert f'version="{new}"' in metrics and f'version="{old}"' not in metrics
        # a broken new file is refused and the old session keeps serving
        served.write_bytes(b"not onnx")
        broken = httpx.post(srv.url + "/v2/repository/models/clf/load")
        assert broken.status_code == 400 and f"still serving {new}" in broken.json()["error"]
        assert httpx.post(srv.url + "/v1/models/clf/classify", files={"images": blobs[0]}).json()["version"] == new
    finally:
        srv.stop()


def test_poll_interval_swaps_in_a_replaced_file(workspace, tmp_path):
    served = tmp_path / "m" / "model.onnx"
    served.parent.mkdir()
    shutil.copy(workspace / "models/cnn/model.onnx", served)
    srv = Server(tmp_path, "--model", f"clf={served}", "--poll-s", "0.2", cwd=tmp_path)
    try:
        new = export_models(tmp_path / "v2", seed=2) / "cnn/model.onnx"
        shutil.copy(new, served.with_suffix(".tmp"))
        os.replace(served.with_suffix(".tmp"), served)
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/v2/models/clf").json()["versions"] != [files.digest(new, "md5")]:
            assert time.monotonic() < deadline, "the poll never swapped the new file in"
            time.sleep(0.2)
        assert 'ptpipe_model_reloads_total{model="clf",result="swapped"} 1.0' in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()


def test_bad_command_lines_are_one_line_errors(workspace, tmp_path):
    missing = ptpipe_no_torch(tmp_path, "serve", "--model", "nowhere/model.onnx", cwd=workspace)
    assert missing.returncode == 2 and "not NAME@vX.Y.Z, NAME#STAGE" in missing.stderr
    empty = ptpipe_no_torch(tmp_path, "serve", "--models-dir", str(tmp_path), cwd=tmp_path)
    assert empty.returncode == 2 and "no exported model" in empty.stderr and "Traceback" not in empty.stderr


@pytest.mark.slow
def test_registry_versions_and_stage_from_a_fresh_clone(workspace, tmp_path):
    v2 = export_models(tmp_path / "v2", seed=1) / "cnn/model.onnx"
    v1 = workspace / "models/cnn/model.onnx"
    repo = model_registry(tmp_path / "repo", tmp_path / "remote",
                          [("v1.0.0", v1, {"test": {"acc": 0.5}}), ("v1.1.0", v2, {"test": {"acc": 0.6}})])
    registry.promote("tiny-cnn", "v1.0.0", "prod", repo=repo)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=tool_env())
    cache = tmp_path / "cache"
    os.environ["PTPIPE_CACHE"] = str(cache)  # tool_env() hands it to the server: a cache of its own
    try:
        srv = Server(tmp_path, "--model", "tiny-cnn@v1.1.0", "--model", "live=tiny-cnn#prod", "--repo", str(clone),
                     cwd=tmp_path)
    finally:
        del os.environ["PTPIPE_CACHE"]
    blob = png(images(1, seed=2)[0])
    expected = {v: inference.ImageClassifier(p).top_k(inference.load_image(io.BytesIO(blob))[None], 1)[0][0][0]
                for v, p in (("v1.0.0", v1), ("v1.1.0", v2))}
    try:
        def served(name):
            r = httpx.post(srv.url + f"/v1/models/{name}/classify", files={"images": blob}).json()
            return r["version"], r["predictions"][0]["labels"][0]["label"]

        assert served("tiny-cnn") == ("v1.1.0", expected["v1.1.0"])
        assert served("live") == ("v1.0.0", expected["v1.0.0"])
        fetched = sorted(cache.rglob("model.onnx"))
        assert sorted(files.digest(p, "md5") for p in fetched) == sorted(files.digest(p, "md5") for p in (v1, v2))
        unchanged = httpx.post(srv.url + "/v2/repository/models/live/load").json()
        assert unchanged == {"name": "live", "version": "v1.0.0", "changed": False}
        time.sleep(1.1)  # GTO orders stage assignments by their tag's time, in whole seconds
        registry.promote("tiny-cnn", "v1.1.0", "prod", repo=clone)
        moved = httpx.post(srv.url + "/v2/repository/models/live/load").json()
        assert moved == {"name": "live", "version": "v1.1.0", "previous": "v1.0.0", "changed": True}
        assert served("live") == ("v1.1.0", expected["v1.1.0"])
    finally:
        srv.stop()
