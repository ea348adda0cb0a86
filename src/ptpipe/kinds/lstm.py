"""Model kind `lstm`: the character-level LSTM language model, and how text is cut into TBPTT windows for it.

Unlike the tutorial's model this one is unidirectional (a bidirectional LSTM has already
read the character it is asked to predict), and its state is explicit: `forward` takes and
returns (h, c), so training carries it from window to window and the exported graph can
step one character at a time. Training (`training`, run by `ptpipe.train.fit`): the text cut into
`batch_size` contiguous streams (`batchify`), each epoch walked in windows of `seq_len` with the
detached state carried from window to window (truncated backpropagation through time) and reset at
the epoch's start.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ptpipe import data, kinds, train
from ptpipe.data import load_text
from ptpipe.params import Section
from ptpipe.stage import StageError


def check_lengths(train_chars: int | None, val_chars: int, batch_size: int, seq_len: int, eval_streams: int,
                  world_size: int = 1, key: str = "recipes.lstm.<recipe>") -> None:
    """Enough text for the streams, before anything runs: each epoch drops up to seq_len - 1 leading
    characters (its random window phase), and every stream needs at least 2 characters."""
    if train_chars is not None and train_chars - (seq_len - 1) < batch_size * world_size * 2:
        raise StageError(f"the training text has {train_chars} characters: too few for {key}.batch_size={batch_size} "
                         f"streams (x {world_size} processes) with {key}.seq_len={seq_len}; lower {key}.batch_size "
                         f"or use a longer text")
    if val_chars < eval_streams * 2:
        raise StageError(f"the validation text has {val_chars} characters: too few for "
                         f"{key}.eval_streams={eval_streams}; lower {key}.eval_streams or the data set's val_fraction")


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


# -- training (the loop itself is ptpipe.train.fit) ----------------------------------------------

class Recipe(Section):
    """One recipe, `recipes.lstm.<name>` in params.yaml; units and reasons are written there."""

    embedding_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1, le=16)
    dropout: Annotated[float, Field(ge=0, lt=1, strict=False)]
    tie_weights: bool
    seq_len: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    clip: Optional[Annotated[float, Field(gt=0, strict=False)]]
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]
    optimizer: Literal["adam", "adamw", "sgd"]
    momentum: Annotated[float, Field(ge=0, lt=1, strict=False)]
    weight_decay: Annotated[float, Field(ge=0, lt=1, strict=False)]
    schedule: Literal["constant", "cosine"]
    checkpoint_every: int = Field(ge=1, le=1000)
    patience: Optional[int] = Field(ge=1)
    seed: int
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    eval_streams: int = Field(ge=1)

    @model_validator(mode="after")
    def _tie_needs_equal_sizes(self) -> "Recipe":
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError("tie_weights: true needs embedding_size == hidden_size "
                             f"(got {self.embedding_size} and {self.hidden_size})")
        return self


def training(r: Recipe, data_dir: Path, device: torch.device, ddp, key: str, default_lr: float) -> train.Training:
    """TBPTT over contiguous streams; the best validation loss's weights are kept (early stopping: patience)."""
    train_ids, val_ids, vocab = data.load_text(data_dir)
    check_lengths(train_ids.numel(), val_ids.numel(), r.batch_size, r.seq_len, r.eval_streams, ddp.world_size, key)
    train.seed_everything(r.seed)
    model_args = dict(vocab_size=len(vocab), embedding_size=r.embedding_size, hidden_size=r.hidden_size,
                      num_layers=r.num_layers, dropout=r.dropout, tie_weights=r.tie_weights)
    model = build_model(**model_args).to(device)
    optimizer = train.make_optimizer([{"params": list(model.parameters()), "weight_decay": r.weight_decay}],
                                     r.optimizer, r.lr, momentum=r.momentum)
    per_stream = train_ids.numel() // (r.batch_size * ddp.world_size)
    steps_per_epoch = math.ceil((per_stream - 1) / r.seq_len)  # at most: a random phase can make it one shorter

    def batches(epoch: int):
        # A different window phase each epoch (a function of seed and epoch, so resume is exact):
        # the model does not always see the same characters at a window's cold first steps.
        offset = int(torch.randint(r.seq_len, (), generator=data.epoch_generator(r.seed, epoch)))
        streams = batchify(train_ids[offset:], r.batch_size * ddp.world_size)  # each rank: its own batch_size rows
        yield from windows(streams[ddp.rank * r.batch_size: (ddp.rank + 1) * r.batch_size].to(device), r.seq_len)

    def loss(model, batch, state):
        x, y = batch  # [B, t] each; y is x shifted by one character
        state = state or train.unwrap(model).init_state(x.size(0), x.device)  # zero at an epoch's start
        logits, h, c = model(x, *state)  # logits [B, t, V]
        # detached: gradients stop at the window boundary (truncated BPTT), the values carry on
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), y.numel(), (h.detach(), c.detach())

    def evaluate(model):
        nats, n = stream_loss(model, val_ids, r.eval_streams, r.seq_len)
        return {"val/loss": nats / n, "val/bits_per_char": bits(nats / n)}

    return train.Training(
        model=model, optimizer=optimizer, batches=batches, loss=loss, evaluate=evaluate,
        # cosine from lr to 0 over steps_per_epoch x epochs (an upper bound: an epoch one step shorter leaves
        # the last lr a hair above 0); held at 0 past the end
        lr_factor=train.lr_schedule(r.schedule, r.epochs * steps_per_epoch),
        config={"kind": "lstm", "model_args": model_args, "params": r.model_dump(), "data": {"vocab": vocab}},
        epochs=r.epochs, checkpoint_every=r.checkpoint_every, clip=r.clip, patience=r.patience, monitor="val/loss",
        ceiling=data.text_loss_ceiling(data_dir, len(vocab)),
        hint=train.text_hint(key, r.lr, r.clip, r.weight_decay, r.optimizer), unit="char",
        steps_per_epoch=steps_per_epoch)


def text_loss(model: CharLSTM, ids: torch.Tensor, recorded: dict) -> tuple[float, int]:
    """The evaluate stage's score: `stream_loss` with the streams and window the model trained with."""
    return stream_loss(model, ids, recorded["eval_streams"], recorded["seq_len"])


KIND = kinds.ModelKind(
    name="lstm", task="text-generation", formats=("text",),
    inputs=(kinds.TensorSpec("ids", "int64", ("batch", "seq")),
            kinds.TensorSpec("h0", "float32", ("num_layers", "batch", "hidden_size")),
            kinds.TensorSpec("c0", "float32", ("num_layers", "batch", "hidden_size"))),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "seq", "vocab_size")),
             kinds.TensorSpec("h", "float32", ("num_layers", "batch", "hidden_size")),
             kinds.TensorSpec("c", "float32", ("num_layers", "batch", "hidden_size"))),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
    recipe=Recipe, training=training, text_loss=text_loss,
)
