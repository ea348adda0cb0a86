"""The Open Inference Protocol's tensors: a request body -> numpy feeds, outputs -> a response body,
in JSON and in the binary tensor data extension (what tritonclient sends by default).

Binary form (https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md):

    | JSON header (Inference-Header-Content-Length bytes) | input 0 raw | input 1 raw | ...

an input whose `parameters.binary_data_size` is set takes its bytes, in order, from after the header
(row-major, little-endian); an output is sent the same way when the request says
`parameters.binary_data_output: true` or the output's own `parameters.binary_data: true`.
The classification extension (`outputs[i].parameters.classification: k`) answers the top k of a
[batch, classes] output as BYTES "value:index[:label]", best first, like Triton.

Integer tensors (UINT8, INT64) accept integral JSON floats (`3.0`): JSON has one number type and
generated clients (open-inference-openapi) write every number as a float; `3.5` is refused.
NaN and infinities are refused in FP32 inputs (JSON cannot carry them back out). No torch here.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

DTYPES = {"UINT8": np.dtype("<u1"), "INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}  # wire, little-endian
REQUEST_KEYS = {"id", "inputs", "outputs", "parameters", "model_name", "model_version"}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a message for people, the request `field` at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class Wanted:
    """One output the client asked for."""

    name: str
    binary: bool = False
    classification: int = 0          # top k as BYTES (0: the tensor itself)


@dataclass
class InferRequest:
    feeds: dict[str, np.ndarray]
    outputs: list[Wanted]
    id: str | None = None
    parameters: dict = field(default_factory=dict)


def parse_json(raw: bytes, what: str = "the body") -> dict:
    """A JSON object, strictly (orjson: no NaN/Infinity, no lone surrogates, no numbers past float64, at
    most 1024 levels deep). orjson: 35 us for a 3 x 32 x 32 image's body vs json.loads' 137 us (measured),
    a tenth of a 1-client JSON /infer request."""
    try:
        body = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
        constant = next((c for c in ("NaN", "Infinity") if c.encode() in raw), None)  # what json.dumps writes
        reason = f"{constant} is not JSON" if constant else str(exc)[:200]
        raise ApiError(400, f"{what} is not JSON ({reason})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object", "body")
    return body


def _params(given, allowed: set, field_: str) -> dict:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ApiError(400, f"{field_} must be an object", field_)
    unknown = sorted(set(given) - allowed, key=str)
    if unknown:
        raise ApiError(400, f"{field_}.{unknown[0]} is not supported by ptpipe serve (it applies "
                            f"{', '.join(sorted(allowed)) or 'none'})", f"{field_}.{unknown[0]}")
    return given


def _flag(value, field_: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{field_} must be true or false, got {value!r}", field_)
    return value


def check_shape(spec, shape, caps: list[int | None], field_: str) -> list[int]:
    """`shape` against the model's tensor: fixed axes equal, dynamic ones within `caps`."""
    example = [d if isinstance(d, int) else -1 for d in spec.shape]
    if (not isinstance(shape, list) or len(shape) != len(spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ApiError(400, f"{spec.name}: shape must be {len(spec.shape)} non-negative integers like {example}, "
                            f"got {shape!r}"[:300], field_)
    for axis, (want, got, cap) in enumerate(zip(spec.shape, shape, caps)):
        if isinstance(want, int) and want != got:
            raise ApiError(400, f"{spec.name}: shape axis {axis} must be {want}, got {got}", field_)
        if cap is not None and got > cap:
            raise ApiError(400, f"{spec.name}: axis {axis} ({want}) is {got}, over the limit of {cap}", field_)
    return shape


def _from_json(spec, data, count: int, field_: str) -> np.ndarray:
    """JSON numbers (flat or nested lists) -> a flat array of the spec's dtype, or a 400 saying why not."""
    if not isinstance(data, list):
        raise ApiError(400, f"{spec.name}: data must be a list of numbers", field_)
    try:
        array = np.array(data).ravel()  # one C pass; int64 for ints, float64 when any float
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ApiError(400, f"{spec.name}: data is not a tensor of numbers (ragged or nested too deeply)",
                       field_) from None
    if array.size != count:
        raise ApiError(400, f"{spec.name}: data has {array.size} values, the shape needs {count}", field_)
    if array.dtype.kind not in "iuf" and array.size:
        raise ApiError(400, f"{spec.name}: data must be numbers (no booleans, strings, objects or "
                            f"integers beyond 64 bits)", field_)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            out = array.astype(dtype)
        if not np.isfinite(out).all():
            raise ApiError(400, f"{spec.name}: values must be finite FP32 numbers", field_)
        return out
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.floor(array)).all()):
        raise ApiError(400, f"{spec.name}: {spec.datatype} data must be integers (3 or 3.0)", field_)
    info = np.iinfo(dtype)
    if array.size and not (info.min <= array.min() and array.max() <= info.max):
        raise ApiError(400, f"{spec.name}: values must lie in {info.min}..{info.max}", field_)
    return array.astype(dtype)


