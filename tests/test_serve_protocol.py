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
import shutil
import socket
import zlib

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
