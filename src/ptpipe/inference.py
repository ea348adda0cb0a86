"""Inference through onnxruntime alone: any exported ptpipe model, chosen by what its file says.

    ptpipe predict cat.jpg dog.png [--top-k 3] [--json] [--model models/cnn/model.onnx]
    ptpipe generate --backend onnx --prompt "Alice" [--model models/lstm/model.onnx]

    model = open_model("models/lstm/model.onnx")    # a TextGenerator (its metadata says text-generation)
    model.generate("Alice", 100, temperature=0.8, seed=1)

This module imports numpy, onnxruntime and (for images) Pillow, never torch: a deployment
needs the .onnx file and these three packages, nothing else (a test checks it in a fresh
process). Everything the files need to be used — kind, task, input names, class names,
vocabulary, how generation feeds the model — is read from their `metadata_props` (written by
`ptpipe.export`, described by the model's kind in `ptpipe.kinds`). A file that is not a ptpipe
model, names an unknown kind, or was exported from another model.pt than the one beside it is a
one-line error.

`sample_ids`, the sampling loop (numpy RNG, inverse-CDF draw, temperature 0 = greedy), is the one
loop for every backend: ONNX here, eager PyTorch and TorchScript in `ptpipe.generate` only pass
another `run` function, so the same seed gives the same text everywhere.

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
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort

from ptpipe import files, kinds
from ptpipe.images import load_image  # the transform prepare uses too: images are fed as they were trained
from ptpipe.stage import StageError

MODELS_DIR = Path("models")
CNN_ONNX = MODELS_DIR / "cnn" / "model.onnx"  # `ptpipe predict`'s default model
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


def exported_file(model: str, backend: str = "onnx", models_dir: str | Path = MODELS_DIR) -> Path:
    """Where a model's file is (params.yaml models.<model>): models/<model>/model.onnx (or .ts, .pt)."""
    return Path(models_dir) / model / {"onnx": "model.onnx", "torchscript": "model.ts", "torch": "model.pt"}[backend]


def check_ptpipe_meta(meta: dict, path: str | Path, expect_kind: str | None = None) -> str:
    """The kind a file's metadata (ONNX metadata_props or TorchScript config.json) names, refusing a file
    that is not a ptpipe model, names an unknown kind, or is of another kind than `expect_kind`."""
    kind = meta.get("ptpipe.kind")
    if kind is None:
        raise StageError(f"{path} is not a ptpipe model (its metadata has no ptpipe.kind)"
                         + (f": expected a ptpipe {expect_kind} model" if expect_kind else ""))
    kinds.check_known(kind, path)
    if expect_kind and kind != expect_kind:
        raise StageError(f"{path} is not a ptpipe {expect_kind} model (its metadata says {kind!r})")
    if "ptpipe.task" not in meta or "inputs" not in meta:
        raise StageError(f"{path} was exported by an older ptpipe (no ptpipe.task/inputs): run `dvc repro export`")
    return kind


def check_fresh(path: str | Path, meta: dict) -> None:
    """An export whose `source_md5` differs from the model.pt beside it is stale (the model was retrained
    and not exported again): refused, since it would silently serve the old model. Without a model.pt
    beside it (a deployed or fetched file) there is nothing to compare."""
    source = Path(path).with_name("model.pt")
    recorded = meta.get("source_md5")
    if not source.is_file() or recorded is None:
        return
    actual = files.digest(source, "md5")  # the hash export recorded, and dvc.lock records
    if actual != recorded:
        raise StageError(f"{path} is stale: it was exported from another {source} (source_md5 {recorded[:8]}..., "
                         f"the file now hashes {actual[:8]}...): run `dvc repro export`")


_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32"}


