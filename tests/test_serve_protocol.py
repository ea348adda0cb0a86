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
import shutil
import socket
import zlib
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from fixtures import ROOT, write_models
from test_serve import Server, images, png
from ptpipe import export, inference, protocol

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project folder: the project's dvc.yaml (artifact names), models/{cnn,lstm,gpt} exported."""
    root = tmp_path_factory.mktemp("oip")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_models(root / "models", seed=0)
    for kind in ("cnn", "lstm", "gpt"):
        export.export_model(kind, root / "models" / kind, opset=17, revision="abc123")
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


def test_a_window_model_refuses_more_ids_than_its_block_size_cleanly(oip, runtime):
    block = runtime["gpt"].meta["generation"]["block_size"]
    ok = _infer(oip, "alice-gpt", [{"name": "ids", "shape": [1, block], "datatype": "INT64", "data": [1] * block}])
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"][:2] == [1, block]
    over = _infer(oip, "alice-gpt", [{"name": "ids", "shape": [1, block + 1], "datatype": "INT64",
                                      "data": [1] * (block + 1)}])
    assert over.status_code == 400 and over.json()["field"] == "inputs[0].shape"
    assert f"over the limit of {block}" in over.json()["error"]
    lstm = _infer(oip, "alice-lstm", [{"name": "ids", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]},
                                      {"name": "h0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0] * 32},
                                      {"name": "c0", "shape": [2, 1, 16], "datatype": "FP32", "data": [0] * 32}])
    assert lstm.status_code == 400 and lstm.json()["field"] == "inputs"  # batch 2 vs 1: onnxruntime's own check
    assert "onnxruntime_src" not in lstm.text and "0x" not in lstm.text


# -- no input reaches a 500 ------------------------------------------------------------------

from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

MODELS = ["cifar10-cnn", "alice-lstm", "alice-gpt"]
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
    path = draw(st.sampled_from([
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
    kind = draw(st.sampled_from(["infer", "generate", "load", "multipart", "json", "bytes"]))
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
                                        st.binary(max_size=40) | st.sampled_from([b"3", b"0", b"\xc2\xb2"])), max_size=4))
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


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
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
