"""Drift detection: how often `ptpipe.drift.check` flags a window of shifted traffic (power), and how often an
unshifted one (false alarms), per shift, severity and window size; the model's accuracy drop per shift.

    python benchmarks/drift.py                      # this workspace's CNN, LSTM and GPT after `dvc repro` (real data)
    python benchmarks/drift.py --windows 50         # fewer windows per cell (a quick look)

Images: the reference is the validation split (5,000) as the exported CNN sees it (onnxruntime), built by
`drift.reference` as the export stage builds it; unshifted traffic is the real test split (10,000 images never
trained on: another sample of the same distribution); shifted traffic is the test split brightened, with its
contrast lowered, Gaussian noise added, blurred, re-encoded as low-quality JPEG, or drawn from 3 classes only
(a fraction of each window: the prior shift). Text: the reference is the export stage's (`export.prompts`
windows of Alice's validation text, seed 0); unshifted traffic is other windows of it (seed 1); a stricter
null ("other half") compares windows of the second half of the validation text with a reference of the first
half; shifted traffic is windows of other English texts (the project's README.md, a technical text, and the
GPL-3 licence from /usr/share/common-licenses, a legal text; characters outside the model's vocabulary
dropped), mixed into a fraction of each window.
Windows: `--windows` random windows (seed `--seed`) of 100, 500 and 2,000 requests per cell, no feedback
labels (live accuracy is not part of these figures). Thresholds: params.yaml's `monitor:` section.
Detection figures do not depend on machine load; the seconds column does (it is printed with the load).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ptpipe import drift, export, files, inference, params
from ptpipe.predlog import Window

ROOT = Path(__file__).resolve().parents[1]  # the workspace: models/ and data/prepared/ after `dvc repro`
SIZES = (100, 500, 2000)
TARGET_SIZE, TARGET_FALSE_ALARMS, TARGET_POWER, COSTLY = 500, 0.05, 0.95, 0.05
PRIOR_CLASSES = (2, 3, 5)  # bird, cat, dog: the prior shift's 3 classes (the model's hardest: it costs accuracy)


# -- image shifts: uint8 N x 3 x S x S -> the same, shifted -------------------------------------------

def _per_image(images: np.ndarray, fn) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(x.transpose(1, 2, 0)))).transpose(2, 0, 1) for x in images])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


SHIFTS = {  # name: (severities, unit, fn(images, severity, rng))
    "brightness": ((20, 40, 70), "+ pixel value",
                   lambda x, s, rng: np.clip(x.astype(np.int16) + s, 0, 255).astype(np.uint8)),
    "contrast": ((0.85, 0.7, 0.5), "x distance from the image mean",
                 lambda x, s, rng: np.clip((x - x.mean(axis=(1, 2, 3), keepdims=True)) * s
                                           + x.mean(axis=(1, 2, 3), keepdims=True), 0, 255).round().astype(np.uint8)),
    "noise": ((1, 2, 4), "Gaussian sigma (pixel values)",
              lambda x, s, rng: np.clip(x + rng.normal(0, s, x.shape), 0, 255).round().astype(np.uint8)),
    "blur": ((0.3, 0.5, 0.8), "Gaussian blur radius (pixels)",
             lambda x, s, rng: _per_image(x, lambda im: im.filter(ImageFilter.GaussianBlur(s)))),
    "jpeg": ((90, 70, 50, 10), "JPEG quality",
             lambda x, s, rng: _per_image(x, lambda im: _jpeg(im, s))),
}
PRIOR_SEVERITIES = (0.2, 0.4, 1.0)  # fraction of each window drawn from PRIOR_CLASSES only


def _view(model: inference.ImageClassifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities N x C, image_stats N x 6): what the server logs of these images."""
    logits = np.concatenate([model.logits(images[i: i + 1000]) for i in range(0, len(images), 1000)])
    return inference.softmax(logits.astype(np.float64)), drift.image_stats(images)


