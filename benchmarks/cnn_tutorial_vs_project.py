"""The tutorial recipe (LeNet, SGD lr 0.001 momentum 0.9, batch 32, 2 epochs), three ways, per seed:

  tutorial  the tutorial's own code as written in it (shared/seed): torchvision `CIFAR10` +
            `DataLoader(batch_size=32, shuffle=True)` (no worker processes: the tutorial sets none),
            per-image `ToTensor` + `Normalize((0.5,)*3, (0.5,)*3)`, `running_loss += loss.item()`
            every step and a print every 2,000 mini-batches; all 50,000 training images
  plain     the issue's second anchor: the same recipe as a plain loop over one in-memory float
            tensor (normalised once), batches by index, nothing else
  project   the stages themselves: `ptpipe.train.train("cnn", ...)` (the one `ptpipe.train.fit` loop) with
            the `tutorial` recipe of params.yaml (train_split train+val = the same 50,000 images, checked),
            then `ptpipe.evaluate.evaluate` on the test split

All three use the same CPU thread count (the recipe's `threads`; 0 = torch's default, which the
tutorial runs with). The seeds run one after another, the three variants alternating within a
seed, so a change of machine load hits all of them. Prints per-seed rows and a summary (mean
s/epoch, mean training wall, accuracy mean and spread, ratios), the machine's load average, and
writes JSON.

    python benchmarks/cnn_tutorial_vs_project.py --archive /tmp/mirror/cifar-10-python.tar.gz \
        --prepared data/prepared/cifar10 --seeds 0 1 2 --out benchmarks/results/cnn_tutorial_vs_project.json

torchvision's CIFAR10 checks each extracted file against the official md5 list and refuses the
loopback mirror's (JPEG re-encoded) files: `MirrorCIFAR10` skips that check and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
import yaml

from ptpipe import data, evaluate, train
from ptpipe.kinds.cnn import LeNet
from ptpipe.train import set_threads

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class MirrorCIFAR10(torchvision.datasets.CIFAR10):
    def _check_integrity(self) -> bool:  # the mirror's files are real CIFAR-10 with other checksums
        return True

    def _load_meta(self) -> None:  # as torchvision's, without its md5 check
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def tutorial(root: str, epochs: int, seed: int) -> dict:
    """The tutorial's code as written there (plus a seed and timing), at the current thread count."""
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = MirrorCIFAR10(root=root, train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=32, shuffle=True)
    testset = MirrorCIFAR10(root=root, train=False, download=False, transform=transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=32, shuffle=False)
    net = LeNet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    epoch_seconds = []
    t_all = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader, 0):
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print("[%d, %5d] loss: %.3f" % (epoch + 1, i + 1, running_loss / 2000))
                running_loss = 0.0
        epoch_seconds.append(time.perf_counter() - t0)
    train_wall = time.perf_counter() - t_all
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            correct += (net(images).argmax(1) == labels).sum().item()
            total += labels.size(0)
    return {"epoch_seconds": epoch_seconds, "train_wall_s": train_wall, "test_acc": correct / total,
            "train_images": len(trainset)}


def plain(prepared: str, epochs: int, seed: int) -> dict:
    """The recipe as the plainest fast loop: one normalised float tensor, a permutation per epoch,
    batches by index, zero_grad/forward/backward/step (the issue's second anchor)."""
    torch.manual_seed(seed)
    x = torch.cat([data.load_images(prepared, s)[0] for s in ("train", "val")]).float().div_(255).sub_(0.5).div_(0.5)
    y = torch.cat([data.load_images(prepared, s)[1] for s in ("train", "val")])
    test_x, test_y = data.load_images(prepared, "test")
    net = LeNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    epoch_seconds = []
    t_all = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i: i + 32]
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - t0)
    train_wall = time.perf_counter() - t_all
    with torch.no_grad():
        acc = (net(test_x.float().div_(255).sub_(0.5).div_(0.5)).argmax(1) == test_y).float().mean().item()
    return {"epoch_seconds": epoch_seconds, "train_wall_s": train_wall, "test_acc": acc, "train_images": len(x)}


def project(prepared: str, epochs: int, seed: int, work: Path) -> dict:
    """The same recipe through the project's stages: train@cnn (`train.train`) with the `tutorial` recipe of
    params.yaml (LeNet, SGD 0.001/0.9, batch 32, train+val = the same 50,000 images, its `threads`),
    then evaluate@cnn (`evaluate.evaluate`) on the test split. Timed: the training steps of the epochs (the
    loop's `train_seconds`, like the tutorial's timed loop) and the whole train.train call (data loading,
    per-epoch validation and checkpoints included)."""
    params = yaml.safe_load(PARAMS.read_text())
    params["models"]["cnn"]["recipe"] = "tutorial"
    recipe = params["recipes"]["cnn"]["tutorial"]
    recipe.update(epochs=epochs, seed=seed)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    result = train.train("cnn", prepared, work / "model.pt", None, None, work / "params.yaml", progress=False)
    stage_wall = time.perf_counter() - t0
    metrics = evaluate.evaluate(prepared, work / "model.pt", work / "cnn.json", work / "reports", work / "params.yaml")
    n_train = sum(len(data.load_images(prepared, s)[1]) for s in ("train", "val"))
    return {"epoch_seconds": [n_train / r["train/img_per_s"] for r in result.history],
            "train_wall_s": result.train_seconds, "train_cnn_wall_s": stage_wall,
            "test_acc": metrics["test"]["acc"], "train_images": n_train}