def check_inputs(session: ort.InferenceSession, expected: list[dict], path: str | Path) -> None:
    """The graph's inputs are the ones `expected` ([{name, dtype, shape}]) names, in order, with those dtypes."""
    got = [(i.name, _ORT_TYPES.get(i.type, i.type)) for i in session.get_inputs()]
    want = [(i["name"], i["dtype"]) for i in expected]
    if got != want:
        raise StageError(f"{path}: its graph takes {', '.join(f'{n} {t}' for n, t in got) or 'nothing'}, "
                         f"its kind expects {', '.join(f'{n} {t}' for n, t in want)}: "
                         f"not a file written by `ptpipe.export` (run `dvc repro export`)")


def open_checked(path: str | Path, threads: int = DEFAULT_THREADS, expect_kind: str | None = None,
                 check_source: bool = True) -> tuple[ort.InferenceSession, dict]:
    """(session, metadata) of an exported ptpipe model, refusing foreign, unknown-kind and stale files."""
    session = open_session(path, threads)
    meta = read_metadata(session)
    check_ptpipe_meta(meta, path, expect_kind)
    check_inputs(session, meta["inputs"], path)
    if check_source:
        check_fresh(path, meta)
    return session, meta


def onnx_runner(session: ort.InferenceSession) -> Callable[[dict], dict]:
    """feeds {input name: array} -> {output name: array}: the form every backend's `run` takes."""
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds)))


class ExportedModel:
    """An exported ptpipe model on onnxruntime: `kind`, `meta` (its metadata), `session`, `run`."""

    task = ""

    def __init__(self, path: str | Path, threads: int = DEFAULT_THREADS, *, check_source: bool = True,
                 _opened: tuple[ort.InferenceSession, dict] | None = None):
        self.path = Path(path)
        self.session, self.meta = _opened or open_checked(path, threads, check_source=check_source)
        self.kind: str = self.meta["ptpipe.kind"]
        if self.meta["ptpipe.task"] != self.task:
            raise StageError(f"{path} is a ptpipe {self.kind} model for {self.meta['ptpipe.task']}, not {self.task}")
        self.run = onnx_runner(self.session)


