"""`ptpipe serve`: an HTTP inference server for the exported models (Starlette on uvicorn, onnxruntime only).

    ptpipe serve                                   # every models/*/model.onnx of the workspace
    ptpipe serve --model cifar10-cnn#prod --repo https://github.com/me/project --poll-s 60
    curl -F images=@cat.jpg localhost:8000/v1/models/cifar10-cnn/classify

Endpoints (docs/serving.md has a curl line for each): the Open Inference Protocol v2 (KServe /
Triton REST, with its binary tensor data, classification and model repository extensions; the
tensor codec is ptpipe.protocol), two endpoints for people (classify, generate) and /metrics.
Every handler is a module-level function of the request; `ROUTES` lists them.

The server is task-generic: a model's task (image-classification | text-generation) and its
tensors come from the ONNX file, so any kind the pipeline exports is served without code here.
Every response names the model and its version (body, and X-Model-Name / X-Model-Version headers).
Every error, unknown routes included, is the protocol's error object `{"error": ...}` plus the
`field` at fault. What a request may cost is bounded by ptpipe.limits.Limits. Nothing here imports torch.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import itertools
import json
import logging
import math
import re
import struct
import sys
import time
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import ptpipe
from ptpipe import inference, predlog, protocol, served as served_mod
from ptpipe.batching import Generations, MicroBatcher
from ptpipe.limits import Limits, LogOptions
from ptpipe.protocol import ApiError
from ptpipe.stage import StageError

log = logging.getLogger("ptpipe.serve")
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval of the server process (main() says why)
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ON_LOOP_PIXELS = 64 * 64  # a PNG this small decodes in ~0.1 ms on the event loop, less than a hop to a thread
OFF_LOOP_BYTES = 64 * 2**10  # bodies above this are parsed in a thread (a 64 KiB JSON body: ~1 ms)


@dataclass(frozen=True)
class Options:
    batching: bool = True
    window_s: float = 0.002
    # One intra-op thread: onnxruntime's pool spins between calls, and on 2 cores the spinning thread
    # starves the event loop (measured 6.4 -> 2.7 ms of server CPU per classify request, under load).
    threads: int = 1
    poll_s: float = 0.0                # re-resolve every model this often (0: only on POST .../load)
    limits: Limits = Limits()
    log: LogOptions | None = None      # the prediction log (ptpipe.predlog); None: nothing is logged


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


# -- metrics --------------------------------------------------------------------------------

ENDPOINTS = {"infer", "classify", "generate", "feedback", "ready", "live", "load", "unload", "index", "config",
             "stats", "metrics"}  # with metadata, models, server and other: the only values of the endpoint label


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ("model", "endpoint")
        self.requests = Counter("ptpipe_requests", "HTTP requests", labels, registry=self.registry)
        self.errors = Counter("ptpipe_request_errors", "requests answered 4xx/5xx", labels + ("status",),
                              registry=self.registry)
        self.latency = Histogram("ptpipe_request_duration_seconds", "time from request to the last response byte",
                                 labels, registry=self.registry,
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        self.batch = Histogram("ptpipe_batch_size", "rows per onnxruntime call", ("model",),
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.info = Gauge("ptpipe_model_info", "1 for the version served now", ("model", "version", "kind", "task",
                                                                                   "source"), registry=self.registry)
        self.reloads = Counter("ptpipe_model_reloads", "reload attempts", ("model", "result"), registry=self.registry)
        self.generating = Gauge("ptpipe_generations", "text generations running or waiting now", ("model",),
                                registry=self.registry)
        self.generated = Counter("ptpipe_generated_characters", "characters generated", ("model",),
                                 registry=self.registry)

    def serving(self, new, old=None) -> None:
        if old is not None:
            self.info.remove(old.name, old.version, old.kind, old.task, old.spec.source)
        self.info.labels(new.name, new.version, new.kind, new.task, new.spec.source).set(1)


def _labels(path: str, known) -> tuple[str, str]:
    """(model, endpoint) labels of a path, from fixed sets whatever the path: a served model's name,
    '_unknown' or ''; one of ENDPOINTS, 'metadata', 'models', 'server' or 'other'."""
    parts = path.strip("/").split("/")
    model = ""
    if len(parts) >= 3 and parts[0] in ("v1", "v2") and parts[1] == "models" and parts[2] != "stats":
        model = parts[2]
    elif len(parts) >= 4 and parts[:3] == ["v2", "repository", "models"]:
        model = parts[3]
    if model:
        model = model if model in known else "_unknown"
    if parts[-1] in ENDPOINTS:
        return model, parts[-1]
    if model and len(parts) in (3, 5):  # /v2/models/{name}[/versions/{v}]
        return model, "metadata"
    return model, {"v2": "server", "v1/models": "models"}.get("/".join(parts), "other")


async def _send_error(send, status: int, message: str, field: str | None, close: bool = False) -> None:
    body = protocol.dumps({"error": message, "field": field})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


class Observe:
    """ASGI middleware around everything: the body's size (413) and time (408) limits, and the request
    metrics, 500s included (a bug is logged once, answered as a JSON 500, and the server lives on)."""

    def __init__(self, app, state: "State"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.state.options.limits
        model, endpoint = _labels(scope["path"], self.state.models)
        start, status = time.perf_counter(), [0]

        async def send_observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > limits.max_body_bytes:
                await _send_error(send_observed, 413, f"request body of {int(length)} bytes is over the limit of "
                                                      f"{limits.max_body_bytes}", "body", close=True)
            else:
                await self.app(scope, _limited(receive, limits, start), send_observed)
        except Exception:  # re-raised by Starlette's ServerErrorMiddleware after its JSON 500 went out
            log.exception("internal error answering %s %s", scope["method"], scope["path"][:200])
            if not status[0]:
                await _send_error(send_observed, 500, "internal error (logged by the server)", None)
        metrics = self.state.metrics
        metrics.requests.labels(model, endpoint).inc()
        metrics.latency.labels(model, endpoint).observe(time.perf_counter() - start)
        if status[0] >= 400:
            metrics.errors.labels(model, endpoint, str(status[0])).inc()


def _limited(receive, limits: Limits, start: float):
    """`receive` that raises BodyTooLarge past max_body_bytes (a chunked body has no Content-Length)
    and BodyTimeout when the body has not all arrived body_timeout_s after the request began."""
    seen, done = [0], [False]

    async def receive_limited():
        if done[0]:  # the body is read: what is left is waiting for a disconnect (streaming responses)
            return await receive()
        remaining = start + limits.body_timeout_s - time.perf_counter()
        try:
            message = await asyncio.wait_for(receive(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise BodyTimeout() from None
        seen[0] += len(message.get("body", b""))
        if seen[0] > limits.max_body_bytes:
            raise BodyTooLarge()
        done[0] = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_limited


def _header_limited_protocol(limits: Limits):
    """uvicorn's httptools protocol, refusing (431, connection closed) a request whose line and header
    fields exceed max_header_bytes or whose fields exceed max_headers, before any of it reaches the app.
    httptools itself buffers headers without bound (a 64 MiB header took 5.7 s)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderLimited(HttpToolsProtocol):
        # _head_bytes: exact, counted as httptools completes each field; _raw_head: the bytes received
        # while a head is incomplete (httptools holds them, unbounded, until the field ends)
        _in_head, _head_bytes, _raw_head, _fields, _refused = False, 0, 0, 0, False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes, self._raw_head, self._fields = True, 0, 0, 0

        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._fields += 1
            self._head_bytes += len(name) + len(value) + 4
            if self._fields <= limits.max_headers and self._head_bytes <= limits.max_header_bytes:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._fields > limits.max_headers or self._head_bytes > limits.max_header_bytes:
                self._refuse()
            else:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self._in_head and not self._refused:  # a head still incomplete: all of `data` was head
                self._raw_head += len(data)
                if self._raw_head > limits.max_header_bytes:
                    self._refuse()

        def _refuse(self) -> None:
            self._refused = True
            body = protocol.dumps({"error": f"request header fields too large: at most {limits.max_headers} fields "
                                            f"and {limits.max_header_bytes} bytes with the request line",
                                   "field": "headers"})
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return HeaderLimited