def _from_binary(spec, raw: memoryview, count: int, field_: str) -> np.ndarray:
    wire = DTYPES[spec.datatype]
    if len(raw) != count * wire.itemsize:
        raise ApiError(400, f"{spec.name}: binary_data_size is {len(raw)} bytes, the shape needs "
                            f"{count * wire.itemsize}", field_)
    array = np.frombuffer(raw, dtype=wire).astype(spec.dtype, copy=False)
    if wire.kind == "f" and not np.isfinite(array).all():
        raise ApiError(400, f"{spec.name}: values must be finite FP32 numbers", field_)
    return array


def split_binary(body: bytes, header_length: str | None, max_json_bytes: int) -> tuple[dict, memoryview]:
    """(JSON header, the raw bytes after it) of a request; without Inference-Header-Content-Length the
    whole body is JSON and nothing follows."""
    if header_length is None:
        size = len(body)
    elif not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise ApiError(400, f"Inference-Header-Content-Length must be the JSON header's size, at most the body's "
                            f"{len(body)} bytes, got {header_length[:40]!r}", "Inference-Header-Content-Length")
    else:
        size = int(header_length)
    if size > max_json_bytes:
        raise ApiError(413, f"a JSON body of {size} bytes is over the limit of {max_json_bytes}: send large tensors "
                            f"binary (binary_data_size, Inference-Header-Content-Length)", "body")
    view = memoryview(body)
    return parse_json(view[:size].tobytes() if header_length is not None else body), view[size:]


def read_infer(body: bytes, header_length: str | None, inputs: list, outputs: list,
               caps: dict[str, list[int | None]], max_json_bytes: int) -> InferRequest:
    """The feeds and wanted outputs of an infer request, checked against the model's tensors
    (`inputs`/`outputs`: served.TensorInfo; `caps`: per input, the largest size of each axis)."""
    head, tail = split_binary(body, header_length, max_json_bytes)
    unknown = sorted(set(head) - REQUEST_KEYS, key=str)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}: an infer request has {', '.join(sorted(REQUEST_KEYS))}",
                       unknown[0] or "body")
    if "id" in head and not isinstance(head["id"], str):
        raise ApiError(400, "id must be a string", "id")
    parameters = _params(head.get("parameters"), {"binary_data_output"}, "parameters")
    binary_default = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    feeds, offset = _read_inputs(head.get("inputs"), tail, inputs, caps)
    if offset != len(tail):
        raise ApiError(400, f"{len(tail) - offset} bytes after the JSON header belong to no input "
                            f"(binary_data_size)", "body")
    return InferRequest(feeds, _read_outputs(head.get("outputs"), outputs, binary_default), head.get("id"),
                        parameters)


def _read_inputs(given, tail: memoryview, specs: list, caps: dict) -> tuple[dict, int]:
    if not isinstance(given, list) or not all(isinstance(g, dict) for g in given):
        raise ApiError(400, "inputs must be a list of tensors {name, shape, datatype, data}", "inputs")
    by_name = {t.name: t for t in specs}
    feeds, offset = {}, 0
    for i, tensor in enumerate(given):
        field_, name = f"inputs[{i}]", tensor.get("name")
        if not isinstance(name, str) or name not in by_name:
            raise ApiError(400, f"unknown input {name!r}; the model takes {', '.join(by_name)}"[:300], f"{field_}.name")
        if name in feeds:
            raise ApiError(400, f"input {name!r} is given twice", f"{field_}.name")
        spec = by_name[name]
        if tensor.get("datatype") != spec.datatype:
            raise ApiError(400, f"{name}: datatype must be {spec.datatype}, got {tensor.get('datatype')!r}"[:300],
                           f"{field_}.datatype")
        shape = check_shape(spec, tensor.get("shape"), caps[name], f"{field_}.shape")
        params = _params(tensor.get("parameters"), {"binary_data_size"}, f"{field_}.parameters")
        size = params.get("binary_data_size")
        if size is None:
            flat = _from_json(spec, tensor.get("data"), math.prod(shape), f"{field_}.data")
        elif isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(tail) - offset:
            raise ApiError(400, f"{name}: binary_data_size must be an integer of at most the {len(tail) - offset} "
                                f"bytes left after the JSON header, got {size!r}"[:300],
                           f"{field_}.parameters.binary_data_size")
        elif "data" in tensor:
            raise ApiError(400, f"{name}: give data or binary_data_size, not both", f"{field_}.data")
        else:
            flat = _from_binary(spec, tail[offset:offset + size], math.prod(shape), f"{field_}.parameters")
            offset += size
        feeds[name] = flat.reshape(shape)
    missing = [n for n in by_name if n not in feeds]
    if missing:
        raise ApiError(400, f"missing input(s) {', '.join(missing)}", "inputs")
    return feeds, offset


