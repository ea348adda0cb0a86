"""Stage `train_gpt`: the character-level transformer (ptpipe.kinds.gpt) on Alice, nanoGPT's way.

Each optimizer step draws `batch_size` windows of `block_size` characters at random offsets of
the training text (nanoGPT's get_batch), from a generator seeded by (seed, epoch), so a resumed
run draws exactly the batches the killed one would have. An "epoch" here is `steps_per_epoch`
steps, not a pass over the text: it is how often the loop validates, checkpoints and logs.
AdamW decays the 2-D weights only (matmuls and embeddings; not biases or LayerNorms); the
learning rate rises linearly over `warmup_fraction` of the steps from `initial_lr_factor` x lr,
then follows a cosine down to `final_lr_factor` x lr at the last step (the shared
`trainer.make_optimizer` / `trainer.lr_schedule`). The loop is `ptpipe.trainer.fit` (checkpoint/resume,
non-finite guard, the best validation loss's weights kept, DVCLive in dvclive/gpt).

Validation bits/char: the validation text in windows of block_size starting every `eval_stride`
characters, each character but the first scored exactly once, with at least block_size -
eval_stride characters of context (`kinds.gpt.window_loss`).

    python -m ptpipe.train_gpt [--params params.yaml] [--prepared data/prepared/alice]
                               [--model models/gpt/model.pt] [--live dvclive/gpt] [--metrics metrics/gpt.json]

Writes models/gpt/model.pt = {state_dict, config: {kind, model_args, params, data: {vocab}}},
dvclive/gpt/ and metrics/gpt.json (the kept epoch's val bits/char beside the unigram baseline).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe import data, files, params, stage, trainer
from ptpipe.kinds.gpt import CharGPT, bits, init_weights, random_windows, window_loss
from ptpipe.stage import StageError


class GptTask:
    """Random windows of the training text for `trainer.fit`; bits/char on the validation text."""

    unit = "char"

    def __init__(self, train_ids: torch.Tensor, val_ids: torch.Tensor, batch_size: int, block_size: int,
                 steps_per_epoch: int, eval_stride: int, seed: int, device: torch.device, ddp: trainer.Distributed):
        self.train_ids, self.val_ids = train_ids, val_ids
        self.batch_size, self.block_size, self.steps_per_epoch = batch_size, block_size, steps_per_epoch
        self.eval_stride, self.seed, self.device, self.ddp = eval_stride, seed, device, ddp

    def train_batches(self, epoch: int):
        generator = data.epoch_generator(self.seed, epoch)
        for _ in range(self.steps_per_epoch):
            # every rank draws the global batch and keeps its own slice: the same windows for any world size
            x, y = random_windows(self.train_ids, self.batch_size * self.ddp.world_size, self.block_size, generator)
            mine = slice(self.ddp.rank * self.batch_size, (self.ddp.rank + 1) * self.batch_size)
            yield x[mine].to(self.device), y[mine].to(self.device)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # [B, T] each; y is x shifted by one character
        logits = model(x)  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), y.numel()

    def validate(self, model: CharGPT) -> dict[str, float]:
        nats, n = window_loss(model, self.val_ids, self.block_size, self.eval_stride)
        return {"val/loss": nats / n, "val/bits_per_char": bits(nats / n)}


def make_optimizer(model: CharGPT, cfg: params.Gpt, lr: float) -> torch.optim.Optimizer:
    """AdamW (the shared factory) with weight decay on the 2-D weights only: decaying LayerNorm gains
    and biases only pulls them off their job. Adam's beta2 is a per-group option."""
    betas = (0.9, cfg.beta2)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "betas": betas},
              {"params": no_decay, "weight_decay": 0.0, "betas": betas}]
    return trainer.make_optimizer(groups, "adamw", lr, momentum=betas[0])


def check_lengths(train_chars: int, val_chars: int, block_size: int) -> None:
    if train_chars <= block_size:
        raise StageError(f"the training text has {train_chars} characters: too few for gpt.block_size={block_size} "
                         f"windows; lower gpt.block_size")
    if val_chars < 2:
        raise StageError(f"the validation text has {val_chars} characters: too few to score")