# -- the served models ------------------------------------------------------------------------

class State:
    """The models served now, the swap that replaces one without downtime, and the threads that
    decode images (max_decodes of them: the ceiling on decoding memory)."""

    def __init__(self, loaded: list, options: Options):
        self.options, self.metrics = options, Metrics()
        self.models: dict[str, object] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.generations: dict[str, Generations] = {}  # per text model version: its continuous batch
        self.locks: dict[str, asyncio.Lock] = {}
        self.arriving: dict[str, int] = {}  # requests per model being read, not yet handed to the batcher
        self.in_flight: dict[str, int] = {}  # requests per model between arrival and answer
        self.decoders = ThreadPoolExecutor(options.limits.max_decodes, thread_name_prefix="decode")
        self.predlog = predlog.PredictionLog(options.log) if options.log else None
        for model in loaded:
            self.models[model.name] = model
            self.metrics.serving(model)

    def get(self, name: str):
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}; served: {', '.join(sorted(self.models))}"[:300], "name")
        return self.models[name]

    def versioned(self, name: str, version: str | None):
        model = self.get(name)
        if version is not None and version != model.version:
            raise ApiError(404, f"{name} version {version!r} is not served (serving {model.version})"[:300], "version")
        return model

    @contextlib.contextmanager
    def counted(self, counts: dict, name: str):
        """Count a request in `counts` (arriving: its body is being read, the batcher waits for it
        within its window; in_flight: it is anywhere between arrival and answer)."""
        counts[name] = counts.get(name, 0) + 1
        try:
            yield
        finally:
            counts[name] -= 1

    def _run_counted(self, model, feeds: dict, wanted: list[str]) -> list[np.ndarray]:
        """One onnxruntime call, counted in the batch-size histogram (rows of the first input)."""
        out = model.run(feeds, wanted)
        self.metrics.batch.labels(model.name).observe(len(feeds[model.inputs[0].name]))
        return out

    async def run(self, model, feeds: dict, wanted: list[str]) -> list[np.ndarray]:
        """The outputs `wanted` for `feeds`: an image classifier's first output through the micro-batcher
        when batching is on and `model` is still the version served (one swapped out meanwhile runs its
        request alone); anything else in a worker thread. onnxruntime's own refusals are 400s."""
        first_in, first_out = model.inputs[0].name, model.outputs[0].name
        if (self.options.batching and model.task == "image-classification" and wanted == [first_out]
                and self.models.get(model.name) is model):
            return [await self._batcher(model, first_in, first_out).submit(feeds[first_in])]
        try:
            return await run_in_threadpool(self._run_counted, model, feeds, wanted)
        except Exception as exc:  # onnxruntime's checks, e.g. batch axes that disagree between inputs
            raise ApiError(400, f"onnxruntime refused the inputs: {_ort_message(exc)}", "inputs") from None

    def _batcher(self, model, feed: str, out: str) -> MicroBatcher:
        key = f"{model.name}\0{model.version}"
        if key not in self.batchers:  # made on first use, inside the event loop
            self.batchers[key] = MicroBatcher(
                lambda x: model.run({feed: x}, [out])[0], self.options.window_s, self.options.limits.max_batch,
                self.metrics.batch.labels(model.name).observe, lambda: self.arriving.get(model.name, 0),
                lambda: self.in_flight.get(model.name, 0))
        return self.batchers[key]  # no await between the version check and the submit

    def generation_batch(self, model) -> Generations:
        """The continuous batch of `model`'s generations (made on first use, one per version: a request
        keeps the version it started on; an old version's batch ends with its last row)."""
        key = f"{model.name}\0{model.version}"
        if key not in self.generations:
            runtime, name = model.runtime, model.name

            def on_step(rows: int) -> None:
                self.metrics.batch.labels(name).observe(rows)
                self.metrics.generated.labels(name).inc(rows)

            self.generations[key] = Generations(lambda seqs: inference.step(runtime.run, runtime.meta, seqs),
                                                self.options.limits.max_batch, on_step,
                                                self.metrics.generating.labels(name).set)
        return self.generations[key]

    async def reload(self, name: str) -> dict:
        """Re-resolve `name`; a new version is loaded and warmed up aside, then swapped in at once.
        Requests already holding the old version finish on it; its batcher drains, then stops."""
        old = self.get(name)
        async with self.locks.setdefault(name, asyncio.Lock()):
            try:
                path, version = await run_in_threadpool(served_mod.resolve, old.spec)
                if version == self.models[name].version:
                    self.metrics.reloads.labels(name, "unchanged").inc()
                    return {"name": name, "version": version, "changed": False}
                new = await run_in_threadpool(served_mod.load, old.spec, self.options.threads)
            except StageError as err:
                self.metrics.reloads.labels(name, "failed").inc()
                raise ApiError(400, f"reload of {name} failed, still serving {old.version}: {err}", "name") from None
            old = self.models[name]
            self.models[name] = new  # one assignment: every later request sees the new version
            self.metrics.serving(new, old)
            batcher = self.batchers.pop(f"{name}\0{old.version}", None)
            if batcher:
                batcher.close()
            self.generations.pop(f"{name}\0{old.version}", None)  # its running texts finish, then its worker ends
            self.metrics.reloads.labels(name, "swapped").inc()
            log.info("%s: %s -> %s", name, old.version, new.version)
            return {"name": name, "version": new.version, "previous": old.version, "changed": True}

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_s)
            for name in list(self.models):
                try:
                    await self.reload(name)
                except ApiError as err:
                    log.warning("%s", err.message)


