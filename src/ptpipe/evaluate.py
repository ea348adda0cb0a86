"""Stage `evaluate`: how good a trained model is on data it did not train on, for any kind.

    python -m ptpipe.evaluate --data data/prepared/cifar10 --model models/cnn/model.pt \
        --metrics metrics/cnn/evaluate.json --reports reports/cnn/evaluate

The model is rebuilt from its own file (kind, config and the data set it trained on), not from
params.yaml; the prepared data must be the data it trained on (their md5s are compared).

Image classifiers (task image-classification), on the test split with the test-time augmentation
they trained with: metrics = test accuracy and loss, per-class accuracy under the class names;
reports = confusion.json (one {actual, predicted} row per test image: dvc.yaml plots it with DVC's
confusion template) and predictions.png (the first 16 test images titled truth / prediction).

Text models (task text-generation), on the validation text with the windows or streams they
validated with: metrics = loss in nats/char, perplexity, bits/char beside the unigram baseline of
prepare's stats.json; reports = samples.txt, one sample per `evaluate.sample.temperatures`, seeded,
on the CPU (the same text on every machine).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ptpipe import data, files, kinds, params as params_mod, stage, train


def evaluate(data_dir: str | Path, model_path: str | Path, metrics_path: str | Path, reports_dir: str | Path,
             params_file: str | Path = params_mod.PARAMS_FILE) -> dict:
    p = params_mod.load(params_file)  # validated before anything is written
    kind, model, config = kinds.load(model_path)
    data.check_same_data(config, data_dir, model_path)
    train.set_threads(config["params"].get("threads", 0))  # as the model trained
    if kind.task == "image-classification":
        metrics = _classifier(model, config, Path(data_dir), Path(reports_dir), train.resolve_device(p.train.device))
    else:
        metrics = _text_model(kind, model, config, Path(data_dir), Path(reports_dir), p.evaluate.sample)
    files.write_json(metrics_path, metrics)
    return metrics


def _classifier(raw: torch.nn.Module, config: dict, data_dir: Path, reports: Path, device: torch.device) -> dict:
    from ptpipe.kinds.cnn import normalize, predict

    images, labels = data.load_images(data_dir, "test")
    classes, facts, tta = config["data"]["classes"], config["data"], config["params"]["tta"]
    # channels_last as in training: oneDNN's faster layout, the same numbers up to float rounding
    model = raw.model.to(device, memory_format=torch.channels_last)
    x = normalize(images.to(device), facts["mean"], facts["std"]).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = predict(model, x, tta=tta).cpu()
    pred = logits.argmax(1)
    correct = pred == labels
    per_class = {c: correct[labels == i].float().mean().item() if (labels == i).any() else None
                 for i, c in enumerate(classes)}
    files.write_json(reports / "confusion.json",
                     [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(labels.tolist(), pred.tolist())])
    save_grid(reports / "predictions.png", images[:16], [classes[i] for i in labels[:16]],
              [classes[i] for i in pred[:16]])
    acc = correct.float().mean().item()
    print(f"test accuracy {acc:.4f} on {len(labels)} images (tta {tta})")
    return {"test": {"acc": acc, "loss": F.cross_entropy(logits, labels).item(), "images": len(labels), "tta": tta},
            "per_class_acc": per_class}


def save_grid(path: Path, images: torch.Tensor, truth: list[str], predicted: list[str]) -> None:
    """A grid of up to 16 uint8 3 x S x S images titled 'truth / prediction' (red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(7, 8))
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p in zip(axes.flat, images, truth, predicted):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{t}\n{p}", fontsize=9, color="black" if t == p else "red")
    fig.suptitle(f"first {len(images)} test images: truth / prediction")
    fig.tight_layout()
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _text_model(kind: kinds.ModelKind, model: torch.nn.Module, config: dict, data_dir: Path, reports: Path,
                sample: params_mod.Sample) -> dict:
    from ptpipe.generate import generate

    _, val_ids, vocab = data.load_text(data_dir)
    prompt = sample.prompt or "".join(vocab[i] for i in val_ids[:10].tolist())
    missing = sorted(set(prompt) - set(config["data"]["vocab"]))
    if missing:  # checked before anything runs: the key to change, not a sampling error
        raise stage.StageError(f"params.yaml: evaluate.sample.prompt {prompt!r}: characters not in the model's "
                               f"vocabulary: {''.join(missing)!r}; use characters of the text, or null (its first 10)")
    nats, n = kind.text_loss(model, val_ids, config["params"])
    stats = data.load_stats(data_dir)
    metrics = {
        "val_loss_nats_per_char": nats / n, "val_perplexity": math.exp(nats / n),
        "val_bits_per_char": nats / n / math.log(2), "val_characters_predicted": n,
        # what a model that ignores context scores: train-split entropy, and the val text under it
        "unigram_bits_per_char": stats.get("unigram_bits_per_char"),
        "unigram_val_bits_per_char": stats.get("unigram_val_bits_per_char"),
    }
    blocks = [f"=== temperature {t:g}, seed {sample.seed}, prompt {prompt!r} ===\n"
              f"{generate(model, config, prompt, sample.length, t, sample.seed)}\n" for t in sample.temperatures]
    files.write_text(reports / "samples.txt", "\n".join(blocks))
    print(f"val {metrics['val_bits_per_char']:.3f} bits/char (perplexity {metrics['val_perplexity']:.2f}); "
          f"unigram baseline {metrics['unigram_bits_per_char']} bits/char")
    return metrics


def main() -> None:
    args = stage.parser(__doc__, "data", "model", "metrics", "reports").parse_args()
    stage.run(evaluate, args.data, args.model, args.metrics, args.reports, args.params)


if __name__ == "__main__":
    main()
