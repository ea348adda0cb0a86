"""`ptpipe serve`: an HTTP inference server for the exported models (FastAPI on uvicorn, onnxruntime only).

    ptpipe serve                                   # every models/*/model.onnx of the workspace
    ptpipe serve --model cifar10-cnn#prod --repo https://github.com/me/project --poll-s 60
    curl -F images=@cat.jpg localhost:8000/v1/models/cifar10-cnn/classify

Endpoints (docs/serving.md has a curl line for each):
  Open Inference Protocol v2 (KServe / Triton REST): GET /v2/health/live, /v2/health/ready, /v2,
  GET /v2/models/{name}[/versions/{v}], GET /v2/models/{name}/ready, POST /v2/models/{name}/infer,
  POST /v2/repository/index, POST /v2/repository/models/{name}/load (reload without downtime).
  For people: GET /v1/models, POST /v1/models/{name}/classify (multipart images, top_k),
  POST /v1/models/{name}/generate (JSON prompt/length/temperature/seed, "stream": true for SSE).
  GET /metrics (Prometheus).

The server is task-generic: a model's task (image-classification | text-generation) and its
tensors come from the ONNX file, so any kind the pipeline exports is served without code here.
Every response names the model and its version (body, and X-Model-Name / X-Model-Version headers).
Errors are JSON `{"error": ..., "field": ...}` (the Open Inference Protocol's error object plus the
field at fault). Nothing here imports torch.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from python_multipart.multipart import parse_options_header
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

import ptpipe
from ptpipe import inference, served as served_mod
from ptpipe.batching import MicroBatcher
from ptpipe.stage import StageError

log = logging.getLogger("ptpipe.serve")
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval of the server process (main() says why)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; docs/serving.md says why each value."""

    max_body_bytes: int = 16 * 2**20   # a batch of phone photos; more is refused before it is read
    max_batch: int = 64                # images per request and per onnxruntime call
    max_length: int = 5000             # generated characters (~1 s of one core for the LSTM)
    max_prompt: int = 2000             # prompt characters
    max_seq: int = 4096                # a text tensor's sequence axis in /v2 infer


@dataclass(frozen=True)
class Options:
    batching: bool = True
    window_s: float = 0.002
    # One intra-op thread: onnxruntime's pool spins between calls, and on 2 cores the spinning thread
    # starves the event loop (measured 6.4 -> 2.7 ms of server CPU per classify request, under load).
    threads: int = 1
    poll_s: float = 0.0                # re-resolve every model this often (0: only on POST .../load)
    limits: Limits = Limits()


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class BodyTooLarge(Exception):
    pass