_ORT_NOISE = re.compile(r"\S*onnxruntime_src\S*|\S+\.(?:cc|cpp|h):\d+\S*|0x[0-9a-fA-F]+")


def _ort_message(exc: Exception) -> str:
    """onnxruntime's message without its build paths and object addresses, first line, bounded."""
    return " ".join(_ORT_NOISE.sub("", str(exc).splitlines()[0] if str(exc) else type(exc).__name__).split())[:300]


def _axis_caps(model, limits: Limits) -> dict[str, list[int | None]]:
    """Per input, the largest size of each axis: fixed axes None (checked for equality), the batch axis
    max_batch, other dynamic axes max_seq, or a window model's block_size for its ids, a cached model's for
    its ids and its past (its position table's length: onnxruntime would fail past it)."""
    generation = model.runtime.meta.get("generation") or {}
    mode = generation.get("mode")
    window = generation.get("block_size") if mode in ("window", "cached") else None
    caps = {}
    for i, spec in enumerate(model.inputs):
        seq = min(limits.max_seq, window) if window and (i == 0 or mode == "cached") else limits.max_seq
        caps[spec.name] = [None if isinstance(d, int) else limits.max_batch if d == "batch" else seq
                           for d in spec.shape]
    return caps


# -- requests and responses -------------------------------------------------------------------

def _state(request: Request) -> State:
    return request.app.state.serve


def _respond(body, status: int = 200, model=None, headers: dict | None = None) -> Response:
    """A JSON response (ptpipe.protocol.dumps), naming `model`'s name and version in headers when given."""
    headers = dict(headers or {})
    if model is not None:
        headers.update({"X-Model-Name": model.name, "X-Model-Version": model.version})
    return Response(protocol.dumps(body), status, headers, media_type="application/json")