def open_model(path: str | Path, threads: int = DEFAULT_THREADS, check_source: bool = True
               ) -> "ImageClassifier | TextGenerator":
    """The runtime object for an exported file, chosen by its metadata's `ptpipe.task`."""
    opened = open_checked(path, threads, check_source=check_source)
    task = opened[1]["ptpipe.task"]
    if task not in TASKS:
        raise StageError(f"{path}: ptpipe.task {task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task](path, _opened=opened)


# -- images ---------------------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ImageClassifier(ExportedModel):
    """An exported image classifier: raw uint8 images -> class probabilities."""

    task = "image-classification"

    def __init__(self, path: str | Path = CNN_ONNX, threads: int = DEFAULT_THREADS, **kwargs):
        super().__init__(path, threads, **kwargs)
        self.classes: list[str] = self.meta["classes"]
        self.image_size: int = self.meta.get("image_size", 32)  # what its images are resized to
        self._input, self._output = self.meta["inputs"][0]["name"], self.meta["outputs"][0]["name"]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x S x S -> float32 N x classes."""
        return self.session.run([self._output], {self._input: np.ascontiguousarray(images, dtype=np.uint8)})[0]

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        probs = softmax(self.logits(images).astype(np.float64))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


def predict_files(paths: list[str], model: str | Path = CNN_ONNX, top_k: int = 3, threads: int = DEFAULT_THREADS,
                  ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, str]]:
    """({path: [(class, probability)] best first}, {path: error}) — one bad file spoils nothing else."""
    classifier = ImageClassifier(model, threads)
    images, good, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path, classifier.image_size))
            good.append(path)
        except StageError as err:
            errors[path] = str(err)
    results = {}
    if good:
        k = min(top_k, len(classifier.classes))
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


# -- text generation ----------------------------------------------------------------------

Run = Callable[[dict], dict]  # {input name: array} -> {output name: array}, any backend


def encode(prompt: str, vocab: list[str]) -> list[int]:
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in prompt if ch not in index})
    if unknown:
        raise StageError(f"prompt characters not in the model's vocabulary: {', '.join(map(repr, unknown))} "
                         f"(the vocabulary has {len(vocab)} characters from the training text)")
    if not prompt:
        raise StageError("the prompt is empty: give at least one character to start from")
    return [index[ch] for ch in prompt]


def _draw(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    last = logits.astype(np.float64)  # [V]
    if temperature == 0:
        return int(np.argmax(last))
    z = last / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    # Inverse-CDF draw: one uniform per character, the same on every backend.
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


class Sequence:
    """One generation in progress: its ids so far (prompt and drawn), where what the model carries for it is
    (`origin`: the outputs of the call that last fed it, its row there and that row's left padding; None
    before its first call and when a cached model's cache is full), how many positions that holds
    (`cached`), and its own seeded RNG: what it draws never depends on other rows."""

    def __init__(self, prompt_ids: list[int], temperature: float, seed: int):
        self.ids, self.temperature = list(prompt_ids), temperature
        self.rng = np.random.default_rng(seed)
        self.origin: tuple[dict, int, int] | None = None
        self.cached = 0
        self.refeed: int | None = None  # ids a re-prefill feeds once a cached model's cache is full (its `keep`)


def step(run: Run, meta: dict, seqs: list[Sequence]) -> list[int]:
    """Draw the next id of every sequence, rows that need the same kind of call sharing one. How a model
    is fed is its metadata's `generation`:
      "recurrent" (LSTM): the prompt in one call from a zero state, then one id a call with the state
          carried (`state`: which output feeds which input);
      "cached" (gpt): the prompt (its last `block_size` ids) in one call with an empty past, then one id
          a call with the keys and values carried (`past`: which outputs feed which inputs); rows of other
          lengths share a call, left-padded (prompts, and pasts), `pad` saying by how much. When the cache
          holds `block_size` positions and cannot take one more, the row is re-fed its last `keep` ids with
          an empty past and goes on cached (llama.cpp's context shift, by re-prefill: learned absolute
          positions make every cached key invalid once the window slides). keep = block_size re-feeds the
          whole window every step past the block: the text of the uncached model, ~5x slower;
      "window": the last `block_size` ids every step, nothing carried.
    The same ids come out for a row alone or among others (up to float rounding in the batched matmuls)."""
    gen = meta["generation"]
    if gen["mode"] not in ("recurrent", "cached", "window"):
        raise StageError(f"{meta.get('ptpipe.kind')}: generation mode {gen['mode']!r} is not recurrent, cached "
                         f"or window")
    groups: dict[tuple, list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(_call(gen, seq), []).append(i)
    logits: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
    for call, rows in groups.items():
        for i, row_logits in zip(rows, _run_group(run, meta, call, [seqs[i] for i in rows])):
            logits[i] = row_logits
    drawn = []
    for seq, row_logits in zip(seqs, logits):
        drawn.append(_draw(row_logits, seq.temperature, seq.rng))
        seq.ids.append(drawn[-1])
    return drawn


def _call(gen: dict, seq: Sequence) -> tuple:
    """What one row needs fed next: ("window", width), ("prompt", width; 0: any) or ("step",). A prompt
    call feeds a row its last `seq.refeed` ids (None: all, up to the block) and carries what comes out."""
    if gen["mode"] == "window":
        return ("window", min(len(seq.ids), int(gen["block_size"])))
    if gen["mode"] == "cached" and seq.origin is not None and seq.cached >= gen["block_size"]:
        seq.origin, seq.refeed = None, int(gen.get("keep", gen["block_size"]))  # the cache is full
    if seq.origin is None:  # a model with `pad` takes prompts of any lengths together, left-padded
        return ("prompt", 0 if gen.get("pad") else len(_fed(gen, seq)))
    return ("step",)


def _fed(gen: dict, seq: Sequence) -> list[int]:
    """The ids a row's prompt call feeds: the last `refeed` after a full cache, else the prompt (a cached or
    window model's last block_size)."""
    return seq.ids[-(seq.refeed or gen.get("block_size") or len(seq.ids)):]


def empty_input(spec: dict, batch: int) -> np.ndarray:
    """Zeros of an input's shape: `batch` rows, its other dynamic axes (a past's length) empty."""
    return np.zeros([batch if d == "batch" else 0 if isinstance(d, str) else d for d in spec["shape"]], spec["dtype"])


def _run_group(run: Run, meta: dict, call: tuple, seqs: list[Sequence]) -> list[np.ndarray]:
    """One model call for rows needing the same `call`; each row's `origin` updated; each row's last logits."""
    gen, inputs = meta["generation"], {i["name"]: i for i in meta["inputs"]}
    ids_name, logits_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    n, carried = len(seqs), (gen["past"] if gen["mode"] == "cached" else gen.get("state", []))
    if call[0] == "step":
        feeds = {ids_name: np.asarray([[s.ids[-1]] for s in seqs], np.int64)}
        pads = [0] * n
        last = _same_call(gen, inputs, seqs, carried)
        for c in carried:
            if last is not None:  # the rows of the last call, in its order: what it gave, as it gave it
                feeds[c["input"]], pads = last[c["output"]], [s.origin[2] for s in seqs]
                continue
            axis, length_axis = inputs[c["input"]]["shape"].index("batch"), c.get("length_axis")
            states = [_row(s.origin[0][c["output"]], axis, s.origin[1], length_axis, s.origin[2]) for s in seqs]
            feeds[c["input"]], pads = _stack(states, axis, length_axis)
    else:  # a window (the last block_size ids) or a prompt (rows' _fed ids, shorter ones left-padded)
        rows = [s.ids[-call[1]:] for s in seqs] if call[0] == "window" else [_fed(gen, s) for s in seqs]
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        feeds = {ids_name: np.asarray([[0] * pad + r for r, pad in zip(rows, pads)], np.int64)}
        feeds.update({c["input"]: empty_input(inputs[c["input"]], n) for c in carried})
    if gen.get("pad"):
        feeds[gen["pad"]] = np.asarray(pads, np.int64)
    out = run(feeds)
    if call[0] != "window":  # a window carries nothing: every step re-feeds it
        for r, seq in enumerate(seqs):
            seq.origin, seq.cached = (out, r, pads[r]), seq.cached + 1 if call[0] == "step" else len(rows[r])
    return [out[logits_name][r, -1] for r in range(n)]


def _same_call(gen: dict, inputs: dict, seqs: list[Sequence], carried: list[dict]) -> dict | None:
    """The outputs of the call that gave every row its state, when the rows are all of its rows in its order
    and its padded past has room for one more id: then the step feeds them back whole. Restacking the rows
    copies the whole cache (16 rows of gpt at 127 positions: ~0.9 ms, as long as the model call's own
    copies); it is needed only when rows join, leave, or re-prefill."""
    out = seqs[0].origin[0] if seqs[0].origin else None
    if out is None or not carried or any(s.origin is None or s.origin[0] is not out or s.origin[1] != r
                                         for r, s in enumerate(seqs)):
        return None
    c = carried[0]
    carried_out = out[c["output"]]
    if carried_out.shape[inputs[c["input"]]["shape"].index("batch")] != len(seqs):
        return None
    if c.get("length_axis") is not None and carried_out.shape[c["length_axis"]] >= gen.get("block_size", 1 << 62):
        return None  # left padding fills the positions: restacked, the rows' padding shrinks to the longest's
    return out


def _stack(states: list[np.ndarray], batch_axis: int, length_axis: int | None) -> tuple[np.ndarray, list[int]]:
    """Rows' states side by side on `batch_axis`; along `length_axis` (a past) the shorter ones left-padded
    with zeros: (the batch, each row's padding)."""
    if length_axis is None:
        return (np.ascontiguousarray(states[0]) if len(states) == 1 else np.concatenate(states, batch_axis)), \
            [0] * len(states)
    longest = max(s.shape[length_axis] for s in states)
    if len(states) == 1:
        return np.ascontiguousarray(states[0]), [0]
    shape = list(states[0].shape)
    shape[batch_axis], shape[length_axis] = len(states), longest
    batch = np.zeros(shape, states[0].dtype)
    pads = [longest - s.shape[length_axis] for s in states]
    for r, (s, pad) in enumerate(zip(states, pads)):
        index = [slice(None)] * len(shape)
        index[batch_axis], index[length_axis] = slice(r, r + 1), slice(pad, None)
        batch[tuple(index)] = s
    return batch, pads


def _row(out: np.ndarray, batch_axis: int, r: int, length_axis: int | None, pad: int) -> np.ndarray:
    """Row r of a carried output (a view), less its left padding along `length_axis`."""
    index = [slice(None)] * out.ndim
    index[batch_axis] = slice(r, r + 1)
    if length_axis is not None:
        index[length_axis] = slice(pad, None)
    return out[tuple(index)]


def sample_ids(run: Run, meta: dict, prompt_ids: list[int], length: int, temperature: float, seed: int
               ) -> Iterator[int]:
    """`length` ids sampled after the prompt, one at a time (`step` on one row); temperature 0 = greedy."""
    seq = Sequence(prompt_ids, temperature, seed)
    for _ in range(length):
        yield step(run, meta, [seq])[0]


def with_keep(meta: dict, keep: int | None) -> dict:
    """The metadata with its cached generation's `keep` replaced (None: as it is); checked against the model."""
    if keep is None:
        return meta
    gen = meta["generation"]
    if gen["mode"] != "cached":
        raise StageError(f"--keep is for models with a key/value cache (gpt); {meta.get('ptpipe.kind')} generates "
                         f"in {gen['mode']} mode: leave --keep out")
    if not 1 <= keep <= gen["block_size"]:
        raise StageError(f"--keep must be 1..{gen['block_size']} (the model's block_size: {gen['block_size']} re-feeds "
                         f"the whole window every character past the block, the uncached model's text); got {keep}")
    return {**meta, "generation": {**gen, "keep": keep}}


def stream_text(run: Run, meta: dict, prompt: str, length: int, temperature: float, seed: int) -> Iterator[str]:
    """The generated characters (not the prompt), one at a time. Bad arguments raise here, before the
    first character."""
    if temperature < 0:
        raise StageError(f"--temperature must be >= 0 (got {temperature}); 0 = greedy")
    if length < 0:
        raise StageError(f"--length must be >= 0 (got {length})")
    vocab = meta["vocab"]
    ids = encode(prompt, vocab)
    return (vocab[i] for i in sample_ids(run, meta, ids, length, temperature, seed))


class TextGenerator(ExportedModel):
    """An exported text model: `generate` is what `ptpipe generate` prints, `stream` the same one
    character at a time."""

    task = "text-generation"

    def __init__(self, path: str | Path = MODELS_DIR / "lstm" / "model.onnx", threads: int = DEFAULT_THREADS,
                 **kwargs):
        super().__init__(path, threads, **kwargs)
        self.vocab: list[str] = self.meta["vocab"]

    def stream(self, prompt: str, length: int, temperature: float = 0.8, seed: int = 1) -> Iterator[str]:
        return stream_text(self.run, self.meta, prompt, length, temperature, seed)

    def generate(self, prompt: str, length: int, temperature: float = 0.8, seed: int = 1) -> str:
        return prompt + "".join(self.stream(prompt, length, temperature, seed))


TASKS = {"image-classification": ImageClassifier, "text-generation": TextGenerator}
