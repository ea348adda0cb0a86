"""Model kind `lstm`: the character-level LSTM language model, and how text is cut into TBPTT windows for it.

Unlike the tutorial's model this one is unidirectional (a bidirectional LSTM has already
read the character it is asked to predict), and its state is explicit: `forward` takes and
returns (h, c), so training carries it from window to window and the exported graph can
step one character at a time.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import numpy as np

from ptpipe import kinds
from ptpipe.data import load_text
from ptpipe.stage import StageError


def check_lengths(train_chars: int | None, val_chars: int, batch_size: int, seq_len: int, eval_streams: int,
                  world_size: int = 1) -> None:
    """Enough text for the streams, before anything runs: each epoch drops up to seq_len - 1 leading
    characters (its random window phase), and every stream needs at least 2 characters."""
    if train_chars is not None and train_chars - (seq_len - 1) < batch_size * world_size * 2:
        raise StageError(f"the training text has {train_chars} characters: too few for lstm.batch_size={batch_size} "
                         f"streams (x {world_size} processes) with lstm.seq_len={seq_len}; lower lstm.batch_size")
    if val_chars < eval_streams * 2:
        raise StageError(f"the validation text has {val_chars} characters: too few for "
                         f"lstm.eval_streams={eval_streams}; lower lstm.eval_streams")


class CharLSTM(nn.Module):
    """Embedding -> dropout -> LSTM (dropout between layers) -> dropout -> Linear to the vocabulary."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                 dropout: float, tie_weights: bool):
        super().__init__()
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(f"tie_weights needs embedding_size == hidden_size "
                             f"(got {embedding_size} and {hidden_size})")
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies `dropout` to the outputs of every layer but the last.
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            # One matrix both reads and writes characters ("Using the Output Embedding", Press & Wolf 2017).
            self.decoder.weight = self.embed.weight

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each [num_layers, batch, hidden]."""
        zeros = torch.zeros(self.num_layers, batch, self.hidden_size, device=device)
        return zeros, zeros.clone()

    def forward(self, ids: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, T] int64, h0/c0 [L, B, H] -> logits [B, T, V], h [L, B, H], c [L, B, H]."""
        x = self.drop(self.embed(ids))  # [B, T, E]
        out, (h, c) = self.lstm(x, (h0, c0))  # out [B, T, H]
        return self.decoder(self.drop(out)), h, c


def build_model(vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                dropout: float, tie_weights: bool) -> CharLSTM:
    """The model from the `model_args` saved in model.pt (export and inference call this too)."""
    return CharLSTM(vocab_size, embedding_size, hidden_size, num_layers, dropout, tie_weights)


def build(config: dict) -> CharLSTM:
    return build_model(**config["model_args"])


def load_model(path: str | Path) -> tuple[CharLSTM, dict]:
    """(eval-mode model on the CPU, its config, `data.vocab` included) from models/lstm/model.pt alone."""
    _, model, config = kinds.load(path, "lstm")
    return model, config


def example_inputs(model: CharLSTM, config: dict) -> tuple[torch.Tensor, ...]:
    # batch 2, length 5: sizes 0/1 would invite the exporter to specialise those axes
    return (torch.zeros(2, 5, dtype=torch.int64), *model.init_state(2))


def metadata(config: dict) -> dict:
    args = config["model_args"]
    state = [{"input": i, "output": o, "shape": [args["num_layers"], "batch", args["hidden_size"]]}
             for i, o in (("h0", "h"), ("c0", "c"))]
    return {"vocab": config["data"]["vocab"], "generation": {"mode": "recurrent", "state": state}}


def _windows(ids: np.ndarray, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive windows [batch, seq_len] of `batch` contiguous streams of the text."""
    need = batch * 2 * seq_len
    stream = np.resize(ids, max(need, len(ids)))[: need]  # np.resize repeats a short text
    rows = stream.reshape(batch, 2 * seq_len).astype(np.int64)
    return rows[:, :seq_len].copy(), rows[:, seq_len:].copy()


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    """`batch` streams of validation text x `seq` characters, each once from a zero state and once
    more for the next window from the state that backend itself returned (the carry generation relies
    on). Short texts (test fixtures) are repeated to fill the windows."""
    batches, seq_lens = kinds.shape_params(shapes, "lstm", "batch"), kinds.shape_params(shapes, "lstm", "seq")
    _, val_ids, _ = load_text(prepared_dir)
    args = config["model_args"]
    cases = []
    for b in batches:
        for t in seq_lens:
            first, second = _windows(val_ids.numpy(), b, t)
            zeros = np.zeros((args["num_layers"], b, args["hidden_size"]), np.float32)
            start = {"ids": first, "h0": zeros, "c0": zeros.copy()}
            cases.append(kinds.Case(f"batch={b} seq={t} state=zero", [start]))
            cases.append(kinds.Case(f"batch={b} seq={t} state=carried", [start, {"ids": second}],
                                    carry={"h": "h0", "c": "c0"}))
    return cases


KIND = kinds.ModelKind(
    name="lstm", task="text-generation", train_stage="train_lstm", prepared="alice",
    inputs=(kinds.TensorSpec("ids", "int64", ("batch", "seq")),
            kinds.TensorSpec("h0", "float32", ("num_layers", "batch", "hidden_size")),
            kinds.TensorSpec("c0", "float32", ("num_layers", "batch", "hidden_size"))),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "seq", "vocab_size")),
             kinds.TensorSpec("h", "float32", ("num_layers", "batch", "hidden_size")),
             kinds.TensorSpec("c", "float32", ("num_layers", "batch", "hidden_size"))),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
)


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """Cut a 1-D id stream into `streams` contiguous rows, dropping the tail that does not fit.

    With the alphabet as the text and streams=4:

        a b c d e f g h i j k l m n o p q r s t u v w x y z
        ->
        ┌ a b c d e f ┐
        │ g h i j k l │   row b continues where it left off in the next window,
        │ m n o p q r │   so the state of row b is carried from window to window
        └ s t u v w x ┘   (y z dropped)

    Windows then cut the columns: with seq_len=2 the first window reads columns 0-1 and
    predicts columns 1-2 (`windows`), the second reads 2-3 and predicts 3-4, and so on.
    The rows are independent, so every row is a separate sequence in the batch.
    """
    length = ids.numel() // streams
    if length < 2:
        raise ValueError(f"{ids.numel()} characters cannot fill {streams} streams of at least 2")
    return ids[: length * streams].view(streams, length)  # [streams, length]


def windows(data: torch.Tensor, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, t], targets [B, t]) for consecutive windows of `data` [B, N], t <= seq_len."""
    for i in range(0, data.size(1) - 1, seq_len):
        t = min(seq_len, data.size(1) - 1 - i)
        yield data[:, i: i + t], data[:, i + 1: i + 1 + t]


@torch.no_grad()
def stream_loss(model: CharLSTM, ids: torch.Tensor, streams: int, seq_len: int) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of predicted characters) over `ids`, state carried.

    The text is read as `streams` contiguous rows (`batchify`); each row is fed in windows
    of `seq_len` with the state carried across windows, so every character but the first
    of each row is predicted with its whole row as context: the result does not depend on
    `seq_len` (tests check it against one window over everything).
    """
    device = next(model.parameters()).device
    data = batchify(ids, streams).to(device)
    h, c = model.init_state(streams, device)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in windows(data, seq_len):
        logits, h, c = model(x, h, c)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").double()
        count += y.numel()
    return total.item(), count


def bits(nats: float) -> float:
    return nats / math.log(2)