def _windows(pool: int, size: int, count: int, rng: np.random.Generator, special=None, fraction=0.0):
    """`count` index arrays of `size` rows of range(pool): each row from `special` with probability `fraction`."""
    for _ in range(count):
        idx = rng.choice(pool, size, replace=size > pool)
        if special is not None and fraction:
            swap = rng.random(size) < fraction
            idx[swap] = rng.choice(special, swap.sum())
        yield idx


def _flag_rates(ref: dict, probs, stats, names, windows, thresholds) -> dict:
    """Fractions of windows flagged: in all, and by each test family."""
    flagged, families = 0, {"input_drift": 0, "prediction_drift": 0, "confidence": 0}
    n = 0
    for idx in windows:
        thresholds = {**thresholds, "window": len(idx)}  # every size judged, as a deployment set to it would
        w = Window("bench", [str(i) for i in idx], np.zeros(len(idx)), ["v"] * len(idx), probs[idx], stats[idx],
                   names, [None] * len(idx))
        result = drift.check(ref, w, thresholds)
        flagged += result["drifted"]
        for f in families:
            families[f] += bool(result[f] and result[f]["drifted"])
        n += 1
    return {"flagged": flagged / n, **{f"by_{f}": v / n for f, v in families.items()}}


def images_bench(args, thresholds: dict, emit) -> None:
    model = inference.ImageClassifier(args.cnn, threads=1, check_source=False)
    prepared = args.cifar
    val_x, val_y = np.load(prepared / "val_images.npy"), np.load(prepared / "val_labels.npy")
    test_x, test_y = np.load(prepared / "test_images.npy"), np.load(prepared / "test_labels.npy")
    ref = drift.reference(*_view(model, val_x), drift.IMAGE_STATS, val_y, model.classes)
    probs, stats = _view(model, test_x)
    base_acc = float((probs.argmax(1) == test_y).mean())
    print(f"CNN: reference accuracy (val) {ref['accuracy']:.4f}, test accuracy {base_acc:.4f}")
    rng = np.random.default_rng(args.seed)
    cells = [("none", 0, "", probs, stats, None, 0.0, base_acc)] if "none" in args.shifts else []
    for name, (severities, unit, fn) in SHIFTS.items():
        for s in severities if name in args.shifts else ():
            p, st = _view(model, fn(test_x, s, rng))
            cells.append((name, s, unit, p, st, None, 0.0, float((p.argmax(1) == test_y).mean())))
    special = np.flatnonzero(np.isin(test_y, PRIOR_CLASSES))
    for f in PRIOR_SEVERITIES if "prior" in args.shifts else ():
        # a window's expected accuracy: its mix of the 3 classes' accuracy and the whole split's
        acc = f * float((probs[special].argmax(1) == test_y[special]).mean()) + (1 - f) * base_acc
        cells.append(("prior", f, "fraction from 3 classes", probs, stats, special, f, acc))
    for shift, severity, unit, p, st, special_idx, fraction, acc in cells:
        for size in SIZES:
            t0 = time.perf_counter()
            wrng = np.random.default_rng([args.seed, size])  # the same windows for every shift
            rates = _flag_rates(ref, p, st, drift.IMAGE_STATS,
                                _windows(len(test_x), size, args.windows, wrng, special_idx, fraction), thresholds)
            emit({"model": "cnn", "shift": shift, "severity": severity, "unit": unit, "window": size,
                  "windows": args.windows, **rates, "accuracy": acc, "accuracy_drop": base_acc - acc,
                  "seconds": time.perf_counter() - t0})


