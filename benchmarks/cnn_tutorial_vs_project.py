"""The tutorial recipe (LeNet, SGD lr 0.001 momentum 0.9, batch 32, 2 epochs), two ways, one run:

  tutorial  the tutorial's own loop: torchvision `CIFAR10` + `DataLoader` (num_workers=2),
            per-image `ToTensor` + `Normalize((0.5,)*3, (0.5,)*3)`, all 50,000 training images
  project   `ptpipe.trainer.fit` with `CnnTask` (recipe `tutorial`, train_split train+val = the same
            50,000 images): one uint8 tensor, normalised once, batches as slices

Prints wall time per epoch and test accuracy side by side, the ratio, and writes JSON.

    python benchmarks/cnn_tutorial_vs_project.py --archive /tmp/mirror/cifar-10-python.tar.gz \
        --prepared data/prepared/cifar10 --out benchmarks/cnn_tutorial_vs_project.json

torchvision's CIFAR10 checks each extracted file against the official md5 list and refuses the
loopback mirror's (JPEG re-encoded) files: `MirrorCIFAR10` skips that check and nothing else.
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms

from ptpipe import data, trainer
from ptpipe.cnn import EpochImages, LeNet, normalize, predict
from ptpipe.params import CnnRecipe
from ptpipe.train_cnn import CnnTask, make_optimizer

SEED = 0


class MirrorCIFAR10(torchvision.datasets.CIFAR10):
    def _check_integrity(self) -> bool:  # the mirror's files are real CIFAR-10 with other checksums
        return True

    def _load_meta(self) -> None:  # as torchvision's, without its md5 check
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def tutorial(root: str, epochs: int) -> dict:
    """The tutorial's code, as written there (plus timing)."""
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
    for _ in range(epochs):
        t0 = time.perf_counter()
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - t0)
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            correct += (net(images).argmax(1) == labels).sum().item()
            total += labels.size(0)
    return {"epoch_seconds": epoch_seconds, "test_acc": correct / total}


def project(prepared: str, epochs: int, work: Path) -> dict:
    """The same recipe through the project's trainer (the `tutorial` recipe of params.yaml)."""
    recipe = CnnRecipe(arch="lenet", model_args={}, epochs=epochs, batch_size=32, train_split="train+val",
                       optimizer="sgd", lr=0.001, momentum=0.9, nesterov=False, weight_decay=0.0,
                       bias_lr_scale=1.0, schedule="constant", warmup_fraction=0.0, initial_lr_factor=1.0,
                       final_lr_factor=1.0, label_smoothing=0.0, lookahead=False, whiten_bias_epochs=0,
                       translate=0, flip="none", tta=0, compile="never", seed=SEED)
    card = data.load_card(prepared)
    mean, std = card["mean"], card["std"]
    train_x, train_y = data.load_cifar(prepared, "train")
    val_x, val_y = data.load_cifar(prepared, "val")
    test_x, test_y = data.load_cifar(prepared, "test")
    train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    trainer.seed_everything(SEED)
    model = LeNet()
    train_set = EpochImages(train_x, train_y, batch_size=32, seed=SEED, mean=mean, std=std, flip="none", translate=0)
    task = CnnTask(train_set, normalize(val_x[:1000], mean, std), val_y[:1000], 0.0)
    optimizer, scheduler = make_optimizer(model, recipe, 0.001, len(train_set))
    epoch_seconds = []

    class Timed(CnnTask):  # per-epoch wall time of the training batches only, as for the tutorial
        def train_batches(self, epoch):
            t0 = time.perf_counter()
            yield from task.train_batches(epoch)
            epoch_seconds.append(time.perf_counter() - t0)

    timed = Timed(train_set, task.val_x, task.val_y, 0.0)
    spec = trainer.Fit(epochs=epochs, model_path=work / "model.pt", checkpoint_path=work / "checkpoint.pt",
                       config={"benchmark": True}, live_dir=None, progress=False)
    trainer.fit(model, timed, optimizer, scheduler, spec, torch.device("cpu"))
    acc = (predict(model, normalize(test_x, mean, std)).argmax(1) == test_y).float().mean().item()
    return {"epoch_seconds": epoch_seconds, "test_acc": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="cifar-10-python.tar.gz (official or the mirror's)")
    ap.add_argument("--prepared", default="data/prepared/cifar10", help="the prepare stage's output")
    ap.add_argument("--epochs", type=int, default=2, help="the tutorial's 2")
    ap.add_argument("--out", default="benchmarks/cnn_tutorial_vs_project.json", help="JSON results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.archive) as tar:
            tar.extractall(tmp, filter="data")
        results = {"tutorial": tutorial(tmp, args.epochs), "project": project(args.prepared, args.epochs, Path(tmp))}
    t, p = results["tutorial"], results["project"]
    ratio = sum(t["epoch_seconds"]) / sum(p["epoch_seconds"])
    print(f"{'':10} {'s/epoch':>10} {'test acc':>9}")
    for name, r in results.items():
        print(f"{name:10} {sum(r['epoch_seconds']) / len(r['epoch_seconds']):10.2f} {r['test_acc']:9.4f}")
    print(f"training wall time ratio tutorial/project: {ratio:.2f}x; accuracy difference "
          f"{100 * (p['test_acc'] - t['test_acc']):+.2f} points")
    results.update(ratio=ratio, torch=torch.__version__, threads=torch.get_num_threads(),
                   cpu=platform.processor() or platform.machine(), seed=SEED)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
