"""`ptpipe serve` against the Open Inference Protocol's real clients (tritonclient's HTTP client, its
defaults: binary tensors both ways; kserve's InferenceRESTClient), and against hostile input: a
property-based test over every endpoint, decompression bombs, oversized headers, slow and aborted
bodies. Real server (the CLI under the torch blocker, tests/test_serve.Server) on loopback; results
compared with onnxruntime run directly. No timed assertions: waits are bounded, orderings are checked.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import os
import shutil
import socket
import struct
import zlib
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from fixtures import ROOT, write_models
from test_serve import Server, images, png
from ptpipe import export, inference



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project folder: the project's dvc.yaml (artifact names), models/{cnn,lstm,gpt} exported."""
    root = tmp_path_factory.mktemp("oip")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_models(root / "models", seed=0)
    for kind in ("cnn", "lstm", "gpt"):
        export.export(root / "models" / kind, ROOT / "params.yaml", revision="abc123")
    return root


@pytest.fixture(scope="module")
def oip(workspace):
    srv = Server(workspace / "tmp", "--max-body-mb", "4", "--body-timeout-s", "2", cwd=workspace)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def runtime(workspace):
    return {kind: inference.open_model(workspace / f"models/{kind}/model.onnx") for kind in ("cnn", "lstm", "gpt")}


def triton(server) -> "tritonhttp.InferenceServerClient":
    return tritonhttp.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)


def test_tritonclient_defaults_are_binary_both_ways(oip, runtime):
    client, x = triton(oip), images(3, seed=4)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cifar10-cnn")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    given = tritonhttp.InferInput("images", list(x.shape), "UINT8")
    given.set_data_from_numpy(x)  # binary_data=True by default; no outputs named: binary outputs
    result = client.infer("cifar10-cnn", [given], request_id="r7")
    assert result.get_response()["id"] == "r7"
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 3 * 10 * 4
    np.testing.assert_allclose(result.as_numpy("logits"), runtime["cnn"].logits(x), atol=1e-5)


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, False), (False, True)])
def test_tritonclient_json_and_mixed_tensors_on_a_three_input_model(oip, runtime, binary_in, binary_out):
    client, rng = triton(oip), np.random.default_rng(0)
    ids = rng.integers(0, len(runtime["lstm"].vocab), (2, 5)).astype(np.int64)
    h0 = rng.standard_normal((2, 2, 16)).astype(np.float32)
    c0 = rng.standard_normal((2, 2, 16)).astype(np.float32)
    inputs = []
    for name, array, datatype in (("ids", ids, "INT64"), ("h0", h0, "FP32"), ("c0", c0, "FP32")):
        inputs.append(tritonhttp.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array, binary_data=binary_in)
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=binary_out) for n in ("logits", "h")]
    result = client.infer("alice-lstm", inputs, outputs=outputs)
    want = dict(zip(["logits", "h", "c"], runtime["lstm"].session.run(None, {"ids": ids, "h0": h0, "c0": c0})))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits", "h"]
    for name in ("logits", "h"):
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-5)


def test_tritonclient_classification_and_compressed_requests(oip, runtime):
    client, x = triton(oip), images(2, seed=8)
    given = tritonhttp.InferInput("images", list(x.shape), "UINT8")
    given.set_data_from_numpy(x)
    logits = runtime["cnn"].logits(x)
    for compression in ("gzip", "deflate"):
        result = client.infer("cifar10-cnn", [given], outputs=[tritonhttp.InferRequestedOutput("logits", class_count=3)],
                              request_compression_algorithm=compression)
        top = result.as_numpy("logits")
        assert top.shape == (2, 3)
        for row, scores in zip(top, logits):
            order = np.argsort(-scores, kind="stable")[:3]
            value, index, label = row[0].decode().split(":")
            assert [int(r.decode().split(":")[1]) for r in row] == list(order)
            assert label == runtime["cnn"].classes[order[0]] and float(value) == pytest.approx(scores[order[0]], abs=1e-5)


