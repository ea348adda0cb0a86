"""Model kind `gpt`: a small decoder-only transformer over characters (nanoGPT's model, cut down).

Token + position embeddings, `n_layer` pre-LayerNorm blocks of causal self-attention
(`F.scaled_dot_product_attention(is_causal=True)`) and a GELU MLP, a final LayerNorm and a
decoder that shares the token embedding's matrix (weight tying). `forward(ids [B, T]) ->
logits [B, T, V]` for any T <= block_size: what training and scoring run.

What is exported (the deployable module, `CachedGPT`) is the same weights with a key/value cache:
`(ids [B, T], pad [B], past_key_values.<layer>.key/.value [B, H, P, D]) -> (logits [B, T, V],
present.<layer>.key/.value [B, H, P+T, D])` (Hugging Face Optimum's names and layout), the keys and
values of every layer for the P earlier positions in, those of all P+T out (metadata
`generation.mode = "cached"`; eager and TorchScript take and give them as one list, keys then values). ONE graph with a dynamic past length, not a prefill graph and a step
graph: P = 0 is the prefill (and the full window), T = 1 the step, so model.onnx / model.ts stay one
file each with the weights once, and every consumer of the signature (validate, the registry, the
server's metadata) sees one graph. `pad` lets rows of different lengths share a call (the server's
continuous batching): row b's first pad[b] slots are left padding, never attended to, and its
positions count from the first real slot. Past the block (`ptpipe.inference.step`): when the cache
holds block_size positions, the text's last `keep` ids (metadata; block_size // 2) are re-fed with
P = 0 and generation goes on cached: a re-prefill, not a sliding cache, because the positions are
learned absolute embeddings, so sliding the window by one moves every id to another position and no
cached key stays valid. Each character past the block then sees keep..block_size characters, not
always block_size as the uncached model's window re-feed did: other text past the block (measured
cost on Alice's validation text in docs/text-models.md), ~5x faster; `ptpipe generate --keep
block_size` gives the uncached model's text exactly.

Dropout is applied to the embeddings and to each residual branch, not to the attention
probabilities: with `dropout_p=0` the CPU's fused attention kernel runs instead of the one
that materialises the T x T matrix (measured 1.4x faster training steps on this CPU).

Training (`training`, run by `ptpipe.train.fit`), nanoGPT's way: each optimizer step draws
`batch_size` windows of `block_size` characters at random offsets of the training text (get_batch)
from a generator seeded by (seed, epoch), so a resumed run draws exactly the batches the killed one
would have; an "epoch" is `steps_per_epoch` steps, how often the loop validates and checkpoints.
AdamW decays the 2-D weights only; the lr rises linearly over `warmup_fraction` of the steps, then
follows a cosine down to `final_lr_factor` x lr. Validation bits/char: `window_loss`.

Exported as is by `ptpipe.export`: the legacy ONNX exporter at opset 17 turns `is_causal=True`
into a Trilu mask built from the input's shape, so batch and sequence stay dynamic (validate
checks several of both), and `torch.jit.script` scripts it unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ptpipe import data, kinds, train
from ptpipe.data import load_text
from ptpipe.params import Section
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

    def cached(self, x: torch.Tensor, mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
               B: int, T: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C], mask [B, 1, T, P+T] (True: may attend), past keys and values [B, heads, P, head size]
        -> (y [B, T, C], keys, values [B, heads, P+T, head size]). Inference only (no dropout).
        B and T come from the caller: read once per graph, not once per layer (each read is ONNX nodes).
        Keys and values are separate tensors of each layer, in and out (Hugging Face Optimum's layout):
        the Concat onto the past is the only copy of the cache a step makes. Carrying them as one tensor
        (all layers, keys and values stacked) cost a Split on the way in, a Split per layer and a stack on
        the way out, each a copy of the whole cache: 3.1 vs 1.3 ms a step for 16 rows at 127 positions."""
        C = self.n_embd
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # [3, B, heads, T, hs]
        k = torch.cat([past_key, qkv[1]], dim=2)  # [B, heads, P+T, head size]
        v = torch.cat([past_value, qkv[2]], dim=2)
        # written out rather than F.scaled_dot_product_attention(attn_mask=...): its ONNX export adds a
        # Shape/Sqrt/Div/Cast/IsNaN/Where chain per layer, and per-op overhead is what a one-id step costs
        att = (qkv[0] @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.n_head))  # [B, heads, T, P+T]
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(B, T, C)), k, v


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

    def cached(self, x: torch.Tensor, mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
               B: int, T: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, k, v = self.attn.cached(self.ln1(x), mask, past_key, past_value, B, T)
        x = x + y
        return x + self.mlp(self.ln2(x)), k, v


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


class CachedGPT(nn.Module):
    """The deployable module: a CharGPT run with its keys and values carried (module docstring)."""

    def __init__(self, gpt: CharGPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor, pad: torch.Tensor, past: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """ids [B, T] int64, pad [B] int64, past: every layer's keys, then every layer's values, each
        [B, heads, P, head size], with P + T <= block_size -> (logits [B, T, V], present: the same list with
        P+T positions). The exported files take and give each of those tensors by name (past_key_values.<layer>
        .key/.value in, present.<layer>.key/.value out)."""
        B, P, T, L = ids.size(0), past[0].size(2), ids.size(1), len(past) // 2
        if P + T > self.gpt.block_size:  # eager/TorchScript; the ONNX graph's Gather fails instead
            raise ValueError("past + ids have more positions than block_size: feed the last block_size ids")
        slot = torch.arange(P + T, device=ids.device)  # cache slot of every key; the new ids sit at P..P+T-1
        new = slot[P:]
        # a key is seen by a query at or after it, unless it is padding; a padding query sees itself only
        # (a row with nothing to attend to would be NaN, and NaN would reach the cache)
        causal = slot[None, None, :] <= new[None, :, None]  # [1, T, P+T]
        real = slot[None, None, :] >= pad[:, None, None]  # [B, 1, P+T]
        mask = (causal & real) | (slot[None, None, :] == new[None, :, None])  # [B, T, P+T]
        pos = (new[None, :] - pad[:, None]).clamp(min=0)  # [B, T]: positions count from each row's text
        x = self.gpt.tok(ids) + self.gpt.pos(pos)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        for i, block in enumerate(self.gpt.blocks):
            x, k, v = block.cached(x, mask[:, None], past[i], past[L + i], B, T)
            keys.append(k)
            values.append(v)
        return self.gpt.head(self.gpt.ln_f(x)), keys + values


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


def build(config: dict) -> CachedGPT:
    return CachedGPT(CharGPT(**config["model_args"]))


def head_size(args: dict) -> dict:
    return {"head_size": args["n_embd"] // args["n_head"]}


def past_names(args: dict, side: str = "past") -> list[str]:
    """The names of the `past` inputs (or `present` outputs) in the module's list order, every layer's key then
    every layer's value, as KIND's TensorSpecs resolve them."""
    specs = KIND.inputs if side == "past" else KIND.outputs
    return [t["name"] for s in specs if s.list == side for t in s.resolve(args)]


def empty_past(args: dict, batch: int, length: int = 0) -> dict[str, np.ndarray]:
    """A past of `length` zero positions: {past_key_values.<layer>.key/.value: [batch, n_head, length, head size]}."""
    shape = (batch, args["n_head"], length, args["n_embd"] // args["n_head"])
    return {name: np.zeros(shape, np.float32) for name in past_names(args)}


def example_inputs(model: CachedGPT, config: dict) -> tuple:
    # batch 2, 5 new ids after 3 cached: sizes 0/1 would invite the exporter to specialise those axes
    args = config["model_args"]
    return (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
            [torch.from_numpy(a) for a in empty_past(args, 2, 3).values()])


def metadata(config: dict) -> dict:
    args = config["model_args"]
    return {"vocab": config["data"]["vocab"],
            "generation": {"mode": "cached", "block_size": args["block_size"],
                           "keep": max(1, args["block_size"] // 2),  # ids re-fed when the cache is full
                           "past": [{"input": i, "output": o, "length_axis": 2}
                                    for i, o in zip(past_names(args), past_names(args, "present"))],
                           "pad": "pad"}}


def validation_cases(config: dict, prepared_dir: Path, shapes: dict) -> list[kinds.Case]:
    """`batch` windows of validation text x `seq` characters (seq <= block_size), fed whole with no
    past; and for each seq > 1 the cached path: a prompt of seq - `steps` characters, then `steps`
    single ids each fed with the past that backend itself returned, every step's logits and keys/values
    compared with EAGER'S UNCACHED window over the same characters (the cache must not change a logit).
    Short texts (test fixtures) are repeated to fill the windows."""
    batches, seq_lens = kinds.shape_params(shapes, "gpt", "batch"), kinds.shape_params(shapes, "gpt", "seq")
    args = config["model_args"]
    block_size = config["model_args"]["block_size"]
    too_long = [t for t in seq_lens if t > block_size]
    if too_long:
        raise StageError(f"params.yaml: validate.shapes.gpt.seq: {too_long} longer than the model's "
                         f"block_size {block_size} (positions it has no embedding for)")
    step_counts = kinds.shape_params(shapes, "gpt", "steps")
    _, val_ids, _ = load_text(prepared_dir)
    ids = val_ids.numpy().astype(np.int64)
    cases = []
    for b in batches:
        for t in seq_lens:
            rows = np.resize(ids, max(b * t, len(ids)))[: b * t].reshape(b, t)  # np.resize repeats a short text
            pad = np.zeros(b, np.int64)
            cases.append(kinds.Case(f"batch={b} seq={t}", [{"ids": rows.copy(), "pad": pad, **empty_past(args, b)}]))
            for p in sorted({max(1, t - k) for k in step_counts} - {t}):
                fed = [rows[:, :p]] + [rows[:, i: i + 1] for i in range(p, t)]
                cases.append(kinds.Case(
                    f"batch={b} prompt={p} steps={t - p}",
                    [{"ids": fed[0].copy(), "pad": pad, **empty_past(args, b)}]
                    + [{"ids": x.copy(), "pad": pad} for x in fed[1:]],
                    carry=dict(zip(past_names(args, "present"), past_names(args))),
                    reference=[{"ids": rows[:, :i].copy(), "pad": pad, **empty_past(args, b)}
                               for i in range(p, t + 1)]))
    return cases


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


# -- training (the loop itself is ptpipe.train.fit) ----------------------------------------------

class Recipe(Section):
    """One recipe, `recipes.gpt.<name>` in params.yaml; units and reasons are written there."""

    block_size: int = Field(ge=1, le=65536)
    n_layer: int = Field(ge=1, le=64)
    n_head: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    dropout: Annotated[float, Field(ge=0, lt=1, strict=False)]
    init_std: Annotated[float, Field(gt=0, le=1, strict=False)]
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    steps_per_epoch: int = Field(ge=1)
    lr: Annotated[float, Field(gt=0, le=10, strict=False)]
    weight_decay: Annotated[float, Field(ge=0, strict=False)]
    beta1: Annotated[float, Field(ge=0, lt=1, strict=False)]
    beta2: Annotated[float, Field(ge=0, lt=1, strict=False)]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1, strict=False)]
    initial_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    final_lr_factor: Annotated[float, Field(ge=0, le=1, strict=False)]
    clip: Optional[Annotated[float, Field(gt=0, strict=False)]]
    checkpoint_every: int = Field(ge=1, le=1000)
    patience: Optional[int] = Field(ge=1)
    seed: int
    threads: int = Field(ge=0, le=256)  # CPU threads for torch ops; 0 = torch's default (all cores)
    eval_stride: int = Field(ge=1)

    @model_validator(mode="after")
    def _shapes_fit(self) -> "Recipe":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.eval_stride > self.block_size:
            raise ValueError(f"eval_stride ({self.eval_stride}) must be at most block_size ({self.block_size}): "
                             f"windows further apart would leave characters unscored")
        return self


def check_lengths(train_chars: int, val_chars: int, block_size: int, key: str) -> None:
    if train_chars <= block_size:
        raise StageError(f"the training text has {train_chars} characters: too few for {key}.block_size={block_size} "
                         f"windows; lower {key}.block_size or use a longer text")
    if val_chars < 2:
        raise StageError(f"the validation text has {val_chars} characters: too few to score; raise the data "
                         f"set's val_fraction")


def training(r: Recipe, data_dir: Path, device: torch.device, ddp, key: str, default_lr: float) -> train.Training:
    """Random windows, AdamW with decay on the 2-D weights only (decaying LayerNorm gains and biases only
    pulls them off their job), warm-up + cosine; the best validation loss's weights are kept."""
    train_ids, val_ids, vocab = data.load_text(data_dir)
    check_lengths(train_ids.numel(), val_ids.numel(), r.block_size, key)
    train.seed_everything(r.seed)
    model_args = dict(vocab_size=len(vocab), block_size=r.block_size, n_layer=r.n_layer, n_head=r.n_head,
                      n_embd=r.n_embd, dropout=r.dropout)
    model = CharGPT(**model_args)
    init_weights(model, r.init_std)
    model = model.to(device)
    betas = (r.beta1, r.beta2)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": r.weight_decay, "betas": betas},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "betas": betas}]
    optimizer = train.make_optimizer(groups, "adamw", r.lr, momentum=r.beta1, beta2=r.beta2)

    def batches(epoch: int):
        generator = data.epoch_generator(r.seed, epoch)
        mine = slice(ddp.rank * r.batch_size, (ddp.rank + 1) * r.batch_size)
        for _ in range(r.steps_per_epoch):
            # every rank draws the global batch and keeps its own slice: the same windows for any world size
            x, y = random_windows(train_ids, r.batch_size * ddp.world_size, r.block_size, generator)
            yield x[mine].to(device), y[mine].to(device)

    def loss(model, batch, carry):
        x, y = batch  # [B, T] each; y is x shifted by one character
        logits = model(x)  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), y.numel(), None

    def evaluate(model):
        nats, n = window_loss(model, val_ids, r.block_size, r.eval_stride)
        return {"val/loss": nats / n, "val/bits_per_char": bits(nats / n)}

    return train.Training(
        model=model, optimizer=optimizer, batches=batches, loss=loss, evaluate=evaluate,
        lr_factor=train.lr_schedule("cosine", r.epochs * r.steps_per_epoch, r.warmup_fraction, r.initial_lr_factor,
                                    r.final_lr_factor),
        config={"kind": "gpt", "model_args": model_args, "params": r.model_dump(), "data": {"vocab": vocab}},
        epochs=r.epochs, checkpoint_every=r.checkpoint_every, clip=r.clip, patience=r.patience, monitor="val/loss",
        ceiling=data.text_loss_ceiling(data_dir, len(vocab)), hint=train.text_hint(key, r.lr, r.clip, r.weight_decay),
        unit="char", steps_per_epoch=r.steps_per_epoch)


def text_loss(model: CachedGPT, ids: torch.Tensor, recorded: dict) -> tuple[float, int]:
    """The evaluate stage's score: `window_loss` with the windows the model validated with."""
    return window_loss(model.gpt, ids, model.gpt.block_size, recorded["eval_stride"])


KIND = kinds.ModelKind(
    name="gpt", task="text-generation", formats=("text",),
    inputs=(kinds.TensorSpec("ids", "int64", ("batch", "seq")), kinds.TensorSpec("pad", "int64", ("batch",)),
            *(kinds.TensorSpec(f"past_key_values.{{i}}.{part}", "float32", ("batch", "n_head", "past", "head_size"),
                               repeat="n_layer", list="past") for part in ("key", "value"))),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "seq", "vocab_size")),
             *(kinds.TensorSpec(f"present.{{i}}.{part}", "float32", ("batch", "n_head", "past+seq", "head_size"),
                                repeat="n_layer", list="present") for part in ("key", "value"))),
    build=build, example_inputs=example_inputs, metadata=metadata, validation_cases=validation_cases,
    recipe=Recipe, training=training, text_loss=text_loss, trained_part=lambda module: module.gpt,
    derived_args=head_size,
)