def _text_pool(model: inference.TextGenerator, text_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(chars, bits/char) N x 2 of n export.prompts windows of a text, as the server logs a prompt."""
    return np.asarray([drift.prompt_stats(model.run, model.meta, p) for p in export.prompts(text_ids, n, seed)])


def _encodable(text: str, vocab: list[str]) -> np.ndarray:
    """The text's ids, its characters outside the model's vocabulary dropped (the server refuses them)."""
    index = {c: i for i, c in enumerate(vocab)}
    return np.asarray([index[c] for c in text if c in index], dtype=np.int64)


def text_bench(args, thresholds: dict, name: str, path: Path, emit) -> None:
    model = inference.TextGenerator(path, threads=1, check_source=False)
    val = np.load(args.alice / "val_ids.npy").astype(np.int64)
    half = len(val) // 2
    ref = export.reference(model.run, model.meta, args.alice)  # what the export stage records
    # A stricter null: the reference of the first half of the validation text, traffic from the second
    first = _text_pool(model, val[:half], export.REFERENCE_PROMPTS, seed=0)
    ref_first = drift.reference(np.zeros((len(first), 0)), first, drift.TEXT_STATS)
    alice, second = _text_pool(model, val, args.prompts, seed=1), _text_pool(model, val[half:], args.prompts, seed=1)
    others = {"readme": ROOT / "README.md", "gpl3": Path("/usr/share/common-licenses/GPL-3")}
    cells = [("none", 0.0, ref, alice), ("other half", 0.0, ref_first, second)]
    for other, file in others.items():
        pool = _text_pool(model, _encodable(file.read_text(encoding="utf-8"), model.vocab), args.prompts, seed=2)
        cells += [(other, f, ref, np.concatenate([alice, pool])) for f in (0.1, 0.25, 0.5, 1.0)]
    print(f"{name}: bits/char reference {np.nanmean(ref['stats']['bits_per_char']):.3f}, unshifted "
          f"{np.nanmean(alice[:, 1]):.3f}; 1st half {np.nanmean(first[:, 1]):.3f}, 2nd {np.nanmean(second[:, 1]):.3f}; "
          + ", ".join(f"{c[0]} {np.nanmean(c[3][len(alice):, 1]):.3f}" for c in cells[2::4]))
    for shift, fraction, reference, pool in cells:
        special = np.arange(len(alice), len(pool)) if len(pool) > len(alice) else None
        for size in SIZES:
            t0 = time.perf_counter()
            wrng = np.random.default_rng([args.seed, size])
            windows = _windows(len(alice), size, args.windows, wrng, special, fraction)
            rates = _flag_rates(reference, np.zeros((len(pool), 0)), pool, drift.TEXT_STATS, windows, thresholds)
            bits = np.nanmean(pool[special, 1] if special is not None else pool[:, 1])
            emit({"model": name, "shift": shift, "severity": fraction, "unit": "fraction of prompts",
                  "window": size, "windows": args.windows, **rates, "other_bits_per_char": float(bits),
                  "seconds": time.perf_counter() - t0})


def _line(r: dict) -> str:
    extra = (f"acc drop {r['accuracy_drop']:+.3f}" if "accuracy_drop" in r else f"bits/char {r['other_bits_per_char']:.2f}")
    return (f"{r['model']:5} {r['shift']:10} {r['severity']!s:>5} n={r['window']:5} flagged {r['flagged']:.3f} "
            f"(inputs {r['by_input_drift']:.2f}, predictions {r['by_prediction_drift']:.2f}, "
            f"confidence {r['by_confidence']:.2f}) {extra}")


NULLS = ("none", "other half")  # unshifted traffic: what is flagged there is a false alarm


def summary(rows: list[dict]) -> list[str]:
    """The targets at TARGET_SIZE: false alarms; power at each image shift's first severity costing >= 5 points
    of accuracy (text: the smallest fraction of foreign prompts flagged in >= 95% of windows)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        at = [r for r in rows if r["model"] == model and r["window"] == TARGET_SIZE]
        for r in (r for r in at if r["shift"] in NULLS):
            lines.append(f"{model}: false alarms at {TARGET_SIZE} ({r['shift']}): {r['flagged']:.3f} "
                         f"(target <= {TARGET_FALSE_ALARMS}) {'MET' if r['flagged'] <= TARGET_FALSE_ALARMS else 'NOT MET'}")
        for shift in dict.fromkeys(r["shift"] for r in at if r["shift"] not in NULLS):
            cells = [r for r in at if r["shift"] == shift]
            if "accuracy_drop" not in cells[0]:
                found = [r["severity"] for r in cells if r["flagged"] >= TARGET_POWER]
                lines.append(f"  {shift}: flagged in >= {TARGET_POWER:.0%} of windows from a fraction of "
                             f"{found[0] if found else 'none'} of the prompts")
                continue
            costly = [r for r in cells if r["accuracy_drop"] >= COSTLY]
            if not costly:
                lines.append(f"  {shift}: no severity costs >= {COSTLY:.0%} accuracy (power "
                             + ", ".join(f"{r['severity']}: {r['flagged']:.3f}" for r in cells) + ")")
                continue
            r = costly[0]
            lines.append(f"  {shift} {r['severity']}: power {r['flagged']:.3f} (target >= {TARGET_POWER}) "
                         f"{'MET' if r['flagged'] >= TARGET_POWER else 'NOT MET'}, accuracy drop {r['accuracy_drop']:.3f}")
    return lines


def table(rows: list[dict]) -> str:
    """Markdown: one row per model/shift/severity, power (flagged fraction) per window size."""
    out = ["| model | shift | severity | accuracy drop | " + " | ".join(f"flagged @{s}" for s in SIZES) + " |",
           "|---|---|---:|---:|" + "---:|" * len(SIZES)]
    keys = dict.fromkeys((r["model"], r["shift"], r["severity"]) for r in rows)
    for model, shift, severity in keys:
        cell = {r["window"]: r for r in rows if (r["model"], r["shift"], r["severity"]) == (model, shift, severity)}
        first = next(iter(cell.values()))
        drop = f"{first['accuracy_drop']:+.3f}" if "accuracy_drop" in first else f"({first['other_bits_per_char']:.2f} b/c)"
        out.append(f"| {model} | {shift} | {severity} | {drop} | "
                   + " | ".join(f"{cell[s]['flagged']:.3f}" if s in cell else "-" for s in SIZES) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn", type=Path, default=ROOT / "models/cnn/model.onnx", help="exported CNN (default: %(default)s)")
    ap.add_argument("--cifar", type=Path, default=ROOT / "data/prepared/cifar10", help="prepared CIFAR-10 (val, test)")
    ap.add_argument("--alice", type=Path, default=ROOT / "data/prepared/alice", help="prepared Alice text (val)")
    ap.add_argument("--text-models", nargs="*", default=["lstm", "gpt"], help="models under --models to run")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="where the text models are (default: %(default)s)")
    ap.add_argument("--no-images", action="store_true", help="text models only")
    ap.add_argument("--shifts", nargs="*", default=["none", *SHIFTS, "prior"],
                    help="image shifts to run (default: all, and the unshifted windows)")
    ap.add_argument("--windows", type=int, default=200, help="random windows per cell (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=3000, help="prompts in each text pool (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="shift noise and window draws (default: %(default)s)")
    ap.add_argument("--params", default="params.yaml", help="the monitor: thresholds (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drift.json"))
    args = ap.parse_args()
    thresholds = params.thresholds(params.load(args.params).monitor)
    t0, load, rows = time.time(), os.getloadavg(), []

    def emit(row: dict) -> None:  # printed, and the JSON rewritten: a run stopped early keeps its rows
        rows.append(row)
        print(_line(row), flush=True)
        files.write_json(args.out, {"thresholds": thresholds, "seed": args.seed, "windows": args.windows,
                                    "sizes": SIZES, "prompts": args.prompts, "summary": summary(rows), "rows": rows,
                                    "seconds": time.time() - t0, "load_average": [load, os.getloadavg()],
                                    "machine": platform.processor() or platform.machine()})

    if not args.no_images:
        images_bench(args, thresholds, emit)
    for name in args.text_models:
        text_bench(args, thresholds, name, args.models / name / "model.onnx", emit)
    print(table(rows))
    print("\n".join(summary(rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