def test_tritonclient_reads_every_error_and_unsupported_calls_are_named(oip):
    client = triton(oip)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    for call, words in ((lambda: client.get_model_config("cifar10-cnn"), "model configuration"),
                        (lambda: client.get_inference_statistics(), "statistics"),
                        (lambda: client.unload_model("cifar10-cnn"), "unload"),
                        (lambda: client.get_system_shared_memory_status(), "shared memory"),
                        (lambda: client.get_trace_settings(), "trace"),
                        (lambda: client.get_log_settings(), "log settings")):
        with pytest.raises(InferenceServerException, match=words) as err:
            call()
        assert err.value.status() == "501"
    with pytest.raises(InferenceServerException, match="parameters.config is not supported"):
        client.load_model("cifar10-cnn", config=json.dumps({"backend": "onnxruntime"}))
    client.load_model("cifar10-cnn")  # the plain reload: unchanged file, 200
    for path in ("/nowhere", "/v2/models/cifar10-cnn/infer"):  # unknown route; wrong method (GET)
        r = httpx.get(oip.url + path)
        assert r.status_code in (404, 405) and set(r.json()) == {"error", "field"}, r.text
    assert "not_here" not in httpx.get(oip.url + "/v2").text


def test_kserve_rest_client_json_and_binary(oip, runtime):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x = images(2, seed=9)

    async def calls():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            assert await client.is_server_ready(oip.url) and await client.is_model_ready(oip.url, "cifar10-cnn")
            answers = []
            for binary in (False, True):
                given = InferInput("images", list(x.shape), "UINT8")
                given.set_data_from_numpy(x, binary_data=binary)
                answers.append(await client.infer(oip.url, InferRequest("cifar10-cnn", [given]), "cifar10-cnn"))
            return answers
        finally:
            await client.close()

    for answer in asyncio.run(calls()):
        np.testing.assert_allclose(answer.outputs[0].as_numpy(), runtime["cnn"].logits(x), atol=1e-5)


