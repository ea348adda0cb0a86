"""A tiny classification run through the one loop (train.fit), for the torchrun tests (not collected by pytest).

    torchrun --standalone --nproc-per-node 2 tests/ddp_synthetic.py OUT_DIR [--fail-rank R]

Every rank prints `rank R checksum C val_loss V` of its final parameters; only rank 0 writes OUT_DIR/model.pt.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptpipe import data, train

GLOBAL_BATCH = 32


def training(ddp: train.Distributed, fail_rank: int | None) -> train.Training:
    """What a kind would hand the loop: every rank draws the same epoch order and takes every
    world_size-th item of it (an interleaved half of each global batch)."""
    train.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def batches(epoch):
        if epoch == 1 and ddp.rank == fail_rank:
            raise RuntimeError(f"boom on rank {ddp.rank}")
        order = torch.randperm(len(x), generator=data.epoch_generator(0, epoch))[ddp.rank::ddp.world_size]
        per_rank = GLOBAL_BATCH // ddp.world_size
        for i in range(0, len(order) - per_rank + 1, per_rank):
            idx = order[i:i + per_rank]
            yield x[idx], y[idx]

    def loss(model, batch, carry):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb), len(yb), None

    def evaluate(model):
        return {"val/loss": F.cross_entropy(model(x), y).item()}

    return train.Training(
        model=train.wrap_ddp(model, torch.device("cpu"), ddp), optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                                                        momentum=0.9),
        lr_factor=None, batches=batches, loss=loss, evaluate=evaluate, config={"synthetic": True}, epochs=4,
        checkpoint_every=1, clip=None, patience=None, monitor=None, ceiling=(100.0, "a lot"), hint="lower lr")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    ddp = train.setup_distributed("cpu")
    t = training(ddp, args.fail_rank)
    result = train.fit(t, args.out / "model.pt", None, torch.device("cpu"), ddp, progress=False)
    checksum = sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(train.unwrap(t.model).parameters()))
    print(f"rank {ddp.rank} checksum {checksum:.10f} val_loss {result.best['val/loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