async def _off_loop(request: Request, size: int, fn, *args):
    """fn(*args) on the event loop when `size` (bytes, values) is cheap to handle, else in one of the
    max_decodes threads, so that health checks and small requests are answered meanwhile and at
    most max_decodes large bodies are parsed (or images decoded) at once: memory has a ceiling."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_state(request).decoders, fn, *args)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate request body (tritonclient's request_compression_algorithm), at most `limit` bytes
    once inflated: a compression bomb stops at the limit."""
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"the body is not valid {encoding} ({exc})", "Content-Encoding") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, f"the body inflates to more than the limit of {limit} bytes", "body")
    return out


async def _body(request: Request) -> bytes:
    """The request body (Observe bounds its size and time), inflated if Content-Encoding says so."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send identity, gzip or deflate",
                       "Content-Encoding")
    return await _off_loop(request, len(body), _inflate, body, encoding, _state(request).options.limits.max_body_bytes)


async def _json_body(request: Request, required: bool = True) -> dict:
    body = await _body(request)
    if not body and not required:
        return {}
    limit = _state(request).options.limits.max_json_bytes
    if len(body) > limit:
        raise ApiError(413, f"a JSON body of {len(body)} bytes is over the limit of {limit}", "body")
    return await _off_loop(request, len(body), protocol.parse_json, body)


def _integer(value, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{field} must be an integer from {low} to {high}, got {value!r}"[:200], field)
    return value


# -- handlers: health, metadata, repository ---------------------------------------------------

async def live(request: Request) -> Response:
    return _respond({"live": True})


async def ready(request: Request) -> Response:
    return _respond({"ready": bool(_state(request).models)})


async def server_metadata(request: Request) -> Response:
    return _respond({"name": "ptpipe", "version": ptpipe.__version__, "extensions": EXTENSIONS})


async def model_metadata(request: Request) -> Response:
    model = _state(request).versioned(request.path_params["name"], request.path_params.get("version"))
    return _respond({"name": model.name, "versions": [model.version], "platform": "onnxruntime_onnx",
                     "inputs": [t.protocol() for t in model.inputs], "outputs": [t.protocol() for t in model.outputs],
                     "parameters": {"task": model.task, "kind": model.kind, "source": model.spec.source}}, model=model)


async def model_ready(request: Request) -> Response:
    model = _state(request).versioned(request.path_params["name"], request.path_params.get("version"))
    return _respond({"name": model.name, "ready": True}, model=model)


async def list_models(request: Request) -> Response:
    return _respond({"models": [{"name": m.name, "version": m.version, "task": m.task, "kind": m.kind,
                                 "source": m.spec.source} for m in _state(request).models.values()]})


async def repository_index(request: Request) -> Response:
    await _json_body(request, required=False)  # {"ready": bool} may come; every model here is ready
    return _respond([{"name": m.name, "version": m.version, "state": "READY"}
                     for m in _state(request).models.values()])


async def load(request: Request) -> Response:
    """Reload from where --model points. Overrides (parameters.config, file:...) are refused, not ignored:
    the server would answer 200 and go on serving something else than the client sent."""
    state, name = _state(request), request.path_params["name"]
    state.get(name)
    body = await _json_body(request, required=False)
    unknown = sorted(set(body) - {"parameters"}, key=str)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} in a load request", unknown[0] or "body")
    protocol._params(body.get("parameters") or None, set(), "parameters")  # any key: refused, named
    result = await state.reload(name)
    return _respond(result, model=state.models[name])


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def unsupported(request: Request) -> Response:
    what = request.scope["route"].name
    raise ApiError(501, f"{what} is not implemented by ptpipe serve (extensions: {', '.join(EXTENSIONS)})", "path")


# -- handlers: inference ----------------------------------------------------------------------

async def infer(request: Request) -> Response:
    """Open Inference Protocol infer, JSON or binary tensors both ways (ptpipe.protocol)."""
    state = _state(request)
    name = request.path_params["name"]
    model = state.versioned(name, request.path_params.get("version"))
    limits = state.options.limits
    with state.counted(state.in_flight, name):  # the batcher's limit: half of these
        with state.counted(state.arriving, name):
            body = await _body(request)
            req = await _off_loop(request, len(body), protocol.read_infer, body,
                                  request.headers.get("inference-header-content-length"), model.inputs,
                                  model.outputs, _axis_caps(model, limits), limits.max_json_bytes)
        names = list(dict.fromkeys(w.name for w in req.outputs))
        results = dict(zip(names, await state.run(model, req.feeds, names)))
    labels = getattr(model.runtime, "classes", None) or getattr(model.runtime, "vocab", None)
    datatypes = {t.name: t.datatype for t in model.outputs}
    tensors = []
    for i, want in enumerate(req.outputs):
        if want.classification:
            tensors.append((want, "BYTES", protocol.classify(results[want.name], want.classification, labels,
                                                             f"outputs[{i}].parameters.classification")))
        else:
            tensors.append((want, datatypes[want.name], results[want.name]))
    rid = _log_infer(state, model, req, results)  # the request's id, else a new one while logging
    head = {"model_name": name, "model_version": model.version, **({"id": rid} if rid is not None else {})}
    payload, header_length = await _off_loop(request, sum(a.size for _, _, a in tensors), protocol.encode_response,
                                             head, tensors, limits.max_json_values)
    headers = {"X-Model-Name": model.name, "X-Model-Version": model.version}
    if header_length is None:
        return Response(payload, headers=headers, media_type="application/json")
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(payload, headers=headers, media_type="application/octet-stream")


async def classify(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["name"]
    model = state.get(name)
    _needs(model, "image-classification", "classify")
    with state.counted(state.in_flight, name):  # the batcher's limit: half of these
        with state.counted(state.arriving, name):
            uploads, top_k, batch = await _classify_request(model, request, state)
        logits = (await state.run(model, {model.inputs[0].name: batch}, [model.outputs[0].name]))[0]
    ids = _log_images(state, model, batch, logits, [blob for _, blob in uploads])  # None: no log
    classes = model.runtime.classes
    probs = inference.softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return _respond({"model": name, "version": model.version, "predictions": [
        {**({"id": ids[i]} if ids else {}), "filename": f,
         "labels": [{"label": classes[j], "probability": round(float(p[j]), 6)} for j in row]}
        for i, ((f, _), p, row) in enumerate(zip(uploads, probs, order))]}, model=model)


def _needs(model, task: str, endpoint: str) -> None:
    if model.task != task:
        raise ApiError(400, f"{model.name} is a {model.task} model: {endpoint} needs a {task} model", "name")


async def generate(request: Request) -> Response:
    state = _state(request)
    model = state.get(request.path_params["name"])
    _needs(model, "text-generation", "generate")
    args = _generate_args(model, await _json_body(request), state.options.limits)
    rid = _log_text(state, model, args["prompt"])  # None: no log
    headers = {"X-Model-Name": model.name, "X-Model-Version": model.version,
               **({"X-Prediction-Id": rid} if rid else {})}
    chars = _generated(state, model, args["prompt"], args["length"], args["temperature"], args["seed"])
    if args.pop("stream"):
        return StreamingResponse(_events(model, args["prompt"], chars), media_type="text/event-stream",
                                 headers=headers)
    text = args["prompt"] + "".join([ch async for ch in chars])
    return _respond({"model": model.name, "version": model.version, "text": text, **({"id": rid} if rid else {})},
                    headers=headers)


async def _generated(state: State, model, prompt: str, length: int, temperature: float, seed: int):
    """The generated characters as they come: from the model's continuous batch (`Generations`), or with
    --no-batching from a generation of its own in a worker thread (the same text either way)."""
    if not state.options.batching:
        async for ch in iterate_in_threadpool(model.runtime.stream(prompt, length, temperature, seed)):
            yield ch
        return
    if length == 0:
        return
    vocab = model.runtime.vocab
    seq = inference.Sequence(inference.encode(prompt, vocab), temperature, seed)
    generation = state.generation_batch(model).submit(seq, length)
    try:
        async for i in generation.ids():
            yield vocab[i]
    finally:  # done, or closed early (a client that went away): the row leaves the batch before the next step
        generation.gone = True


def _generate_args(model, body: dict, limits: Limits) -> dict:
    unknown = sorted(set(body) - {"prompt", "length", "temperature", "seed", "stream"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))}: send prompt, length, temperature, "
                            f"seed, stream"[:300], unknown[0] or "body")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= limits.max_prompt:
        raise ApiError(400, f"prompt must be a string of 1 to {limits.max_prompt} characters", "prompt")
    vocab = set(model.runtime.vocab)
    outside = sorted({ch for ch in prompt if ch not in vocab})
    if outside:
        raise ApiError(400, f"prompt characters not in {model.name}'s vocabulary: {', '.join(map(repr, outside))}"
                            [:300], "prompt")
    length = _integer(body.get("length", 300), "length", 0, limits.max_length)
    seed = _integer(body.get("seed", 1), "seed", 0, 2**63 - 1)
    temperature = body.get("temperature", 0.8)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            abs(temperature) < 1e300 and math.isfinite(temperature) and temperature >= 0):
        raise ApiError(400, f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}"[:200],
                       "temperature")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}"[:200], "stream")
    return {"prompt": prompt, "length": length, "temperature": float(temperature), "seed": seed, "stream": stream}


async def _events(model, prompt: str, chars):
    """Server-sent events: one `data: {"text": ch}` per generated character (`chars`, an async iterator),
    then `event: done` with the whole text. A client that disconnects closes this generator, and with it
    `chars`: its row leaves the batch."""
    def sse(data: dict, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"

    text = [prompt]
    yield sse({"model": model.name, "version": model.version, "prompt": prompt}, "start")
    try:
        async for ch in chars:
            text.append(ch)
            yield sse({"text": ch})
    finally:
        await chars.aclose()
    yield sse({"model": model.name, "version": model.version, "text": "".join(text)}, "done")


# -- the prediction log and feedback (ptpipe.predlog) -----------------------------------------------
# With --log, every response carries an id (a request of one image or prompt: that id; of N: `<id>/<i>`);
# a sampled request is queued for the log's writer thread (nothing else happens on the request path).

_ID_PREFIX, _id_count = uuid.uuid4().hex[:16], itertools.count()


def _new_id() -> str:
    """A response id: 32 hex digits, random per server process, then a counter. Not uuid4() per request: its
    os.urandom call was 6% of the event loop's time at 32 clients (py-spy, binary /infer with --log)."""
    return f"{_ID_PREFIX}{next(_id_count):016x}"