def _infer(server, model: str, tensors: list, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": tensors, **extra}, timeout=60)


def test_integral_floats_are_integers_and_the_rest_is_a_400_naming_the_field(oip, runtime):
    x = images(1, seed=1)
    as_floats = _infer(oip, "cifar10-cnn", [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                                             "data": [float(v) for v in x.ravel()]}])
    assert as_floats.status_code == 200, as_floats.text
    np.testing.assert_allclose(as_floats.json()["outputs"][0]["data"], runtime["cnn"].logits(x).ravel(), atol=1e-5)
    half = _infer(oip, "cifar10-cnn", [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                                        "data": [0.5] * 3072}])
    assert half.status_code == 400 and half.json()["field"] == "inputs[0].data" and "3.0" in half.json()["error"]
    nan = httpx.post(oip.url + "/v2/models/alice-lstm/infer", content=b'{"inputs": [{"name": "h0", "shape": [2, 1, 16], '
                     b'"datatype": "FP32", "data": [NaN]}]}')
    assert nan.status_code == 400 and "NaN is not JSON" in nan.json()["error"]
    raw = np.full(32, np.inf, np.float32).tobytes()
    head = json.dumps({"inputs": [
        {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]},
        {"name": "h0", "shape": [2, 1, 16], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}},
        {"name": "c0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0] * 32}]}).encode()
    inf = httpx.post(oip.url + "/v2/models/alice-lstm/infer", content=head + raw,
                     headers={"Inference-Header-Content-Length": str(len(head))})
    assert inf.status_code == 400 and inf.json()["field"] == "inputs[1].parameters" and "finite" in inf.text


def test_an_output_too_large_for_json_is_a_400_asking_for_binary(oip, runtime):
    vocab = len(runtime["lstm"].vocab)
    batch = 2**20 // (4096 * vocab) + 1  # logits of batch x 4096 ids: just over max_json_values
    ids = np.ones((batch, 4096), np.int64)
    inputs = [tritonhttp.InferInput("ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    for name in ("h0", "c0"):
        inputs.append(tritonhttp.InferInput(name, [2, batch, 16], "FP32"))
        inputs[-1].set_data_from_numpy(np.zeros((2, batch, 16), np.float32))
    with pytest.raises(InferenceServerException, match=r"ask for it binary \(outputs\[0\]"):
        triton(oip).infer("alice-lstm", inputs, outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=False)])
    binary = triton(oip).infer("alice-lstm", inputs, outputs=[tritonhttp.InferRequestedOutput("logits")])
    assert binary.as_numpy("logits").shape == (batch, 4096, vocab)


def test_json_size_and_compression_limits(oip):
    url = oip.url + "/v2/models/cifar10-cnn/infer"
    big = httpx.post(url, content=b'{"inputs": [' + b" " * (3 * 2**20) + b"]}", timeout=60)  # 3 MiB of JSON
    assert big.status_code == 413 and big.json()["field"] == "body" and "send large tensors binary" in big.text
    bomb = gzip.compress(b"0" * (64 * 2**20))  # 64 MiB of zeros in ~64 KB: inflating stops at --max-body-mb
    inflated = httpx.post(url, content=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
    assert inflated.status_code == 413 and "inflates to more than" in inflated.json()["error"]
    brotli = httpx.post(url, content=b"{}", headers={"Content-Encoding": "br"})
    assert brotli.status_code == 415 and brotli.json()["field"] == "Content-Encoding"


def _gpt_inputs(ids: int, past: int) -> list[dict]:
    """gpt's inputs (the fixture: 2 layers, 2 heads of 8): `ids` ids after `past` cached positions."""
    return [{"name": "ids", "shape": [1, ids], "datatype": "INT64", "data": [1] * ids},
            {"name": "pad", "shape": [1], "datatype": "INT64", "data": [0]},
            *({"name": f"past_key_values.{i}.{part}", "shape": [1, 2, past, 8], "datatype": "FP32",
               "data": [0.0] * (16 * past)} for part in ("key", "value") for i in (0, 1))]


def test_a_cached_model_refuses_more_positions_than_its_block_size_cleanly(oip, runtime):
    block = runtime["gpt"].meta["generation"]["block_size"]
    ok = _infer(oip, "alice-gpt", _gpt_inputs(block, 0))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"][:2] == [1, block]
    step = _infer(oip, "alice-gpt", _gpt_inputs(1, block - 1))  # one id after a full cache: the last position
    assert step.status_code == 200 and step.json()["outputs"][1]["shape"][2] == block, step.text
    for inputs, field in ((_gpt_inputs(block + 1, 0), "inputs[0].shape"), (_gpt_inputs(1, block + 1), "inputs[2].shape")):
        over = _infer(oip, "alice-gpt", inputs)
        assert over.status_code == 400 and over.json()["field"] == field
        assert f"over the limit of {block}" in over.json()["error"]
    both = _infer(oip, "alice-gpt", _gpt_inputs(2, block - 1))  # each within the block, together past it
    assert both.status_code == 400 and both.json()["field"] == "inputs"
    assert "onnxruntime_src" not in both.text and "0x" not in both.text
    lstm = _infer(oip, "alice-lstm", [{"name": "ids", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]},
                                      {"name": "h0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0] * 32},
                                      {"name": "c0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0] * 32}])
    assert lstm.status_code == 400 and lstm.json()["field"] == "inputs"  # batch 2 vs 1: onnxruntime's own check
    assert "onnxruntime_src" not in lstm.text and "0x" not in lstm.text


# -- no input reaches a 500 ------------------------------------------------------------------

MODELS = ["cifar10-cnn", "alice-lstm", "alice-gpt"]
BLOBS = [b"3", b"0", b"\xc2\xb2", png(images(1, seed=3)[0]), png(images(1, seed=3)[0], "JPEG", (40, 30)),
         png(images(1, seed=3)[0])[:60]]  # top_k values; a PNG, a JPEG, a cut PNG
UNSUPPORTED = ("/config", "/stats", "/unload", "sharedmemory", "/trace/setting", "/v2/logging")
TEXT = st.text(st.characters(exclude_categories=()), max_size=8) | st.sampled_from(["\ud800", "x\udfff", "²", "٣"])
SCALAR = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


@st.composite
def tensors(draw):
    """An infer input, mostly near a valid one so that the checks past the first are reached too."""
    name = draw(st.sampled_from(["images", "ids", "h0", "c0"]) | JSON)
    shape = draw(st.lists(st.integers(-1, 40), min_size=1, max_size=4) | JSON)
    datatype = draw(st.sampled_from(["UINT8", "INT64", "FP32", "BYTES"]) | JSON)
    size = max(0, min(math.prod(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else 3, 64))
    data = draw(st.lists(st.integers(-300, 300) | st.floats(allow_nan=False), min_size=size, max_size=size) | JSON)
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.fixed_dictionaries({}, optional={
            "binary_data_size": st.integers(-2, 64) | JSON, "shared_memory_region": TEXT}) | JSON)
    return tensor


@st.composite
def requests_(draw):
    """(method, path, headers, body) over every route, with bodies shaped like each endpoint's."""
    model = draw(st.sampled_from(MODELS) | TEXT.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")))
    kind = draw(st.sampled_from(["infer", "generate", "load", "multipart", "json", "bytes"]))
    own = {"infer": "/v2/models/{m}/infer", "generate": "/v1/models/{m}/generate", "multipart": "/v1/models/{m}/classify",
           "load": "/v2/repository/models/{m}/load"}.get(kind)
    path = own.format(m=model) if own and draw(st.integers(0, 9)) < 7 else draw(st.sampled_from([
        "/v2/models/{m}/infer", "/v2/models/{m}/versions/v1/infer", "/v1/models/{m}/classify",
        "/v1/models/{m}/generate", "/v2/repository/models/{m}/load", "/v2/repository/index", "/v2/models/{m}",
        "/v2/models/{m}/ready", "/v2/health/live", "/v2", "/v1/models", "/metrics", "/v2/models/{m}/config",
        "/v2/repository/models/{m}/unload", "/v2/systemsharedmemory/status", "/{m}"])).format(m=model)
    headers = draw(st.fixed_dictionaries({}, optional={
        "content-type": st.sampled_from(["application/json", "application/octet-stream", "multipart/form-data",
                                         "multipart/form-data; boundary=B", "text/plain"]),
        "content-encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "x"]),
        "inference-header-content-length": st.integers(-1, 400).map(str) | st.sampled_from(["²", "1e3", ""])}))
    headers = {k: v.encode() for k, v in headers.items()}  # bytes: "²" is not ASCII
    if kind == "infer":
        body = {"inputs": draw(st.lists(tensors(), max_size=3) | JSON)}
        body.update(draw(st.fixed_dictionaries({}, optional={
            "id": TEXT | JSON, "outputs": st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "h", "c"]) | JSON},
                optional={"parameters": st.fixed_dictionaries({}, optional={
                    "binary_data": JSON, "classification": st.integers(-1, 12) | JSON})})) | JSON,
            "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": JSON, "sequence_id": JSON})})))
        body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))
    elif kind == "generate":
        body = draw(st.fixed_dictionaries({}, optional={
            "prompt": TEXT | st.sampled_from(["Alice", "Alice" * 500]), "length": st.integers(-2, 6000) | JSON,
            "temperature": st.floats() | JSON, "seed": st.integers(-1, 2**64) | JSON, "stream": JSON}))
        body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))
    elif kind == "load":
        body = draw(st.fixed_dictionaries({}, optional={"parameters": st.dictionaries(TEXT, JSON, max_size=2) | JSON}))
    elif kind == "multipart":
        parts = draw(st.lists(st.tuples(st.sampled_from(["images", "top_k", "x"]) | TEXT, st.booleans(),
                                        st.binary(max_size=40) | st.sampled_from(BLOBS)), max_size=4))
        body = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"" + n.encode("utf-8", "surrogatepass")
                        + (b"\"; filename=\"f.png" if f else b"") + b"\"\r\n\r\n" + d + b"\r\n" for n, f, d in parts)
        return "POST", path, {**headers, "content-type": b"multipart/form-data; boundary=B"}, body + b"--B--\r\n"
    elif kind == "json":
        body = draw(JSON)
    else:
        return draw(st.sampled_from(["GET", "POST", "PUT"])), path, headers, draw(st.binary(max_size=64))
    content = json.dumps(body).encode()
    if headers.get("content-encoding") in (b"gzip", b"deflate") and draw(st.booleans()):
        content = gzip.compress(content) if headers["content-encoding"] == b"gzip" else zlib.compress(content)
    return "POST", path, headers, content