def _read_outputs(asked, specs: list, binary_default: bool) -> list[Wanted]:
    names = [t.name for t in specs]
    if asked is None:
        return [Wanted(n, binary_default) for n in names]
    if not isinstance(asked, list) or not asked or not all(isinstance(o, dict) for o in asked):
        raise ApiError(400, f"outputs must be a list naming some of {', '.join(names)}", "outputs")
    wanted = []
    for i, output in enumerate(asked):
        field_ = f"outputs[{i}]"
        if output.get("name") not in names or not isinstance(output.get("name"), str):
            raise ApiError(400, f"unknown output {output.get('name')!r}; the model gives {', '.join(names)}"[:300],
                           f"{field_}.name")
        params = _params(output.get("parameters"), {"binary_data", "classification"}, f"{field_}.parameters")
        binary = _flag(params.get("binary_data", binary_default), f"{field_}.parameters.binary_data")
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ApiError(400, f"classification must be a count of classes >= 1, got {k!r}"[:200],
                           f"{field_}.parameters.classification")
        wanted.append(Wanted(output["name"], binary, k))
    return wanted


def classify(array: np.ndarray, k: int, labels: list[str] | None, field_: str) -> np.ndarray:
    """The classification extension: [batch, classes] scores -> [batch, k] "value:index[:label]", best first."""
    if array.ndim != 2:
        raise ApiError(400, f"classification needs a [batch, classes] output, this one is {list(array.shape)}", field_)
    if k > array.shape[1]:
        raise ApiError(400, f"classification {k} is more than the {array.shape[1]} classes", field_)
    order = np.argsort(-array, axis=1, kind="stable")[:, :k]
    if labels is not None and len(labels) != array.shape[1]:
        labels = None  # the output is not over the model's classes: index only
    rows = [[f"{row[j]:f}:{j}" + (f":{labels[j]}" if labels else "") for j in top] for row, top in zip(array, order)]
    return np.array(rows, dtype=object).reshape(len(rows), k)


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # each element: 4-byte little-endian length, then the UTF-8 bytes
        return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in array.ravel()))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def encode_response(head: dict, tensors: list[tuple[Wanted, str, np.ndarray]], max_json_values: int
                    ) -> tuple[bytes, int | None]:
    """(body, JSON header size or None) of an infer response: `head` (model_name, id, ...) plus each
    (wanted, datatype, array), in JSON or appended raw after the header as the request asked."""
    outputs, blobs = [], []
    for i, (want, datatype, array) in enumerate(tensors):
        out = {"name": want.name, "datatype": datatype, "shape": list(array.shape)}
        if want.binary:
            blob = _raw(array, datatype)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.size > max_json_values:
            raise ApiError(400, f"output {want.name} has {array.size} values, more than a JSON answer carries "
                                f"({max_json_values}): ask for it binary (outputs[{i}].parameters.binary_data: true)",
                           f"outputs[{i}]")
        elif datatype == "FP32" and not np.isfinite(array).all():
            raise ApiError(400, f"output {want.name} has NaN or infinite values, which JSON cannot carry: ask for it "
                                f"binary (outputs[{i}].parameters.binary_data: true)", f"outputs[{i}]")
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    header = dumps({**head, "outputs": outputs})
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def dumps(obj) -> bytes:
    """JSON as every response writes it: ASCII (a lone surrogate a client sent is escaped, not an
    encoding error), no NaN."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
