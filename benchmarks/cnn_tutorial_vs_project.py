"""The tutorial recipe (LeNet, SGD lr 0.001 momentum 0.9, batch 32, 2 epochs), two ways, one run:

  tutorial  the tutorial's own loop: torchvision `CIFAR10` + `DataLoader` (num_workers=2),
            per-image `ToTensor` + `Normalize((0.5,)*3, (0.5,)*3)`, all 50,000 training images
  tutorial_1thread  the same code with torch.set_num_threads(1), the project's thread count
  project   the stages themselves: `train_cnn.main` (the shared `ptpipe.trainer.fit` loop) with the
            `tutorial` recipe of params.yaml (train_split train+val = the same 50,000 images, checked):
            one uint8 tensor, normalised once, batches as slices; then `evaluate_cnn.main`

Prints wall time per epoch, training wall time (the epochs' training steps on both sides) and test
accuracy side by side, the speed-up, the machine's load average, and writes JSON.

    python benchmarks/cnn_tutorial_vs_project.py --archive /tmp/mirror/cifar-10-python.tar.gz \
        --prepared data/prepared/cifar10 --out benchmarks/cnn_tutorial_vs_project.json

torchvision's CIFAR10 checks each extracted file against the official md5 list and refuses the
loopback mirror's (JPEG re-encoded) files: `MirrorCIFAR10` skips that check and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as transforms
import yaml

from ptpipe import data, evaluate_cnn, train_cnn
from ptpipe.cnn import LeNet

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SEED = 0


class MirrorCIFAR10(torchvision.datasets.CIFAR10):
    def _check_integrity(self) -> bool:  # the mirror's files are real CIFAR-10 with other checksums
        return True

    def _load_meta(self) -> None:  # as torchvision's, without its md5 check
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def tutorial(root: str, epochs: int, threads: int | None) -> dict:
    """The tutorial's code, as written there (plus timing); `threads` None = torch's default."""
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = MirrorCIFAR10(root=root, train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=32, shuffle=True, num_workers=2)
    testset = MirrorCIFAR10(root=root, train=False, download=False, transform=transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=32, shuffle=False, num_workers=2)
    net = LeNet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    epoch_seconds = []
    t_all = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - t0)
    train_wall = time.perf_counter() - t_all
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            correct += (net(images).argmax(1) == labels).sum().item()
            total += labels.size(0)
    used = torch.get_num_threads()
    torch.set_num_threads(default_threads)
    return {"epoch_seconds": epoch_seconds, "train_wall_s": train_wall, "test_acc": correct / total,
            "threads": used, "train_images": len(trainset)}


def project(prepared: str, epochs: int, work: Path) -> dict:
    """The same recipe through the project's stages: `train_cnn.main` with the `tutorial` recipe of
    params.yaml (LeNet, SGD 0.001/0.9, batch 32, train+val = the same 50,000 images, its `threads`),
    then `evaluate_cnn.main` on the test split. Timed: the training steps of the epochs (the trainer's
    `train_seconds`, like the tutorial's timed loop) and the whole train_cnn call (data loading,
    per-epoch validation and checkpoints included)."""
    params = yaml.safe_load(PARAMS.read_text())
    params["cnn"]["recipe"] = "tutorial"
    params["cnn"]["recipes"]["tutorial"]["epochs"] = epochs
    recipe = params["cnn"]["recipes"]["tutorial"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    default_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    result = train_cnn.main(work / "params.yaml", prepared, work / "model.pt", live_dir=None,
                            metrics_path=None, progress=False)
    stage_wall = time.perf_counter() - t0
    metrics = evaluate_cnn.main(work / "params.yaml", prepared, work / "model.pt", work / "cnn.json", work / "plots")
    torch.set_num_threads(default_threads)
    n_train = sum(len(data.load_cifar(prepared, s)[1]) for s in ("train", "val"))
    return {"epoch_seconds": [n_train / r["train/img_per_s"] for r in result.history],
            "train_wall_s": result.train_seconds, "train_cnn_wall_s": stage_wall,
            "test_acc": metrics["test"]["acc"], "threads": recipe["threads"], "train_images": n_train,
            "recipe": recipe}


def same_images(root: str, prepared: str) -> bool:
    """The archive's 50,000 training images and prepare's train+val are the same set (order aside)."""
    ds = MirrorCIFAR10(root=root, train=True, download=False)
    x = torch.cat([data.load_cifar(prepared, s)[0] for s in ("train", "val")])  # N x 3 x 32 x 32
    a = torch.from_numpy(ds.data).permute(0, 3, 1, 2).reshape(len(ds.data), -1).long().sum(1).sort().values
    b = x.reshape(len(x), -1).long().sum(1).sort().values
    return len(a) == len(b) and torch.equal(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="cifar-10-python.tar.gz (official or the mirror's)")
    ap.add_argument("--prepared", default="data/prepared/cifar10", help="the prepare stage's output")
    ap.add_argument("--epochs", type=int, default=2, help="the tutorial's 2")
    ap.add_argument("--out", default="benchmarks/cnn_tutorial_vs_project.json", help="JSON results")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.archive) as tar:
            tar.extractall(tmp, filter="data")
        assert same_images(tmp, args.prepared), "prepared train+val is not the archive's training set"
        work = Path(tmp) / "project"
        work.mkdir()
        results = {
            "tutorial": tutorial(tmp, args.epochs, None),  # as written: torch's default threads
            "tutorial_1thread": tutorial(tmp, args.epochs, 1),  # the tutorial at the project's thread count
            "project": project(args.prepared, args.epochs, work),
        }
    t, p = results["tutorial"], results["project"]
    print(f"{'':17} {'threads':>7} {'s/epoch':>8} {'train s':>8} {'test acc':>9} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:17} {r['threads']:7d} {sum(r['epoch_seconds']) / len(r['epoch_seconds']):8.2f} "
              f"{r['train_wall_s']:8.1f} {r['test_acc']:9.4f} {t['train_wall_s'] / r['train_wall_s']:8.2f}x")
    ratio = t["train_wall_s"] / p["train_wall_s"]
    print(f"training wall time tutorial/project: {ratio:.2f}x (vs the 1-thread tutorial: "
          f"{results['tutorial_1thread']['train_wall_s'] / p['train_wall_s']:.2f}x); accuracy difference "
          f"{100 * (p['test_acc'] - t['test_acc']):+.2f} points; project train_cnn call {p['train_cnn_wall_s']:.1f} s")
    results.update(ratio=ratio, ratio_vs_1thread=results["tutorial_1thread"]["train_wall_s"] / p["train_wall_s"],
                   torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                   cores=os.cpu_count(), seed=SEED, loadavg_before=load_before, loadavg_after=os.getloadavg())
    print(f"load average before {load_before}, after {results['loadavg_after']}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