# 120 examples: ~10 s on an idle 2-core VM; PTPIPE_FUZZ_EXAMPLES=2000 for a longer search
@settings(max_examples=int(os.environ.get("PTPIPE_FUZZ_EXAMPLES", "120")), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(requests_())
@example(("POST", "/v2/models/cifar10-cnn/infer", {}, b"[" * 10000 + b"]" * 10000))
@example(("POST", "/v2/models/alice-lstm/infer", {}, b'{"inputs": [{"name": "h0", "shape": [2, 1, 16], '
                                                    b'"datatype": "FP32", "data": [Infinity]}]}'))
@example(("POST", "/v1/models/cifar10-cnn/classify", {"content-type": "multipart/form-data; boundary=B"},
          b"--B\r\nContent-Disposition: form-data; name=top_k\r\n\r\n\xc2\xb2\r\n--B--\r\n"))
@example(("POST", "/v1/models/alice-lstm/generate", {}, b'{"prompt": "Alice", "temperature": 1' + b"0" * 400 + b"}"))
def test_no_input_reaches_a_500(oip, request_):
    method, path, headers, body = request_
    with httpx.Client(base_url=oip.url, timeout=60) as client:
        try:
            r = client.request(method, path, headers=headers, content=body)
        except httpx.InvalidURL:  # a path httpx itself will not send
            return
        assert r.status_code < 500 or (r.status_code == 501 and any(u in path for u in UNSUPPORTED)), (
            r.status_code, r.text)
        if r.status_code >= 400:
            error = r.json()
            assert set(error) == {"error", "field"} and error["field"] and error["error"], error
            assert "onnxruntime_src" not in r.text and " at 0x" not in r.text
        assert client.get("/v2/health/ready").json() == {"ready": True}


# -- bounded memory and time -----------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and carries a few bytes of pixels: what a bomb's header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_from_its_header(oip):
    big = io.BytesIO()
    Image.new("L", (5000, 4000)).save(big, "PNG")  # 20 MP of zeros: a 20 KB file
    for blob in (_png_header(12000, 12000), big.getvalue()):
        r = httpx.post(oip.url + "/v1/models/cifar10-cnn/classify", files={"images": ("bomb.png", blob)}, timeout=60)
        assert r.status_code == 400 and r.json()["field"] == "images[0]", r.text
        assert "image too large" in r.json()["error"] and "16,000,000" in r.json()["error"]


def _raw_http(server, payload: bytes, then_close: bool = False) -> bytes:
    """Send `payload` on a fresh loopback connection and read until the server closes it (bounded)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(payload)
        if then_close:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_headers_are_a_431_and_the_connection_closes(oip):
    too_big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    too_many = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n"
    never_ends = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000  # no end of line: still read
    for payload in (too_big, too_many, never_ends):
        answer = _raw_http(oip, payload)  # returns once the server closed the connection
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431") and json.loads(body)["field"] == "headers", answer[:300]
    ok = _raw_http(oip, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 500) for i in range(98)) + b"\r\n")
    assert ok.startswith(b"HTTP/1.1 200")  # 100 fields, 50 KB: within the limits


def test_a_slow_body_is_a_408_and_an_aborted_one_one_log_line(oip):
    head = (b"POST /v2/models/cifar10-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"in")
    answer = _raw_http(oip, head)  # 5 of 1000 bytes, then silence: --body-timeout-s 2 answers and closes
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and b"connection: close" in status.lower(), answer[:300]
    assert json.loads(body)["field"] == "body"
    _raw_http(oip, head, then_close=True)  # the client goes away mid-body
    for _ in range(600):  # bounded wait for the server to notice (it logs when the read fails)
        if "went away" in oip.log.read_text():
            break
        asyncio.run(asyncio.sleep(0.05))
    log = oip.log.read_text()
    assert log.count("went away") == 1 and "Traceback" not in log, log


def test_metrics_labels_stay_a_fixed_set(oip):
    def label_sets() -> set:
        return {line.split("}")[0] for line in httpx.get(oip.url + "/metrics").text.splitlines()
                if line.startswith("ptpipe_requests_total{")}

    label_sets()  # the scrape itself is counted once it has answered
    with httpx.Client(base_url=oip.url) as client:
        for i in range(20):
            client.get(f"/junk{i}/x"), client.post(f"/v2/models/m{i}/infer", json={})
        first = label_sets()
        for i in range(20, 60):
            client.get(f"/junk{i}/x"), client.post(f"/v2/models/m{i}/infer", json={})
    assert label_sets() == first  # 80 more unknown paths and models: no new series
    assert 'endpoint="other",model=""' in "".join(first) and 'endpoint="infer",model="_unknown"' in "".join(first)


def test_every_model_call_is_counted_in_the_batch_size_metric(oip):
    def calls() -> float:
        lines = httpx.get(oip.url + "/metrics").text.splitlines()
        return sum(float(l.split()[-1]) for l in lines if l.startswith('ptpipe_batch_size_count{model="alice-lstm"}'))

    before = calls()
    step = _infer(oip, "alice-lstm", [{"name": "ids", "shape": [3, 1], "datatype": "INT64", "data": [1, 2, 3]},
                                      {"name": "h0", "shape": [2, 3, 16], "datatype": "FP32", "data": [0] * 96},
                                      {"name": "c0", "shape": [2, 3, 16], "datatype": "FP32", "data": [0] * 96}])
    assert step.status_code == 200, step.text
    assert calls() == before + 1  # not micro-batched (3 inputs), still one call counted


def test_a_bug_is_one_logged_traceback_a_json_500_and_counted(caplog):
    from starlette.routing import Route

    from ptpipe import serve

    async def broken(request):
        raise RuntimeError("a bug")

    app = serve.create_app([], routes=[Route("/broken", broken), *serve.ROUTES])

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.get("/broken"), (await client.get("/metrics")).text

    with caplog.at_level("ERROR", logger="ptpipe.serve"):
        r, metrics = asyncio.run(calls())
    assert r.status_code == 500 and r.json() == {"error": "internal error (logged by the server)", "field": None}
    assert 'ptpipe_request_errors_total{endpoint="other",model="",status="500"} 1.0' in metrics
    assert [rec.exc_info[0] for rec in caplog.records] == [RuntimeError]


def test_health_answers_while_the_largest_requests_are_decoded_and_parsed(oip):
    photo = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 120, 200)).save(photo, "PNG")  # 16 MP: at the pixel limit
    biggest_json = {"inputs": [{"name": "images", "shape": [64, 3, 32, 32], "datatype": "UINT8",
                                "data": [255] * (64 * 3072)}]}
    done = []

    async def heavy(client, i):
        if i % 2:
            r = await client.post("/v1/models/cifar10-cnn/classify", files=[("images", ("p.png", photo.getvalue()))] * 6)
        else:
            r = await client.post("/v2/models/cifar10-cnn/infer", json=biggest_json)
        assert r.status_code == 200, r.text
        done.append("heavy")

    async def health(client):
        while len([d for d in done if d == "heavy"]) < 6:
            assert (await client.get("/v2/health/live")).status_code == 200
            done.append("health")

    async def scenario():
        async with httpx.AsyncClient(base_url=oip.url, timeout=120) as client:
            await asyncio.gather(*[heavy(client, i) for i in range(6)], health(client))

    asyncio.run(scenario())
    # answered in between, not after: the loop was never held by a decode or a parse for their whole time
    assert done.index("heavy") > 1 and done[:done.index("heavy")].count("health") >= 2, done