def _row_ids(rid: str, n: int) -> list[str]:
    return [rid] if n == 1 else [f"{rid}/{i}" for i in range(n)]


def _log_images(state: State, model, images: np.ndarray, logits: np.ndarray, uploads: list | None = None
                ) -> list[str] | None:
    if state.predlog is None:
        return None
    ids = _row_ids(_new_id(), len(images))
    if state.predlog.sampled():
        state.predlog.images(model.name, model.version, ids, images, logits, uploads)
    return ids


def _log_infer(state: State, model, req: protocol.InferRequest, results: dict) -> str | None:
    """The response id of an infer request (the protocol returns the request's own), logging its rows if sampled:
    a classifier's images with their logits, a text model's id sequences (bits/char when it computed logits)."""
    if state.predlog is None:
        return req.id
    rid = req.id if req.id is not None else _new_id()
    x, scores = req.feeds[model.inputs[0].name], results.get(model.outputs[0].name)
    if len(rid) <= MAX_ID and state.predlog.sampled():  # a longer id (up to the JSON limit) would bloat each row
        if model.task == "image-classification" and scores is not None and x.ndim == 4:
            state.predlog.images(model.name, model.version, _row_ids(rid, len(x)), x, scores)
        elif model.task == "text-generation" and x.ndim == 2:
            state.predlog.ids(model.name, model.version, _row_ids(rid, len(x)), x, scores)
    return rid