def same_images(root: str, prepared: str) -> bool:
    """The archive's 50,000 training images and prepare's train+val are the same set (order aside)."""
    ds = MirrorCIFAR10(root=root, train=True, download=False)
    x = torch.cat([data.load_images(prepared, s)[0] for s in ("train", "val")])  # N x 3 x 32 x 32
    a = torch.from_numpy(ds.data).permute(0, 3, 1, 2).reshape(len(ds.data), -1).long().sum(1).sort().values
    b = x.reshape(len(x), -1).long().sum(1).sort().values
    return len(a) == len(b) and torch.equal(a, b)


VARIANTS = ("tutorial", "plain", "project")


def conv_floor(n_images: int, steps: int = 400) -> dict:
    """A lower bound for any float32 eager implementation of the recipe: per step only LeNet's
    convolutions, ReLUs and max-pools, forward and backward (oneDNN's kernels, channels_last, as the
    project runs them) — no data, no linear layers, no loss, no optimizer. Extrapolated to an epoch."""
    net = LeNet().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        net.pool(F.relu(net.conv2(net.pool(F.relu(net.conv1(x)))))).sum().backward()

    for _ in range(50):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    return {"step_ms": 1e3 * per_step, "s_per_epoch": per_step * -(-n_images // 32)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, rs in runs.items():
        accs = [r["test_acc"] for r in rs]
        out[name] = {"s_per_epoch": statistics.mean(s for r in rs for s in r["epoch_seconds"]),
                     "train_wall_s": statistics.mean(r["train_wall_s"] for r in rs),
                     "acc_mean": statistics.mean(accs), "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    t = out["tutorial"]
    for row in out.values():
        row["speedup"] = t["train_wall_s"] / row["train_wall_s"]
        row["acc_diff_points"] = 100 * (row["acc_mean"] - t["acc_mean"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="cifar-10-python.tar.gz (official or the mirror's)")
    ap.add_argument("--prepared", default="data/prepared/cifar10", help="the prepare stage's output")
    ap.add_argument("--epochs", type=int, default=2, help="the tutorial's 2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each variant per seed")
    ap.add_argument("--out", default="benchmarks/results/cnn_tutorial_vs_project.json", help="JSON results")
    args = ap.parse_args()
    threads = yaml.safe_load(PARAMS.read_text())["recipes"]["cnn"]["tutorial"]["threads"]
    set_threads(threads)  # every variant at the recipe's thread count (0: torch's default, as the tutorial)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.archive) as tar:
            tar.extractall(tmp, filter="data")
        assert same_images(tmp, args.prepared), "prepared train+val is not the archive's training set"
        for seed in args.seeds:
            work = Path(tmp) / f"project-{seed}"
            work.mkdir()
            runs["tutorial"].append(tutorial(tmp, args.epochs, seed))
            runs["plain"].append(plain(args.prepared, args.epochs, seed))
            runs["project"].append(project(args.prepared, args.epochs, seed, work))
            print(f"seed {seed}: " + ", ".join(
                f"{n} {runs[n][-1]['train_wall_s']:.1f} s {runs[n][-1]['test_acc']:.4f}" for n in VARIANTS)
                + f" (load {os.getloadavg()[0]:.2f})", flush=True)
    summary = summarise(runs)
    floor = conv_floor(runs["tutorial"][0]["train_images"])
    floor["max_speedup"] = summary["tutorial"]["s_per_epoch"] / floor["s_per_epoch"]
    print(f"\n{len(args.seeds)} seeds, {torch.get_num_threads()} threads")
    print(f"{'':9} {'s/epoch':>8} {'train s':>8} {'test acc':>9} {'sd':>6} {'vs tutorial':>12} {'acc diff':>9}")
    for name, r in summary.items():
        print(f"{name:9} {r['s_per_epoch']:8.2f} {r['train_wall_s']:8.1f} {r['acc_mean']:9.4f} {r['acc_sd']:6.4f} "
              f"{r['speedup']:11.2f}x {r['acc_diff_points']:+8.2f}")
    print(f"conv/pool floor: {floor['step_ms']:.2f} ms/step = {floor['s_per_epoch']:.2f} s/epoch -> no float32 "
          f"eager loop on these kernels can beat the tutorial by more than {floor['max_speedup']:.2f}x")
    results = {"runs": runs, "summary": summary, "conv_floor": floor, "seeds": args.seeds, "epochs": args.epochs,
               "threads": torch.get_num_threads(), "recipe_threads": threads, "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(f"load average before {load_before}, after {results['loadavg_after']}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
