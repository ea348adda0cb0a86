"""A tiny classification run through the shared loop, for the torchrun tests (not collected by pytest).

    torchrun --standalone --nproc-per-node 2 tests/ddp_synthetic.py OUT_DIR [--fail-rank R]

Every rank prints `rank R checksum C` of its final parameters; only rank 0 writes OUT_DIR/model.pt.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import data, trainer

GLOBAL_BATCH = 32


class SyntheticTask:
    unit = "item"

    def __init__(self, x, y, ddp: trainer.Distributed, fail_rank: int | None):
        self.x, self.y, self.ddp, self.fail_rank = x, y, ddp, fail_rank

    def train_batches(self, epoch):
        if epoch == 1 and self.ddp.rank == self.fail_rank:
            raise RuntimeError(f"boom on rank {self.ddp.rank}")
        # Every rank draws the same epoch order and takes every world_size-th item of it.
        order = torch.randperm(len(self.x), generator=data.epoch_generator(0, epoch))[self.ddp.rank::self.ddp.world_size]
        per_rank = GLOBAL_BATCH // self.ddp.world_size
        for i in range(0, len(order) - per_rank + 1, per_rank):
            idx = order[i:i + per_rank]
            yield self.x[idx], self.y[idx]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y), len(y)

    def validate(self, model):
        return {"val/loss": F.cross_entropy(model(self.x), self.y).item()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    ddp = trainer.setup_distributed("cpu")
    trainer.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = trainer.Fit(epochs=4, model_path=args.out / "model.pt", checkpoint_path=args.out / "checkpoint.pt",
                       config={"synthetic": True}, progress=False)
    result = trainer.fit(model, SyntheticTask(x, y, ddp, args.fail_rank), opt, None, spec, torch.device("cpu"), ddp)
    checksum = sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    print(f"rank {ddp.rank} checksum {checksum:.10f} val_loss {result.best['val/loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