def _log_text(state: State, model, prompt: str) -> str | None:
    if state.predlog is None:
        return None
    rid = _new_id()
    if state.predlog.sampled():
        state.predlog.text(model.name, model.version, rid, prompt, model.runtime)
    return rid


MAX_ID = 200  # characters of a response id in feedback (ours are 32-38; a client's own OIP id may be longer)


async def feedback(request: Request) -> Response:
    """POST {"id": <a response's id>, "label": <the true class, or the true next text>}: stored in the log,
    joined to the prediction by predlog.read_window. 404 for an id the log does not hold (never logged: not
    sampled, another model's, past retention)."""
    state = _state(request)
    model = state.get(request.path_params["name"])
    if state.predlog is None:
        raise ApiError(404, "feedback needs the prediction log: start ptpipe serve with --log PATH", "path")
    body = await _json_body(request)
    unknown = sorted(set(body) - {"id", "label"}, key=str)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0][:40]!r}: send id and label", unknown[0][:40] or "body")
    rid, label = body.get("id"), body.get("label")
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID:
        raise ApiError(400, f"id must be a response's id, a string of 1 to {MAX_ID} characters", "id")
    if model.task == "image-classification":
        if label not in model.runtime.classes:
            raise ApiError(400, f"label must be one of {model.name}'s classes: {', '.join(model.runtime.classes)}"
                                [:300], "label")
    elif not isinstance(label, str) or not 1 <= len(label) <= state.options.limits.max_prompt:
        raise ApiError(400, f"label must be the true next text, a string of 1 to {state.options.limits.max_prompt} "
                            f"characters", "label")
    if not await _logged(state.predlog, model.name, rid):
        raise ApiError(404, f"no logged prediction of {model.name} has id {rid[:80]!r} (not sampled, or past "
                            f"the log's retention)", "id")
    state.predlog.feedback(model.name, rid, label)
    return _respond({"model": model.name, "id": rid, "label": label}, model=model)


async def _logged(log_: predlog.PredictionLog, model: str, rid: str) -> bool:
    """Whether the log holds `rid`. A response of the last commit_s may still be queued: then it is looked up
    again once what was queued is committed, waiting on the event loop (a flood of unknown ids holds no thread)."""
    mark, deadline = log_.mark(), time.monotonic() + 2 * log_.options.commit_s + 1
    if await run_in_threadpool(predlog.has_prediction, log_.options.path, model, rid):
        return True
    while not log_.written(mark) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return await run_in_threadpool(predlog.has_prediction, log_.options.path, model, rid)


# -- classify: multipart and images -----------------------------------------------------------

