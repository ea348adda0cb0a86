"""Text generation from the trained character LSTM: `ptpipe generate --prompt "Alice" ...`.

The sampling loop only sees a step function `(ids [1, T] int64, h, c) -> (logits [1, T, V], h, c)`
on numpy arrays, so the same loop (and the same seeded numpy RNG) drives the eager model here
and an exported TorchScript/ONNX model later. The prompt is fed in one call to warm the state;
then one character at a time is sampled and fed back with the state carried.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ptpipe.lstm import CharLSTM, build_model
from ptpipe.stage import StageError

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def load_model(path: str | Path) -> tuple[CharLSTM, list[str]]:
    """(eval-mode CPU model, vocabulary) from a models/lstm/model.pt, without reading params.yaml."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: train it first (`dvc repro train_lstm`) or pass --model")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(**saved["config"]["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["config"]["vocab"]


def torch_step(model: CharLSTM) -> Step:
    """The eager model as a numpy step function."""

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


def generate(model: CharLSTM, vocab: list[str], prompt: str, length: int, temperature: float, seed: int) -> str:
    """The prompt followed by `length` generated characters (eager PyTorch backend)."""
    if temperature < 0:
        raise StageError(f"--temperature must be >= 0 (got {temperature}); 0 = greedy")
    ids = encode(prompt, vocab)
    h, c = (t.numpy() for t in model.init_state(1))
    return prompt + "".join(vocab[i] for i in sample(torch_step(model), ids, length, temperature, seed, (h, c)))


def main(prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 1,
         model_path: str | Path = "models/lstm/model.pt") -> str:
    model, vocab = load_model(model_path)
    text = generate(model, vocab, prompt, length, temperature, seed)
    print(text)
    return text