def setup(p: params.Params, prepared_dir: str | Path, ddp: trainer.Distributed, device: torch.device):
    """(model, task, optimizer, schedule, config) for validated params; the benchmark reuses it."""
    cfg = p.gpt
    lr = cfg.lr  # the transformer's own: the stage does not depend on the top-level lr (the CNN's)
    train_ids, val_ids, vocab = data.load_text(prepared_dir)
    check_lengths(train_ids.numel(), val_ids.numel(), cfg.block_size)
    trainer.seed_everything(cfg.seed)
    model_args = dict(vocab_size=len(vocab), block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_embd=cfg.n_embd, dropout=cfg.dropout)
    model = CharGPT(**model_args)
    init_weights(model, cfg.init_std)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, lr)
    schedule = trainer.lr_schedule("cosine", cfg.epochs * cfg.steps_per_epoch, cfg.warmup_fraction,
                                   cfg.initial_lr_factor, cfg.final_lr_factor)
    task = GptTask(train_ids, val_ids, cfg.batch_size, cfg.block_size, cfg.steps_per_epoch, cfg.eval_stride,
                   cfg.seed, device, ddp)
    config = {  # the self-describing shape every trainer saves (ptpipe.kinds)
        "kind": "gpt",
        "model_args": model_args,
        "params": {**cfg.model_dump(), "lr": lr, "device": p.train.device},  # lr resolved
        "data": {"vocab": vocab},
    }
    return model, task, optimizer, schedule, config


def non_finite_hint(p: params.Params) -> str:
    """What to change when the loss blows up, naming the params keys in effect (the optimizer is AdamW)."""
    return trainer.non_finite_hint("gpt", p.gpt.lr, p.gpt.clip, p.gpt.weight_decay)


def main(params_file: str | Path = "params.yaml", prepared_dir: str | Path = "data/prepared/alice",
         model_path: str | Path = "models/gpt/model.pt", live_dir: str | Path | None = "dvclive/gpt",
         metrics_path: str | Path | None = "metrics/gpt.json", progress: bool = True) -> trainer.FitResult:
    p = params.load(params_file)  # before anything is written
    trainer.set_threads(p.gpt.threads)
    ddp = trainer.setup_distributed(p.train.device)
    device = trainer.resolve_device(p.train.device, ddp)
    model, task, optimizer, schedule, config = setup(p, prepared_dir, ddp, device)
    stats = data.load_stats(prepared_dir)  # read now: a missing file is an error before training, not after
    model_path = Path(model_path)
    ceiling, ceiling_reason = data.text_loss_ceiling(prepared_dir, config["model_args"]["vocab_size"])
    spec = trainer.Fit(
        epochs=p.gpt.epochs,
        model_path=model_path,
        checkpoint_path=model_path.with_name("checkpoint.pt"),
        config=config,
        inputs=(Path(prepared_dir),),
        live_dir=Path(live_dir) if live_dir is not None else None,
        clip_grad_norm=p.gpt.clip,
        non_finite_hint=non_finite_hint(p),
        loss_ceiling=ceiling,
        loss_ceiling_reason=ceiling_reason,
        monitor="val/loss",  # the kept weights (and early stopping): the best validation loss
        monitor_mode="min",
        patience=p.gpt.patience,
        progress=progress,
    )
    result = trainer.fit(model, task, optimizer, schedule, spec, device, ddp)
    if ddp.is_main:
        best = result.best
        if metrics_path is not None:
            files.write_json(metrics_path, {
                "val_bits_per_char": best["val/bits_per_char"],
                "val_loss_nats_per_char": best["val/loss"],
                "best_epoch": best["epoch"] + 1,
                "train_seconds": result.train_seconds,
                "parameters": sum(t.numel() for t in model.parameters()),
                "eval": f"windows of {p.gpt.block_size} every {p.gpt.eval_stride} characters",
                "unigram_val_bits_per_char": stats.get("unigram_val_bits_per_char"),
            })
        print(f"best epoch {best['epoch'] + 1}: val {best['val/bits_per_char']:.3f} bits/char; "
              f"{result.train_seconds:.0f} s training; wrote {model_path}")
    return result


def _cli() -> None:
    args = stage.parser(__doc__, prepared="data/prepared/alice", model="models/gpt/model.pt", live="dvclive/gpt",
                        metrics="metrics/gpt.json").parse_args()
    stage.run(trainer.run_stage, "ptpipe.train_gpt",
              lambda: main(args.params, args.prepared, args.model, args.live, args.metrics), args.params, sys.argv[1:])


if __name__ == "__main__":
    _cli()
