"""`ptpipe serve`'s text generation under concurrency: requests share every step's model calls (continuous
batching), each one's text is what it gets alone, and a client that disconnects mid-stream frees its row.

Real `ptpipe serve` under the torch blocker (test_serve.Server), real uvicorn, httpx clients; the tiny
seeded fixture models (the LSTM and gpt, block_size 128) exported by the project's export.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from fixtures import ROOT, write_models
from ptpipe import export, inference
from test_serve import Server

MODELS = {"alice-lstm": "lstm", "alice-gpt": "gpt"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-generate")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_models(root / "models")
    for folder in MODELS.values():
        export.export(root / "models" / folder, ROOT / "params.yaml", revision="abc123")
    return root


@pytest.fixture(scope="module")
def server(workspace):
    srv = Server(workspace / "tmp", *[a for folder in MODELS.values() for a in ("--model", f"models/{folder}")],
                 cwd=workspace)
    yield srv
    srv.stop()


def prompts(vocab: list[str]) -> list[str]:
    """16 prompts of 1 to 150 characters (gpt's block is 128: the longest start past it, the others cross it)."""
    letters = [c for c in vocab if c.isalpha()]
    return ["".join(letters[(i * 7 + j) % len(letters)] for j in range(n))
            for i, n in enumerate([1, 3, 5, 8, 13, 21, 34, 55, 89, 126, 127, 128, 129, 140, 150, 2])]


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, list[str]]:
    """(the done event's text, the characters streamed before it)."""
    chars, done = [], None
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if event == "done":
                    done = data["text"]
                elif event is None:
                    chars.append(data["text"])
                event = None
    return done, chars


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("name", list(MODELS))
def test_sixteen_concurrent_generations_share_steps_and_each_gets_its_text_alone(server, workspace, name):
    runtime = inference.TextGenerator(workspace / "models" / MODELS[name] / "model.onnx")
    bodies = [{"prompt": p, "length": 150, "temperature": 1.0, "seed": i} for i, p in enumerate(prompts(runtime.vocab))]
    alone = [runtime.generate(b["prompt"], b["length"], b["temperature"], b["seed"]) for b in bodies]  # ptpipe generate's
    url = server.url + f"/v1/models/{name}/generate"
    assert httpx.post(url, json=bodies[4], timeout=60).json()["text"] == alone[4]  # one alone on the server
    steps_before = _metric(server.url, "ptpipe_batch_size_count", name)
    chars_before = _metric(server.url, "ptpipe_generated_characters_total", name)

    async def clients():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as client:
            streams = [_stream(client, url, b) for b in bodies[:8]]
            plain = [client.post(url, json=b) for b in bodies[8:]]  # streamed or not: one batch
            return await asyncio.gather(*streams, *plain)

    results = asyncio.run(clients())
    for (done, chars), want, body in zip(results[:8], alone, bodies):
        assert done == want and body["prompt"] + "".join(chars) == want
    assert [r.json()["text"] for r in results[8:]] == alone[8:]
    assert len(set(alone)) == 16
    generated = _metric(server.url, "ptpipe_generated_characters_total", name) - chars_before
    steps = _metric(server.url, "ptpipe_batch_size_count", name) - steps_before
    assert generated == 16 * 150  # every character drawn once ...
    assert steps < generated / 2  # ... in shared steps: on average more than 2 rows a step
    assert _metric(server.url, "ptpipe_generations", name) == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_a_client_that_disconnects_mid_stream_frees_its_row_and_the_others_finish(server, workspace, name):
    runtime = inference.TextGenerator(workspace / "models" / MODELS[name] / "model.onnx")
    body = {"prompt": runtime.vocab[-1], "length": 5000, "temperature": 1.0}  # the longest a request may ask for
    url = server.url + f"/v1/models/{name}/generate"
    before = _metric(server.url, "ptpipe_generated_characters_total", name)

    async def clients():
        async with httpx.AsyncClient(timeout=120) as client:
            async def leaver():
                async with client.stream("POST", url, json={**body, "seed": 1, "stream": True}) as r:
                    lines = 0
                    async for _ in r.aiter_lines():
                        lines += 1
                        if lines > 10:  # a few characters in, the client goes away
                            break
            return await asyncio.gather(leaver(), _stream(client, url, {**body, "seed": 2}))

    _, (done, chars) = asyncio.run(clients())
    assert len(chars) == 5000 and done == runtime.generate(body["prompt"], 5000, 1.0, 2)
    generated = _metric(server.url, "ptpipe_generated_characters_total", name) - before
    assert 5000 < generated < 2 * 5000  # the leaver's row stopped long before its 5000
    assert _metric(server.url, "ptpipe_generations", name) == 0


def test_without_batching_each_generation_runs_alone_with_the_same_text(workspace):
    srv = Server(workspace / "tmp", "--no-batching", "--model", "models/gpt", cwd=workspace)
    try:
        runtime = inference.TextGenerator(workspace / "models/gpt/model.onnx")
        body = {"prompt": prompts(runtime.vocab)[9], "length": 40, "temperature": 1.0, "seed": 3}  # crosses the block
        want = runtime.generate(body["prompt"], 40, 1.0, 3)
        url = srv.url + "/v1/models/alice-gpt/generate"
        assert httpx.post(url, json=body, timeout=60).json()["text"] == want

        async def streamed():
            async with httpx.AsyncClient(timeout=60) as client:
                return await _stream(client, url, body)

        done, chars = asyncio.run(streamed())
        assert done == want and len(chars) == 40
        assert _metric(srv.url, "ptpipe_generated_characters_total", "alice-gpt") == 0  # no batch was used
    finally:
        srv.stop()