def _multipart(body: bytes, content_type: str, max_files: int, max_fields: int = 16) -> tuple[list, dict]:
    """([(filename, bytes)] of the file fields named `images`, {name: text} of the plain fields) of a
    multipart/form-data body (RFC 7578), read whole (Observe bounds it), parsed by python-multipart's
    MultipartParser. Not request.form(): its UploadFile and SpooledTemporaryFile per file cost more
    than the parse (docs/serving.md has the measurement)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "images: the multipart body has no boundary", "images")
    parts, header = [], [b"", b""]  # each part: [headers {name: value}, data chunks]

    def part_begin():
        if len(parts) >= max_files + max_fields:
            raise ApiError(400, f"images: too many parts (at most {max_files} images and {max_fields} fields)", "images")
        parts.append([{}, []])

    def header_end():
        parts[-1][0][header[0].strip().lower()] = header[1].strip()
        header[:] = [b"", b""]

    callbacks = {
        "on_part_begin": part_begin,
        "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].append(data[start:end]),
        "on_end": lambda: parts.append(None),  # the closing delimiter was seen
    }
    # python-multipart expects the first delimiter at the start: skip a preamble (RFC 2046 5.1.1)
    if not body.startswith(b"--" + boundary):
        body = body[body.find(b"\r\n--" + boundary) + 2:] if b"\r\n--" + boundary in body else b""
    try:
        MultipartParser(boundary, callbacks).write(body)
    except MultipartParseError as exc:
        raise ApiError(400, f"images: a broken multipart body ({str(exc)[:100]})", "images") from None
    if not parts or parts[-1] is not None:
        raise ApiError(400, f"images: a broken multipart body (no closing --{boundary.decode('latin-1')[:70]}--)",
                       "images")
    return _form(parts[:-1], max_files, max_fields)


def _form(parts: list, max_files: int, max_fields: int) -> tuple[list, dict]:
    uploads, fields, files, plain = [], {}, 0, 0
    for i, (headers, chunks) in enumerate(parts):
        if b"content-disposition" not in headers:
            raise ApiError(400, f"images: multipart part {i} has no Content-Disposition header", "images")
        _, params = parse_options_header(headers[b"content-disposition"])
        name, data = params.get(b"name", b"").decode("utf-8", "replace"), b"".join(chunks)
        if b"filename" in params:
            files += 1
            if files > max_files:
                raise ApiError(400, f"images: too many files (at most {max_files} images)", "images")
            if name == "images":
                uploads.append((params[b"filename"].decode("utf-8", "replace"), data))
        else:
            plain += 1
            if plain > max_fields:
                raise ApiError(400, f"images: too many form fields (at most {max_fields})", "images")
            fields[name] = data.decode("utf-8", "replace")
    return uploads, fields


async def _classify_request(model, request: Request, state: State) -> tuple[list, int, np.ndarray]:
    """([(file name, bytes)], top_k, uint8 N x 3 x 32 x 32) of a multipart classify request."""
    limits = state.options.limits
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "send the images as multipart/form-data file fields named `images` "
                            "(curl -F images=@cat.jpg)", "images")
    body = await _body(request)
    uploads, fields = await _off_loop(request, len(body), _multipart, body, content_type, limits.max_batch)
    if not uploads:
        raise ApiError(400, "no file field named `images` in the form", "images")
    classes = model.runtime.classes
    top_k = fields.get("top_k", request.query_params.get("top_k", "3"))
    if not (top_k.isascii() and top_k.isdigit() and len(top_k) <= 6) or not 1 <= int(top_k) <= len(classes):
        raise ApiError(400, f"top_k must be an integer from 1 to {len(classes)}, got {top_k[:40]!r}", "top_k")
    blobs = [blob for _, blob in uploads]
    size = model.runtime.image_size
    if all(_small_png(b) for b in blobs):
        images = _decode(blobs, size, limits.max_pixels)
    else:  # the event loop never decodes a large image
        images = await _off_loop(request, OFF_LOOP_BYTES + 1, _decode, blobs, size, limits.max_pixels)
    for i, image in enumerate(images):
        if isinstance(image, str):
            raise ApiError(400, f"images[{i}] ({uploads[i][0][:100]}): {image}", f"images[{i}]")
    return uploads, int(top_k), np.stack(images)


def _small_png(blob: bytes) -> bool:
    """A PNG whose header (IHDR, bytes 16-24) declares at most ON_LOOP_PIXELS: decoded on the event loop."""
    if blob[:8] != PNG_SIGNATURE or blob[12:16] != b"IHDR" or len(blob) < 24:
        return False
    width, height = struct.unpack(">II", blob[16:24])
    return width * height <= ON_LOOP_PIXELS


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _decode(blobs: list[bytes], size: int, max_pixels: int) -> list:
    """Each upload as uint8 3 x size x size (the model's image size), or the reason it is not an image."""
    out = []
    for blob in blobs:
        try:
            out.append(inference.load_image(io.BytesIO(blob), size, max_pixels=max_pixels))
        except StageError as err:
            # the message less its "<_io.BytesIO object at 0x...>: " (and any other address in it)
            out.append(_ADDRESS.sub("the upload", str(err).split(": ", 1)[-1]))
    return out


# -- the app ----------------------------------------------------------------------------------

def _not_implemented(path: str, what: str, methods=("GET", "POST")) -> Route:
    return Route(path, unsupported, methods=list(methods), name=what)


ROUTES = [
    Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
    # the protocol's endpoints this server does not implement: a 501 naming them, before {name} matches them
    _not_implemented("/v2/models/stats", "statistics (the statistics extension)"),
    _not_implemented("/v2/models/{name}/stats", "statistics (the statistics extension)"),
    _not_implemented("/v2/models/{name}/versions/{version}/stats", "statistics (the statistics extension)"),
    _not_implemented("/v2/models/{name}/config", "model configuration"),
    _not_implemented("/v2/models/{name}/versions/{version}/config", "model configuration"),
    _not_implemented("/v2/models/{name}/trace/setting", "trace settings (the trace extension)"),
    _not_implemented("/v2/trace/setting", "trace settings (the trace extension)"),
    _not_implemented("/v2/logging", "log settings (the logging extension)"),
    _not_implemented("/v2/repository/models/{name}/unload", "unload (models are replaced by load, never removed)"),
    _not_implemented("/v2/systemsharedmemory{rest:path}", "system shared memory (the shared-memory extension)"),
    _not_implemented("/v2/cudasharedmemory{rest:path}", "CUDA shared memory (the shared-memory extension)"),
    Route("/v2/models/{name}", model_metadata), Route("/v2/models/{name}/versions/{version}", model_metadata),
    Route("/v2/models/{name}/ready", model_ready), Route("/v2/models/{name}/versions/{version}/ready", model_ready),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
    Route("/v1/models", list_models),
    Route("/v1/models/{name}/classify", classify, methods=["POST"]),
    Route("/v1/models/{name}/generate", generate, methods=["POST"]),
    Route("/v1/models/{name}/feedback", feedback, methods=["POST"]),
    Route("/metrics", metrics),
]


async def _api_error(request, exc: ApiError) -> Response:
    return _respond({"error": exc.message, "field": exc.field}, exc.status)


async def _http_error(request, exc: HTTPException) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method), as the protocol's error object."""
    message = {404: f"no endpoint {request.url.path[:200]!r} (docs/serving.md lists them)",
               405: f"{request.method} is not allowed here"}.get(exc.status_code, str(exc.detail))
    return _respond({"error": message, "field": "path" if exc.status_code == 404 else "method"}, exc.status_code,
                    headers=exc.headers)