# -- metrics --------------------------------------------------------------------------------

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
        self.batch = Histogram("ptpipe_batch_size", "rows per onnxruntime call of the micro-batcher", ("model",),
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.info = Gauge("ptpipe_model_info", "1 for the version served now", ("model", "version", "kind", "task",
                                                                                   "source"), registry=self.registry)
        self.reloads = Counter("ptpipe_model_reloads", "reload attempts", ("model", "result"), registry=self.registry)

    def serving(self, new, old=None) -> None:
        if old is not None:
            self.info.remove(old.name, old.version, old.kind, old.task, old.spec.source)
        self.info.labels(new.name, new.version, new.kind, new.task, new.spec.source).set(1)


def _route(path: str, known) -> tuple[str, str]:
    """(model label, endpoint label) of a path: bounded label sets (unknown names -> '_unknown')."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[1] == "models" and parts[0] in ("v1", "v2"):
        endpoint = parts[-1] if len(parts) > 3 and parts[-1] in ("infer", "classify", "generate", "ready") else "metadata"
        return (parts[2] if parts[2] in known else "_unknown"), endpoint
    if parts[:3] == ["v2", "repository", "models"] and len(parts) >= 4:
        return (parts[3] if parts[3] in known else "_unknown"), parts[-1]
    return "", "/".join(parts[:2]) or "/"


class Observe:
    """ASGI middleware: the body size limit (413) and the request metrics, for every endpoint."""

    def __init__(self, app, state: "State"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, limit = self.state.metrics, self.state.options.limits.max_body_bytes
        model, endpoint = _route(scope["path"], self.state.models)
        start, status = time.perf_counter(), [500]
        length = dict(scope["headers"]).get(b"content-length")

        async def send_observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if length is not None and length.isdigit() and int(length) > limit:
            await _error(413, f"request body of {int(length)} bytes is over the limit of {limit}", "body")(
                scope, receive, send_observed)
        else:
            seen = [0]

            async def receive_limited():
                message = await receive()
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:  # a chunked body without Content-Length
                    raise BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_observed)
        metrics.requests.labels(model, endpoint).inc()
        metrics.latency.labels(model, endpoint).observe(time.perf_counter() - start)
        if status[0] >= 400:
            metrics.errors.labels(model, endpoint, str(status[0])).inc()


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


# -- the served models ------------------------------------------------------------------------

class State:
    """The models served now, and the swap that replaces one without downtime."""

    def __init__(self, loaded: list, options: Options):
        self.options, self.metrics = options, Metrics()
        self.models: dict[str, object] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.arriving: dict[str, int] = {}  # requests per model being read, not yet handed to the batcher
        self.in_flight: dict[str, int] = {}  # requests per model between arrival and answer
        for model in loaded:
            self.models[model.name] = model
            self.metrics.serving(model)

    def get(self, name: str):
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}; served: {', '.join(sorted(self.models))}", "name")
        return self.models[name]

    @contextlib.contextmanager
    def counted(self, counts: dict, name: str):
        """Count a request in `counts` (arriving: its body is being read, the batcher waits for it
        within its window; in_flight: it is anywhere between arrival and answer)."""
        counts[name] = counts.get(name, 0) + 1
        try:
            yield
        finally:
            counts[name] -= 1

    async def first_output(self, model, rows: np.ndarray) -> np.ndarray:
        """The model's first output for `rows` of its first input: micro-batched when batching is on
        and `model` is still the version served (one swapped out meanwhile runs its request alone)."""
        feed, out = model.inputs[0].name, model.outputs[0].name
        if not (self.options.batching and self.models.get(model.name) is model):
            return (await run_in_threadpool(model.run, {feed: rows}, [out]))[0]
        key = f"{model.name}\0{model.version}"
        if key not in self.batchers:  # made on first use, inside the event loop
            self.batchers[key] = MicroBatcher(
                lambda x: model.run({feed: x}, [out])[0], self.options.window_s, self.options.limits.max_batch,
                self.metrics.batch.labels(model.name).observe, lambda: self.arriving.get(model.name, 0),
                lambda: self.in_flight.get(model.name, 0))
        return await self.batchers[key].submit(rows)  # no await between the check and the submit

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


def _named(model, body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status,
                        headers={"X-Model-Name": model.name, "X-Model-Version": model.version})


def _needs(model, task: str, endpoint: str) -> None:
    if model.task != task:
        raise ApiError(400, f"{model.name} is a {model.task} model: {endpoint} needs a {task} model", "name")


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    return body


def _integer(value, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{field} must be an integer from {low} to {high}, got {value!r}", field)
    return value


# -- Open Inference Protocol tensors ------------------------------------------------------------

def _tensor(spec, given: dict, index: int, limits: Limits) -> np.ndarray:
    field = f"inputs[{index}]"
    if given.get("datatype") != spec.datatype:
        raise ApiError(400, f"{spec.name}: datatype must be {spec.datatype}, got {given.get('datatype')!r}",
                       f"{field}.datatype")
    shape = given.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ApiError(400, f"{spec.name}: shape must be {len(spec.shape)} non-negative integers like "
                            f"{[d if isinstance(d, int) else -1 for d in spec.shape]}, got {shape!r}", f"{field}.shape")
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(want, int) and want != got:
            raise ApiError(400, f"{spec.name}: shape axis {axis} must be {want}, got {got}", f"{field}.shape")
        limit = limits.max_batch if want == "batch" else limits.max_seq
        if isinstance(want, str) and got > limit:
            raise ApiError(400, f"{spec.name}: axis {axis} ({want}) is {got}, over the limit of {limit}",
                           f"{field}.shape")
    try:
        data = np.asarray(given.get("data"), dtype=np.float64 if spec.dtype == "float32" else object).ravel()
        if spec.dtype != "float32":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in data):
                raise ValueError(f"{spec.datatype} data must be integers")
            info = np.iinfo(spec.dtype)
            if data.size and not (info.min <= min(data) and max(data) <= info.max):
                raise ValueError(f"values must lie in {info.min}..{info.max}")
        array = data.astype(spec.dtype)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"{spec.name}: data is not a {spec.datatype} tensor ({exc})", f"{field}.data") from None
    if array.size != math.prod(shape):
        raise ApiError(400, f"{spec.name}: data has {array.size} values, shape {shape} needs {math.prod(shape)}",
                       f"{field}.data")
    return array.reshape(shape)


def _protocol_output(spec, array: np.ndarray) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape), "data": array.ravel().tolist()}


async def _infer_request(model, request: Request, limits: Limits) -> tuple[dict, list[str], dict]:
    """(feeds, output names, body) of an Open Inference Protocol request, checked against the model's tensors."""
    name = model.name
    body = await _json(request)
    given = body.get("inputs")
    if not isinstance(given, list) or not all(isinstance(g, dict) for g in given):
        raise ApiError(400, "inputs must be a list of tensors {name, shape, datatype, data}", "inputs")
    specs = {t.name: t for t in model.inputs}
    feeds = {}
    for i, tensor in enumerate(given):
        if tensor.get("name") not in specs:
            raise ApiError(400, f"unknown input {tensor.get('name')!r}; {name} takes {', '.join(specs)}",
                           f"inputs[{i}].name")
        feeds[tensor["name"]] = _tensor(specs[tensor["name"]], tensor, i, limits)
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise ApiError(400, f"missing input(s) {', '.join(missing)}", "inputs")
    wanted = [t.name for t in model.outputs]
    if body.get("outputs") is not None:
        asked = body["outputs"]
        if not isinstance(asked, list) or not all(isinstance(o, dict) and o.get("name") in wanted for o in asked):
            raise ApiError(400, f"outputs must name some of {', '.join(wanted)}", "outputs")
        wanted = [o["name"] for o in asked]
    return feeds, wanted, body


def _multipart(body: bytes, content_type: str, max_files: int, max_fields: int = 16) -> tuple[list, dict]:
    """([(filename, bytes)] of the file fields named `images`, {name: text} of the plain fields) of a
    multipart/form-data body (RFC 7578), read whole (Observe bounds it). Split on the delimiter by
    bytes.split instead of starlette's request.form(): python-multipart's byte-level state machine
    and the UploadFile + SpooledTemporaryFile per file cost ~0.15 ms of event-loop time for one
    32 x 32 PNG, this ~0.04 ms with reading the body. (defnull's `multipart`, as fast, cannot be installed beside
    python-multipart: both ship a top-level `multipart` module.)"""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "images: the multipart body has no boundary", "images")
    # Every delimiter is CRLF--boundary (the first may open the body); at most max_files + max_fields
    # parts are split off, so a body of a million empty parts costs no more than a few.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary, max_files + max_fields + 1)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        if len(chunks) > max_files + max_fields + 1:
            raise ApiError(400, f"images: too many parts (at most {max_files} images and {max_fields} fields)",
                           "images")
        raise ApiError(400, f"images: a broken multipart body (no closing --{boundary.decode(errors='replace')}--) "
                            f"(at most {max_files} images)", "images")
    uploads, fields, files, plain = [], {}, 0, 0
    for i, chunk in enumerate(chunks[1:-1]):
        head, sep, data = chunk.partition(b"\r\n\r\n")
        headers = {k.strip().lower(): v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        if not sep or b"content-disposition" not in headers:
            raise ApiError(400, f"images: multipart part {i} has no Content-Disposition header and blank line", "images")
        _, params = parse_options_header(headers[b"content-disposition"].strip())
        name = params.get(b"name", b"").decode("utf-8", "replace")
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


async def _classify_request(model, request: Request, limits: Limits) -> tuple[list[str], int, np.ndarray]:
    """(file names, top_k, uint8 N x 3 x 32 x 32) of a multipart classify request."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "send the images as multipart/form-data file fields named `images` "
                            "(curl -F images=@cat.jpg)", "images")
    uploads, fields = _multipart(await request.body(), content_type, limits.max_batch)
    if not uploads:
        raise ApiError(400, "no file field named `images` in the form", "images")
    classes = model.runtime.classes
    top_k = fields.get("top_k", request.query_params.get("top_k", "3"))
    if not str(top_k).isdigit() or not 1 <= int(top_k) <= len(classes):
        raise ApiError(400, f"top_k must be an integer from 1 to {len(classes)}, got {top_k!r}", "top_k")
    blobs = [blob for _, blob in uploads]
    # Small files decode faster than a hop to a thread; a large photo would stall the event loop.
    images = _decode(blobs) if sum(map(len, blobs)) < 256 * 1024 else await run_in_threadpool(_decode, blobs)
    for i, image in enumerate(images):
        if isinstance(image, str):
            raise ApiError(400, f"images[{i}] ({uploads[i][0]}): {image}", f"images[{i}]")
    return [name for name, _ in uploads], int(top_k), np.stack(images)


def create_app(loaded: list, options: Options = Options()) -> FastAPI:
    """The ASGI app serving `loaded` (ptpipe.served.Served objects, loaded and warmed up)."""
    state = State(loaded, options)
    limits = options.limits

    async def lifespan(app):
        poller = asyncio.create_task(state.poll()) if options.poll_s > 0 else None
        yield
        if poller:
            poller.cancel()

    app = FastAPI(title="ptpipe serve", version=ptpipe.__version__, lifespan=lifespan)
    app.state.models = state
    app.add_middleware(Observe, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc):
        return _error(413, f"request body is over the limit of {limits.max_body_bytes} bytes", "body")

    @app.exception_handler(Exception)
    async def internal(request, exc):  # a bug: still JSON, and the server lives on
        log.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # health and metadata
    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": bool(state.models)}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "ptpipe", "version": ptpipe.__version__, "extensions": ["model_repository"]}

    def metadata(model) -> dict:
        return {"name": model.name, "versions": [model.version], "platform": "onnxruntime_onnx",
                "inputs": [t.protocol() for t in model.inputs], "outputs": [t.protocol() for t in model.outputs],
                "parameters": {"task": model.task, "kind": model.kind, "source": model.spec.source}}

    def versioned(name: str, version: str | None):
        model = state.get(name)
        if version is not None and version != model.version:
            raise ApiError(404, f"{name} version {version!r} is not served (serving {model.version})", "version")
        return model

    # The two hot endpoints are Starlette routes, checked first: FastAPI's per-request dependency
    # solving and response handling cost ~0.13 ms of the ~0.7 ms a classify request spends on the
    # event loop. They are listed in docs/serving.md instead of the OpenAPI page.
    async def infer(request: Request):
        name = request.path_params["name"]
        model = versioned(name, request.path_params.get("version"))
        with state.counted(state.in_flight, name):  # the batcher's limit: half of these
            with state.counted(state.arriving, name):
                feeds, wanted, body = await _infer_request(model, request, limits)
            out_specs = {t.name: t for t in model.outputs}
            if model.task == "image-classification" and wanted == [model.outputs[0].name]:
                results = [await state.first_output(model, feeds[model.inputs[0].name])]
            else:
                try:
                    results = await run_in_threadpool(model.run, feeds, wanted)
                except Exception as exc:  # onnxruntime's own checks (e.g. batch axes that disagree)
                    raise ApiError(400, f"onnxruntime refused the inputs: {exc}", "inputs") from None
            response = {"model_name": name, "model_version": model.version,
                        "outputs": [_protocol_output(out_specs[n], r) for n, r in zip(wanted, results)]}
            if "id" in body:
                response["id"] = body["id"]
            return _named(model, response)

    async def classify(request: Request):
        name = request.path_params["name"]
        model = state.get(name)
        _needs(model, "image-classification", "classify")
        with state.counted(state.in_flight, name):  # the batcher's limit: half of these
            with state.counted(state.arriving, name):
                uploads, top_k, batch = await _classify_request(model, request, limits)
            logits = await state.first_output(model, batch)
            classes = model.runtime.classes
            probs = inference.softmax(logits.astype(np.float64))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            return _named(model, {"model": name, "version": model.version, "predictions": [
                {"filename": f, "labels": [{"label": classes[j], "probability": round(float(p[j]), 6)} for j in row]}
                for f, p, row in zip(uploads, probs, order)]})

    app.router.routes[:0] = [
        Route("/v1/models/{name}/classify", classify, methods=["POST"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])]

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        model = versioned(name, version)
        return _named(model, metadata(model))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        model = versioned(name, version)
        return _named(model, {"name": name, "ready": True})

    @app.get("/v1/models")
    async def list_models():
        return {"models": [{"name": m.name, "version": m.version, "task": m.task, "kind": m.kind,
                            "source": m.spec.source} for m in state.models.values()]}

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": m.name, "version": m.version, "state": "READY"} for m in state.models.values()]

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str):
        result = await state.reload(name)
        return _named(state.models[name], result)

    @app.post("/v1/models/{name}/generate")
    async def generate(name: str, request: Request):
        model = state.get(name)
        _needs(model, "text-generation", "generate")
        body = await _json(request)
        unknown = sorted(set(body) - {"prompt", "length", "temperature", "seed", "stream"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: send prompt, length, temperature, seed, "
                                f"stream", unknown[0])
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not 1 <= len(prompt) <= limits.max_prompt:
            raise ApiError(400, f"prompt must be a string of 1 to {limits.max_prompt} characters", "prompt")
        vocab = set(model.runtime.vocab)
        outside = sorted({ch for ch in prompt if ch not in vocab})
        if outside:
            raise ApiError(400, f"prompt characters not in {name}'s vocabulary: {', '.join(map(repr, outside))}",
                           "prompt")
        length = _integer(body.get("length", 300), "length", 0, limits.max_length)
        seed = _integer(body.get("seed", 1), "seed", 0, 2**63 - 1)
        temperature = body.get("temperature", 0.8)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ApiError(400, f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}", "temperature")
        args = (prompt, length, float(temperature), seed)
        if body.get("stream"):
            return StreamingResponse(_events(model, args), media_type="text/event-stream",
                                     headers={"X-Model-Name": model.name, "X-Model-Version": model.version})
        text = await run_in_threadpool(model.runtime.generate, *args)
        return _named(model, {"model": name, "version": model.version, "text": text})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _decode(blobs: list[bytes]) -> list:
    """Each upload as uint8 3 x 32 x 32, or the reason it is not an image."""
    out = []
    for blob in blobs:
        try:
            out.append(inference.load_image(io.BytesIO(blob)))
        except StageError as err:
            out.append(str(err).split(": ", 1)[-1])
    return out


def _events(model, args):
    """Server-sent events: one `data: {"text": ch}` per generated character, then `event: done` with the whole text."""
    def sse(data: dict, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"

    prompt = args[0]
    text = [prompt]
    yield sse({"model": model.name, "version": model.version, "prompt": prompt}, "start")
    for ch in model.runtime.stream(*args):
        text.append(ch)
        yield sse({"text": ch})
    yield sse({"model": model.name, "version": model.version, "text": "".join(text)}, "done")


def main(models: list[str], repo: str | None = None, models_dir: str = "models", host: str = "127.0.0.1",
         port: int = 8000, options: Options = Options()) -> None:
    """Load every model (errors here stop the start, exit 2), then serve until interrupted."""
    import uvicorn

    specs = served_mod.parse_specs(models, models_dir, repo)
    loaded = [served_mod.load(spec, options.threads) for spec in specs]
    for model in loaded:
        print(f"serving {model.name} {model.version} ({model.task}, {model.spec.source}: {model.path})", flush=True)
    app = create_app(loaded, options)
    # Everything loaded so far (the app, FastAPI, pydantic, numpy, onnxruntime's Python side) lives as
    # long as the server: frozen, a full collection no longer walks it (a 47 ms generation-2 pause at
    # 32 clients before, measured by a gc callback: every request in flight waited on it, the p99).
    gc.collect()
    gc.freeze()
    # A thread that ends an onnxruntime call needs the GIL back to hand its result over; while the
    # event loop runs Python it waits for the switch interval, 5 ms by default, twice per batch (the
    # call starts and ends) and once per request without batching. 0.5 ms: +11% classify requests/s
    # at 32 clients (840 -> 933, 3 runs each, steal < 5%).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def options_from(args) -> Options:
    """Options from `ptpipe serve`'s arguments (see ptpipe.cli)."""
    limits = replace(Limits(), max_body_bytes=int(args.max_body_mb * 2**20), max_batch=args.max_batch)
    return Options(batching=not args.no_batching, window_s=args.batch_window_ms / 1000, threads=args.threads,
                   poll_s=args.poll_s, limits=limits)
