"""Model kind `gpt`: a small decoder-only transformer over characters (nanoGPT's model, cut down).

Token + position embeddings, `n_layer` pre-LayerNorm blocks of causal self-attention
(`F.scaled_dot_product_attention(is_causal=True)`) and a GELU MLP, a final LayerNorm and a
decoder that shares the token embedding's matrix (weight tying). `forward(ids [B, T]) ->
logits [B, T, V]` for any T <= block_size: the model has no state, so generation re-feeds the
last `block_size` characters each step (metadata `generation.mode = "window"`).

Dropout is applied to the embeddings and to each residual branch, not to the attention
probabilities: with `dropout_p=0` the CPU's fused attention kernel runs instead of the one
that materialises the T x T matrix (measured 1.4x faster training steps on this CPU).

Exported as is by `ptpipe.export`: the legacy ONNX exporter at opset 17 turns `is_causal=True`
into a Trilu mask built from the input's shape, so batch and sequence stay dynamic (validate
checks several of both), and `torch.jit.script` scripts it unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import kinds
from ptpipe.data import load_text
from ptpipe.stage import StageError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.qkv = nn.Linear(n_embd, 3 * n_embd)  # query, key, value of all heads in one matmul
        self.proj = nn.Linear(n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, heads, T, head size]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # one matrix reads and writes characters (Press & Wolf 2017)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64, T <= block_size -> logits [B, T, V]."""
        if ids.size(1) > self.block_size:  # eager/TorchScript; the ONNX graph's Gather fails instead
            raise ValueError("ids has more positions than block_size: feed the last block_size ids")
        pos = torch.arange(ids.size(1), device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_weights(model: CharGPT, std: float) -> None:
    """GPT-2's initialisation with a chosen `std` (GPT-2: 0.02, at width 768): weights N(0, std),
    biases 0, and the projections into the residual stream N(0, std / sqrt(2 n_layer)), so the
    stream's variance does not grow with depth. (LayerNorms keep weight 1, bias 0.)"""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * len(model.blocks)))


def build(config: dict) -> CharGPT:
    return CharGPT(**config["model_args"])


def example_inputs(model: CharGPT, config: dict) -> tuple[torch.Tensor, ...]:
    # batch 2, length 5: sizes 0/1 would invite the exporter to specialise those axes
    return (torch.zeros(2, 5, dtype=torch.int64),)


def metadata(config: dict) -> dict:
    return {"vocab": config["data"]["vocab"],
            "generation": {"mode": "window", "block_size": config["model_args"]["block_size"]}}


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    """`batch` windows of validation text x `seq` characters (seq <= block_size; the model has no
    state to carry). Short texts (test fixtures) are repeated to fill the windows."""
    batches, seq_lens = kinds.shape_params(shapes, "gpt", "batch"), kinds.shape_params(shapes, "gpt", "seq")
    block_size = config["model_args"]["block_size"]
    too_long = [t for t in seq_lens if t > block_size]
    if too_long:
        raise StageError(f"params.yaml: validate.shapes.gpt.seq: {too_long} longer than the model's "
                         f"block_size {block_size} (positions it has no embedding for)")
    _, val_ids, _ = load_text(prepared_dir)
    ids = val_ids.numpy().astype(np.int64)
    cases = []
    for b in batches:
        for t in seq_lens:
            rows = np.resize(ids, max(b * t, len(ids)))[: b * t].reshape(b, t)  # np.resize repeats a short text
            cases.append(kinds.Case(f"batch={b} seq={t}", [{"ids": rows.copy()}]))
    return cases


KIND = kinds.ModelKind(
    name="gpt", task="text-generation", train_stage="train_gpt", prepared="alice",
    inputs=(kinds.TensorSpec("ids", "int64", ("batch", "seq")),),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "seq", "vocab_size")),),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
)


# -- training and evaluation helpers (train_gpt) ----------------------------------------------

def random_windows(ids: torch.Tensor, batch: int, block_size: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: `batch` windows at random offsets; targets are the inputs shifted by one."""
    starts = torch.randint(ids.numel() - block_size, (batch,), generator=generator)
    x = torch.stack([ids[s: s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1: s + 1 + block_size] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def window_loss(model: CharGPT, ids: torch.Tensor, block_size: int, stride: int, batch: int = 64
                ) -> tuple[float, int]:
    """(summed cross-entropy in nats, characters predicted) over `ids`, each character but the first
    predicted exactly once: windows of `block_size` start every `stride` characters; the first window
    scores all its positions, every later one only its last `stride` (the ones the previous window did
    not reach), so each of those has at least block_size - stride characters of context. stride =
    block_size: non-overlapping windows (cheapest, least context); stride 1: full context everywhere."""
    n = ids.numel()
    if n < 2:
        raise StageError(f"the validation text has {n} characters: too few to score")
    device = next(model.parameters()).device
    width = min(block_size, n - 1)
    starts = list(range(0, n - 1 - width, stride)) + [n - 1 - width]  # the last window ends at the text's end
    total, count, scored_to = torch.zeros((), dtype=torch.float64), 0, 0
    for i in range(0, len(starts), batch):
        chunk = starts[i: i + batch]
        x = torch.stack([ids[s: s + width] for s in chunk]).to(device)
        y = torch.stack([ids[s + 1: s + 1 + width] for s in chunk]).to(device)
        losses = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").double().cpu()  # [b, width]
        for row, s in zip(losses, chunk):
            first = max(scored_to - s, 0)  # positions before s + first were scored by an earlier window
            total += row[first:].sum()
            count += width - first
            scored_to = s + width
    return total.item(), count


def bits(nats: float) -> float:
    return nats / math.log(2)
