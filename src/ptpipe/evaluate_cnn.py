"""Stage `evaluate_cnn`: test-set metrics, confusion matrix and the tutorial's prediction grid.

Reads models/cnn/model.pt (the model is rebuilt from its own config, not from params.yaml) and
the prepared test split; writes
  metrics/cnn.json                  test accuracy and loss, per-class accuracy (`dvc metrics show/diff`)
  plots/cnn/confusion.json          one {actual, predicted} row per test image (dvc.yaml: template confusion)
  plots/cnn/predictions.png         the first 16 test images with truth and prediction
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe import data, files, params as params_mod, stage, trainer
from ptpipe.kinds.cnn import load_model, normalize, predict


def save_grid(path: Path, images: torch.Tensor, truth: list[str], predicted: list[str]) -> None:
    """4x4 grid of uint8 3 x 32 x 32 images titled 'truth / prediction' (red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(7, 8))
    for ax, img, t, p in zip(axes.flat, images, truth, predicted):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{t}\n{p}", fontsize=9, color="black" if t == p else "red")
        ax.axis("off")
    fig.suptitle("first 16 test images: truth / prediction")
    fig.tight_layout()
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(params_file: str | Path = params_mod.PARAMS_FILE, prepared_dir: str | Path = "data/prepared/cifar10",
         model_path: str | Path = "models/cnn/model.pt", metrics_path: str | Path = "metrics/cnn.json",
         plots_dir: str | Path = "plots/cnn") -> dict:
    p = params_mod.load(params_file)  # validated before anything is written
    device = trainer.resolve_device(p.train.device)
    model, config = load_model(model_path)
    trained, facts = config["params"], config["data"]
    trainer.set_threads(trained.get("threads", 0))  # as the recipe trained
    images, labels = data.load_cifar(prepared_dir, "test")
    classes = facts["classes"]

    # channels_last as in training: mkldnn's faster layout, the same numbers up to float rounding
    model = model.to(device, memory_format=torch.channels_last)
    x = normalize(images.to(device), facts["mean"], facts["std"]).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = predict(model, x, tta=trained["tta"]).cpu()
    pred = logits.argmax(1)
    correct = pred == labels
    per_class = {c: correct[labels == i].float().mean().item() if (labels == i).any() else None
                 for i, c in enumerate(classes)}
    metrics = {
        "test": {"acc": correct.float().mean().item(), "loss": F.cross_entropy(logits, labels).item(),
                 "images": len(labels), "tta": trained["tta"]},
        "per_class_acc": per_class,
    }
    plots_dir = Path(plots_dir)
    files.write_json(plots_dir / "confusion.json",
                     [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(labels.tolist(), pred.tolist())])
    save_grid(plots_dir / "predictions.png", images[:16], [classes[i] for i in labels[:16]],
              [classes[i] for i in pred[:16]])
    files.write_json(metrics_path, metrics)
    print(f"test accuracy {metrics['test']['acc']:.4f} on {len(labels)} images (tta {trained['tta']})")
    return metrics


def _cli() -> None:
    args = stage.parser(__doc__, prepared="data/prepared/cifar10", model="models/cnn/model.pt",
                        metrics="metrics/cnn.json", plots="plots/cnn").parse_args()
    stage.run(main, args.params, args.prepared, args.model, args.metrics, args.plots)


if __name__ == "__main__":
    _cli()
