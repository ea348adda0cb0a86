"""Text generation from the trained character LSTM: `ptpipe generate --prompt "Alice" ...`.

The sampling loop only sees a step function `(ids [1, T] int64, h, c) -> (logits [1, T, V], h, c)`
on numpy arrays, so the same loop (and the same seeded numpy RNG) drives the eager model here
and an exported TorchScript/ONNX model later. The prompt is fed in one call to warm the state;
then one character at a time is sampled and fed back with the state carried.

Backends (`ptpipe generate --backend`): `torch` (eager, from models/lstm/model.pt), `torchscript`
(models/lstm/model.ts) and `onnx` (models/lstm/model.onnx through onnxruntime: this module
imports torch only for the first two, so the ONNX path runs where torch is not installed). Only
the step function differs; the loop and its RNG are shared, so the same seed, prompt and
temperature give the same text on every backend (tests check it).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ptpipe.stage import StageError

if TYPE_CHECKING:
    from ptpipe.lstm import CharLSTM

BACKENDS = ("torch", "torchscript", "onnx")
DEFAULT_MODELS = {"torch": "models/lstm/model.pt", "torchscript": "models/lstm/model.ts",
                  "onnx": "models/lstm/model.onnx"}

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def torch_step(model: CharLSTM) -> Step:
    """The eager model (or a TorchScript module with the same signature) as a numpy step function."""
    import torch

    @torch.no_grad()
    def step(ids, h, c):
        logits, h, c = model(torch.from_numpy(ids), torch.from_numpy(h), torch.from_numpy(c))
        return logits.numpy(), h.numpy(), c.numpy()

    return step


def encode(prompt: str, vocab: list[str]) -> list[int]:
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in prompt if ch not in index})
    if unknown:
        raise StageError(f"prompt characters not in the model's vocabulary: {', '.join(map(repr, unknown))} "
                         f"(the vocabulary has {len(vocab)} characters from the training text)")
    if not prompt:
        raise StageError("the prompt is empty: give at least one character to start from")
    return [index[ch] for ch in prompt]


def sample(step: Step, prompt_ids: list[int], length: int, temperature: float, seed: int,
           state: tuple[np.ndarray, np.ndarray]) -> list[int]:
    """`length` ids sampled after the prompt; temperature 0 = greedy (argmax)."""
    rng = np.random.default_rng(seed)
    h, c = state
    logits, h, c = step(np.asarray([prompt_ids], dtype=np.int64), h, c)  # warm the state on the prompt
    out: list[int] = []
    for _ in range(length):
        last = logits[0, -1].astype(np.float64)  # [V]
        if temperature == 0:
            nxt = int(np.argmax(last))
        else:
            z = last / temperature
            p = np.exp(z - z.max())
            cdf = np.cumsum(p)
            # Inverse-CDF draw: one uniform per character, the same on every backend.
            nxt = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
        out.append(nxt)
        logits, h, c = step(np.asarray([[nxt]], dtype=np.int64), h, c)
    return out


def generate_with(step: Step, state: tuple[np.ndarray, np.ndarray], vocab: list[str], prompt: str,
                  length: int, temperature: float, seed: int) -> str:
    """The prompt followed by `length` generated characters, from any backend's step function."""
    if temperature < 0:
        raise StageError(f"--temperature must be >= 0 (got {temperature}); 0 = greedy")
    ids = encode(prompt, vocab)
    return prompt + "".join(vocab[i] for i in sample(step, ids, length, temperature, seed, state))


def generate(model: CharLSTM, vocab: list[str], prompt: str, length: int, temperature: float, seed: int) -> str:
    """The prompt followed by `length` generated characters (eager PyTorch backend)."""
    h, c = (t.numpy() for t in model.init_state(1))
    return generate_with(torch_step(model), (h, c), vocab, prompt, length, temperature, seed)


def _zeros(num_layers: int, hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (num_layers, 1, hidden_size)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def load_backend(backend: str, path: str | Path | None = None, threads: int = 0
                 ) -> tuple[Step, tuple[np.ndarray, np.ndarray], list[str]]:
    """(step function, zero state for batch 1, vocabulary) of one backend's model file;
    `threads`: CPU threads of the backend (0 = its default, one per core)."""
    if backend not in BACKENDS:
        raise StageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    path = Path(path or DEFAULT_MODELS[backend])
    if backend != "onnx" and threads > 0:
        import torch

        torch.set_num_threads(threads)
    if backend == "torch":
        from ptpipe.lstm import load_model

        model, config = load_model(path)
        return torch_step(model), tuple(t.numpy() for t in model.init_state(1)), config["vocab"]
    if backend == "onnx":
        from ptpipe.inference import OnnxLstm

        lstm = OnnxLstm(path, threads)
        return lstm.step, lstm.init_state(1), lstm.vocab
    from ptpipe.export import load_torchscript

    module, meta = load_torchscript(path)
    if meta.get("ptpipe.kind") != "lstm":
        raise StageError(f"{path} is not a ptpipe lstm model (its config.json says {meta.get('ptpipe.kind')!r})")
    return torch_step(module), _zeros(meta["num_layers"], meta["hidden_size"]), meta["vocab"]


def main(prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 1,
         model_path: str | Path | None = None, backend: str = "torch", threads: int = 0) -> str:
    step, state, vocab = load_backend(backend, model_path, threads)
    text = generate_with(step, state, vocab, prompt, length, temperature, seed)
    print(text)
    return text