async def _body_too_large(request, exc) -> Response:
    limit = _state(request).options.limits.max_body_bytes
    return _respond({"error": f"request body is over the limit of {limit} bytes", "field": "body"}, 413,
                    headers={"Connection": "close"})


async def _body_timeout(request, exc) -> Response:
    limit = _state(request).options.limits.body_timeout_s
    return _respond({"error": f"the request body did not arrive within {limit:g} s", "field": "body"}, 408,
                    headers={"Connection": "close"})


async def _client_gone(request, exc) -> Response:
    log.warning("%s %s: the client went away before its body arrived", request.method, request.url.path[:200])
    return Response(status_code=499)  # nginx's "client closed request": counted, sent to no one


async def _internal(request, exc) -> Response:  # a bug: Observe logs it once; the answer is still JSON
    return _respond({"error": "internal error (logged by the server)", "field": None}, 500)


def create_app(loaded: list, options: Options = Options(), routes: list = ROUTES):
    """The ASGI app serving `loaded` (ptpipe.served.Served objects, loaded and warmed up) on `routes`."""
    state = State(loaded, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        poller = asyncio.create_task(state.poll()) if options.poll_s > 0 else None
        yield
        if poller:
            poller.cancel()
        state.decoders.shutdown(wait=False)
        if state.predlog:
            state.predlog.close()  # what is queued is written

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, BodyTooLarge: _body_too_large, BodyTimeout: _body_timeout,
        ClientDisconnect: _client_gone, Exception: _internal})
    app.state.serve = state
    return Observe(app, state)


def main(models: list[str], repo: str | None = None, models_dir: str = "models", host: str = "127.0.0.1",
         port: int = 8000, options: Options = Options()) -> None:
    """Load every model (errors here stop the start, exit 2), then serve until interrupted."""
    import uvicorn

    specs = served_mod.parse_specs(models, models_dir, repo)
    loaded = [served_mod.load(spec, options.threads) for spec in specs]
    for model in loaded:
        print(f"serving {model.name} {model.version} ({model.task}, {model.spec.source}: {model.path})", flush=True)
    app = create_app(loaded, options)
    # Everything loaded so far (the app, Starlette, numpy, onnxruntime's Python side) lives as
    # long as the server: frozen, a full collection no longer walks it (a 47 ms generation-2 pause at
    # 32 clients before, measured by a gc callback: every request in flight waited on it, the p99).
    gc.collect()
    gc.freeze()
    # A thread that ends an onnxruntime call needs the GIL back to hand its result over; while the
    # event loop runs Python it waits for the switch interval, 5 ms by default, twice per batch (the
    # call starts and ends) and once per request without batching. 0.5 ms: +11% classify requests/s
    # at 32 clients (840 -> 933, 3 runs each, steal < 5%).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Limits.max_pixels refuses big images first; Pillow's own warning (89 to 179 MP) would only add noise
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # uvicorn's own "running on" line is an INFO record, and its log level is warning (no access log)
    print(f"listening on http://{host}:{port} (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                http=_header_limited_protocol(options.limits))


def options_from(args) -> Options:
    """Options from `ptpipe serve`'s arguments (see ptpipe.cli; their defaults are Limits')."""
    limits = replace(Limits(), max_body_bytes=int(args.max_body_mb * 2**20), max_batch=args.max_batch,
                     max_pixels=args.max_pixels, max_decodes=args.max_decodes, body_timeout_s=args.body_timeout_s)
    return Options(batching=not args.no_batching, window_s=args.batch_window_ms / 1000, threads=args.threads,
                   poll_s=args.poll_s, limits=limits, log=_log_options(args))


def _log_options(args) -> LogOptions | None:
    """The --log* flags (each None when not given: LogOptions' default); without --log the others are refused."""
    given = {key: value for key, value in (("sample", args.log_sample), ("retention_s", args.log_retention),
                                           ("max_rows", args.log_max_rows), ("raw_per_hour", args.log_raw))
             if value is not None}
    if args.log is None:
        if given:
            flag = {"sample": "--log-sample", "retention_s": "--log-retention", "max_rows": "--log-max-rows",
                    "raw_per_hour": "--log-raw"}[next(iter(given))]
            raise StageError(f"{flag} needs --log PATH (the prediction log it configures)")
        return None
    try:
        Path(args.log).resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StageError(f"--log {args.log}: its folder cannot be made ({err.strerror})") from None
    return LogOptions(args.log, **given)
