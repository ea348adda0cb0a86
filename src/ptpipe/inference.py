"""Inference through onnxruntime alone: image classification and the LSTM step for generation.

    ptpipe predict cat.jpg dog.png [--top-k 3] [--json] [--model models/cnn/model.onnx]

This module imports numpy, onnxruntime and (for images) Pillow, never torch: a deployment
needs the .onnx file and these three packages, nothing else (a test checks it in a fresh
process). Everything the files need to be used — class names, vocabulary, state sizes — is
read from their `metadata_props` (written by `ptpipe.export`).

Session options, chosen on purpose (benchmarks/inference.py measures them):
- `graph_optimization_level = ORT_ENABLE_ALL`: constant folding plus the fusions that matter
  here (Conv+BatchNorm, Conv+activation, GELU, MatMul+Add) and CPU layout optimisations.
- `intra_op_num_threads = 0` by default (`DEFAULT_THREADS`): onnxruntime's own default, one
  thread per physical core. Even at batch 1 (one image, one generated character) the second core
  pays on an otherwise idle machine: measured 1.6x for the default CNN and 1.35x for an LSTM step
  over one thread (benchmarks/README.md, `ort` vs `ort(1t)`). On a machine whose cores are busy
  with other work, a thread that is descheduled stalls every op: pass `threads=1`
  (`ptpipe predict/generate --threads 1`).
- `inter_op_num_threads = 1`, `execution_mode = ORT_SEQUENTIAL`: both graphs are chains with
  no independent branches to run in parallel.
- `enable_cpu_mem_arena` / `enable_mem_pattern` left on (defaults): repeated equal shapes
  (generation steps) reuse their buffers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ptpipe.stage import StageError

CNN_ONNX = Path("models/cnn/model.onnx")
LSTM_ONNX = Path("models/lstm/model.onnx")
IMAGE_SIZE = 32
DEFAULT_THREADS = 0  # intra-op threads: 0 = onnxruntime's default, one per physical core


def session_options(threads: int = DEFAULT_THREADS) -> ort.SessionOptions:
    """The options above; `threads` intra-op threads (0: one per physical core)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: shape-inference notices are not for users
    return opts


def open_session(path: str | Path, threads: int = DEFAULT_THREADS) -> ort.InferenceSession:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: run `dvc repro export` (or pass the model's path)")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise StageError(f"{path}: onnxruntime cannot load it ({exc})") from None


def read_metadata(session: ort.InferenceSession) -> dict:
    """The file's metadata_props, JSON-decoded (see ptpipe.export); a value that is not JSON stays a string."""
    def decode(value: str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:  # written by another tool
            return value

    return {key: decode(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}


def _open_kind(path: str | Path, kind: str, threads: int) -> tuple[ort.InferenceSession, dict]:
    """A session on `path` and its metadata, refusing a file exported for another kind of model."""
    session = open_session(path, threads)
    meta = read_metadata(session)
    if meta.get("ptpipe.kind") != kind:
        raise StageError(f"{path} is not a ptpipe {kind} model (its metadata says {meta.get('ptpipe.kind')!r})")
    return session, meta


# -- images ---------------------------------------------------------------------------------

def load_image(path: str | Path) -> np.ndarray:
    """Any PNG/JPEG (any size, mode, EXIF orientation) -> uint8 3 x 32 x 32 RGB, like CIFAR-10.

    CIFAR-10 images are square crops with the object centred: the largest centred square is cut
    out (no distortion of the aspect ratio), then resized to 32 x 32 with Pillow's antialiased
    bicubic filter. Raises StageError naming the file if it is not an image Pillow can read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:  # not an OSError: Pillow's guard against huge images
        raise StageError(f"{path}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise StageError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # HWC -> CHW


def _to_rgb(img):
    """8-bit RGB as CIFAR-10's: 16-bit grey scaled down (Pillow's convert would clip it to white),
    transparency composited onto white (not the arbitrary colours hidden under alpha 0)."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG grey
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """An exported CIFAR CNN: raw uint8 images -> class probabilities."""

    def __init__(self, path: str | Path = CNN_ONNX, threads: int = DEFAULT_THREADS):
        self.session, self.meta = _open_kind(path, "cnn", threads)
        self.classes: list[str] = self.meta["classes"]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x 32 x 32 -> float32 N x classes."""
        return self.session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        probs = softmax(self.logits(images).astype(np.float64))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


def predict_files(paths: list[str], model: str | Path = CNN_ONNX, top_k: int = 3, threads: int = DEFAULT_THREADS,
                  ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, str]]:
    """({path: [(class, probability)] best first}, {path: error}) — one bad file spoils nothing else."""
    images, good, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path))
            good.append(path)
        except StageError as err:
            errors[path] = str(err)
    results = {}
    if good:
        classifier = Classifier(model, threads)
        k = max(1, min(top_k, len(classifier.classes)))
        results = dict(zip(good, classifier.top_k(np.stack(images), k)))
    return results, errors


def predict_main(paths: list[str], model: str | Path = CNN_ONNX, top_k: int = 3, as_json: bool = False,
                 threads: int = DEFAULT_THREADS) -> int:
    """`ptpipe predict`: prints predictions (text or JSON), errors to stderr; 1 if any file failed."""
    results, errors = predict_files(paths, model, top_k, threads)
    if as_json:
        print(json.dumps({
            "predictions": {p: [{"label": c, "probability": round(q, 6)} for c, q in r] for p, r in results.items()},
            "errors": errors,
        }, indent=2))
    else:
        for path, ranked in results.items():
            print(f"{path}: " + ", ".join(f"{c} {q:.1%}" for c, q in ranked))
    for path, message in errors.items():
        print(f"error: {message}", file=sys.stderr)
    return 1 if errors else 0


# -- the character LSTM -------------------------------------------------------------------

class OnnxLstm:
    """An exported CharLSTM as a numpy step function `(ids, h, c) -> (logits, h, c)`."""

    def __init__(self, path: str | Path = LSTM_ONNX, threads: int = DEFAULT_THREADS):
        self.session, self.meta = _open_kind(path, "lstm", threads)
        self.vocab: list[str] = self.meta["vocab"]
        self.num_layers, self.hidden_size = self.meta["num_layers"], self.meta["hidden_size"]

    def init_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids int64 [B, T], h/c float32 [L, B, H] -> logits [B, T, V], h, c."""
        logits, h, c = self.session.run(None, {"ids": ids, "h0": h, "c0": c})
        return logits, h, c

