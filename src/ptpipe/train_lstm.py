"""Stage `train_lstm`: the character-level LSTM on Alice, by truncated backpropagation through time.

The training text is cut into `batch_size` contiguous streams (`lstm.batchify`); each epoch
walks them in windows of `seq_len`, carrying the (detached) state from window to window and
resetting it at the epoch start. The loop itself is `ptpipe.trainer.fit` (checkpoint/resume,
non-finite guard, early stopping on val loss with the best weights kept, DVCLive).

    python -m ptpipe.train_lstm      # reads params.yaml: lr, train.device, train.nproc, lstm.* but lstm.sample

Writes models/lstm/model.pt = {state_dict, config: {kind, model_args, params, data: {vocab}}} and dvclive/lstm/.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe import data, params, stage, trainer
from ptpipe.kinds.lstm import CharLSTM, batchify, bits, build_model, check_lengths, stream_loss, windows


class LstmTask:
    """TBPTT over contiguous streams for `trainer.fit`; holds the state carried between windows."""

    unit = "char"

    def __init__(self, train_ids: torch.Tensor, val_ids: torch.Tensor, batch_size: int, seq_len: int,
                 eval_streams: int, seed: int, device: torch.device, ddp: trainer.Distributed):
        self.train_ids, self.val_ids = train_ids, val_ids
        self.batch_size, self.seq_len, self.eval_streams, self.seed = batch_size, seq_len, eval_streams, seed
        self.device, self.ddp = device, ddp
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:  # at most; an epoch's random phase can make it one shorter
        per_stream = self.train_ids.numel() // (self.batch_size * self.ddp.world_size)
        return math.ceil((per_stream - 1) / self.seq_len)

    def train_batches(self, epoch: int):
        # A different window phase each epoch (a function of seed and epoch, so resume is exact):
        # the model does not always see the same characters at a window's cold first steps.
        offset = int(torch.randint(self.seq_len, (), generator=data.epoch_generator(self.seed, epoch)))
        # Each rank takes its own batch_size streams of batch_size * world_size.
        streams = batchify(self.train_ids[offset:], self.batch_size * self.ddp.world_size)
        rows = streams[self.ddp.rank * self.batch_size: (self.ddp.rank + 1) * self.batch_size]
        self.state = None  # a new epoch starts the streams from zero state
        yield from windows(rows.to(self.device), self.seq_len)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # [B, t] each; y is x shifted by one character
        if self.state is None:
            self.state = trainer.unwrap(model).init_state(x.size(0), x.device)
        logits, h, c = model(x, *self.state)  # logits [B, t, V]
        # Detach: gradients stop at the window boundary (truncated BPTT), the values carry on.
        self.state = (h.detach(), c.detach())
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), y.numel()

    def validate(self, model: CharLSTM) -> dict[str, float]:
        nats, n = stream_loss(model, self.val_ids, self.eval_streams, self.seq_len)
        return {"val/loss": nats / n, "val/bits_per_char": bits(nats / n)}


def setup(p: params.Params, prepared_dir: str | Path, ddp: trainer.Distributed, device: torch.device):
    """(model, task, optimizer, schedule, config) for validated params; the benchmark reuses it."""
    cfg = p.lstm
    lr = cfg.lr  # the LSTM's own: the stage does not depend on the top-level lr (the CNN's)
    train_ids, val_ids, vocab = data.load_text(prepared_dir)
    check_lengths(train_ids.numel(), val_ids.numel(), cfg.batch_size, cfg.seq_len, cfg.eval_streams,
                  ddp.world_size)
    trainer.seed_everything(cfg.seed)
    model_args = dict(vocab_size=len(vocab), embedding_size=cfg.embedding_size, hidden_size=cfg.hidden_size,
                      num_layers=cfg.num_layers, dropout=cfg.dropout, tie_weights=cfg.tie_weights)
    model = build_model(**model_args).to(device)
    optimizer = trainer.make_optimizer([{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}],
                                       cfg.optimizer, lr, momentum=0.9)
    task = LstmTask(train_ids, val_ids, cfg.batch_size, cfg.seq_len, cfg.eval_streams, cfg.seed, device, ddp)
    # cosine from lr to 0 over steps_per_epoch x epochs (an upper bound: an epoch whose random phase makes
    # it one step shorter leaves the last lr a hair above 0); held at 0 past the end
    schedule = trainer.lr_schedule(cfg.schedule, cfg.epochs * task.steps_per_epoch)
    config = {  # the self-describing shape every trainer saves (ptpipe.kinds)
        "kind": "lstm",
        "model_args": model_args,
        "params": {**cfg.model_dump(exclude={"sample"}), "lr": lr, "device": p.train.device},  # lr resolved
        "data": {"vocab": vocab},
    }
    return model, task, optimizer, schedule, config


def non_finite_hint(p: params.Params) -> str:
    """What to change when the loss blows up, naming the params keys in effect."""
    return trainer.non_finite_hint("lstm", p.lstm.lr, p.lstm.clip, p.lstm.weight_decay, p.lstm.optimizer)


def main(params_file: str | Path = "params.yaml", prepared_dir: str | Path = "data/prepared/alice",
         model_path: str | Path = "models/lstm/model.pt", live_dir: str | Path | None = "dvclive/lstm",
         progress: bool = True) -> trainer.FitResult:
    p = params.load(params_file)  # before anything is written
    trainer.set_threads(p.lstm.threads)
    ddp = trainer.setup_distributed(p.train.device)
    device = trainer.resolve_device(p.train.device, ddp)
    model, task, optimizer, schedule, config = setup(p, prepared_dir, ddp, device)
    model_path = Path(model_path)
    ceiling, ceiling_reason = data.text_loss_ceiling(prepared_dir, config["model_args"]["vocab_size"])
    spec = trainer.Fit(
        epochs=p.lstm.epochs,
        model_path=model_path,
        checkpoint_path=model_path.with_name("checkpoint.pt"),
        config=config,
        inputs=(Path(prepared_dir),),
        live_dir=Path(live_dir) if live_dir is not None else None,
        clip_grad_norm=p.lstm.clip,
        non_finite_hint=non_finite_hint(p),
        loss_ceiling=ceiling,
        loss_ceiling_reason=ceiling_reason,
        monitor="val/loss",  # early stopping and the kept weights: the best validation loss
        monitor_mode="min",
        patience=p.lstm.patience,
        progress=progress,
    )
    result = trainer.fit(model, task, optimizer, schedule, spec, device, ddp)
    if ddp.is_main:
        print(f"best epoch {result.best['epoch'] + 1}: val {result.best['val/bits_per_char']:.3f} bits/char; "
              f"{result.train_seconds:.0f} s training; wrote {model_path}")
    return result


def _cli() -> None:
    args = stage.parser(__doc__, prepared="data/prepared/alice", model="models/lstm/model.pt",
                        live="dvclive/lstm").parse_args()
    stage.run(trainer.run_stage, "ptpipe.train_lstm", lambda: main(args.params, args.prepared, args.model, args.live),
              args.params, sys.argv[1:])


if __name__ == "__main__":
    _cli()
