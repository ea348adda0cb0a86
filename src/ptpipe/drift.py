"""Drift monitoring's numbers: what is measured of each input, the model's reference (its validation split as
the model sees it), and how a window of served traffic is compared with it.

The server logs `image_stats` of every image it classifies (ptpipe.predlog) and the reference holds the same
statistics of the validation split, so the two are compared like for like. For text models both sides hold
`prompt_stats`: a prompt's length and the model's own bits/char on it.

    ref = load_reference("models/cnn")                # recorded by the export stage inside model.onnx
    result = check(ref, predlog.read_window(log, "cnn", 500), params.monitor.model_dump())
    result["drifted"], result["reasons"]

What is compared, and why these tests (docs/monitoring.md, "What is compared, and the thresholds";
benchmarks/drift.py measured them on the real CIFAR-10 CNN and Alice models):
- input: a two-sample Kolmogorov-Smirnov test per image statistic (6, Bonferroni-corrected); for text, on the
  model's bits/char on the prompt, less the reference's median at that prompt length (a short prompt is
  harder to predict whatever its text: without the correction a change of prompt lengths looks like drift),
  flagged only when the mean also moved by `min_bits_shift` (another passage of the same book differs a little);
- predictions (classifiers): a chi-square test of the predicted-class counts, window vs reference;
- confidence (classifiers): a KS test on the top class's probability;
- accuracy, on the rows with feedback: a one-sided binomial test of the live accuracy against the reference's,
  flagged only when it is also `accuracy_drop` below it.
A family is flagged when its p-value is below `p_value`: with the three families at 0.01 the false-alarm
rate is at most ~3% on traffic like the validation split. This module is numpy-only (the torch-free server
imports it); `check` needs scipy, installed by the `monitor` extra.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ptpipe.stage import StageError

IMAGE_STATS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")
TEXT_STATS = ("prompt_chars", "bits_per_char")
METADATA_KEY = "ptpipe.reference"  # the exported files' metadata entry holding the reference (ptpipe.export)
MAX_ROWS = 5000   # rows of each statistic kept: a window of 2,000 is then compared with >= 2.5x as many
LENGTH_BINS = 10  # text: prompt-length bins (reference quantiles) the bits/char median is taken in
FORMAT = 1        # the reference's layout; a newer ptpipe reading an older one says to export again
# Decimals the reference keeps, and the window is rounded to before a test: both sides on one grid, so that
# float32 0.99999994 in a window and 1.0 in the reference are not a difference (a confident model has many).
STAT_DECIMALS, CONFIDENCE_DECIMALS = 3, 5


def image_stats(images: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x S x S (the model's input) -> float32 N x 6: per-channel mean and std on the 0-255 scale.

    Cheap, and what brightness, contrast, noise and blur shifts move first. From the sums of the values and
    of their squares, in place: 2x faster than numpy's mean and std on a commit's 1,400 images (the
    prediction log's writer computes them beside the serving threads; not as matrix products, whose BLAS
    threads would compete with those); the std differs from numpy's by <= 2e-5 on 32 x 32 images."""
    n = images.shape[0]
    x = images.reshape(n * 3, -1).astype(np.float32)
    mean = x.sum(axis=1).astype(np.float64) / x.shape[1]
    mean_square = np.square(x, out=x).sum(axis=1).astype(np.float64) / x.shape[1]
    std = np.sqrt(np.maximum(mean_square - mean * mean, 0.0))
    return np.concatenate([mean.reshape(n, 3), std.reshape(n, 3)], axis=1).astype(np.float32)


def prompt_bits_per_char(logits: np.ndarray, ids) -> float:
    """logits T x V the model returned on the T prompt ids it was fed -> the mean bits it spent on each next
    character of the prompt (ids[1:] from logits[:-1]); nan for a one-character prompt (nothing predicted)."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        return float("nan")
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(axis=1))
    return float(-log_p.mean() / np.log(2))


def prompt_stats(run: Callable[[dict], dict], meta: dict, ids) -> tuple[int, float]:
    """(prompt_chars, bits_per_char) of a text model on a prompt's ids, fed as generation feeds a prompt
    (ptpipe.inference.step): a recurrent model the whole prompt from a zero state, a cached or window model
    its last block_size characters with an empty past (what it sees; bits/char is over those)."""
    from ptpipe.inference import empty_input  # onnxruntime: not for drift's other users

    gen, ids = meta["generation"], [int(i) for i in ids]
    inputs = {i["name"]: i for i in meta["inputs"]}
    carried = gen["past"] if gen["mode"] == "cached" else gen.get("state", [])
    feeds = {c["input"]: empty_input(inputs[c["input"]], 1) for c in carried}  # a zero state, an empty past
    if gen.get("pad"):
        feeds[gen["pad"]] = np.zeros(1, np.int64)
    fed = ids[-int(gen["block_size"]):] if gen["mode"] in ("window", "cached") else ids
    out = run({meta["inputs"][0]["name"]: np.asarray([fed], dtype=np.int64), **feeds})
    return len(ids), prompt_bits_per_char(out[meta["outputs"][0]["name"]][0], fed)


# -- the reference ----------------------------------------------------------------------------------

def _sample(n: int, seed: int = 0) -> np.ndarray:
    """Row indices kept: all of them up to MAX_ROWS, else a seeded sample (sorted)."""
    return np.arange(n) if n <= MAX_ROWS else np.sort(np.random.default_rng(seed).choice(n, MAX_ROWS, replace=False))


def reference(outputs: np.ndarray, stats: np.ndarray, stat_names, labels=None, classes=None) -> dict:
    """The JSON-able summary of the validation split as the model sees it, what `check` compares a window with.

    outputs: float N x C class probabilities (classifiers) or N x 0 (text models); stats: float N x F named by
    stat_names (IMAGE_STATS or TEXT_STATS); labels: N true class indices (classifiers), giving the class prior
    and the accuracy; classes: the class names."""
    outputs, stats = np.asarray(outputs, dtype=np.float64), np.asarray(stats, dtype=np.float64)
    n, n_classes = outputs.shape
    if stats.shape != (n, len(stat_names)):
        raise ValueError(f"stats is {stats.shape}, expected {(n, len(stat_names))} (one column per stat name)")
    keep = _sample(n)
    ref = {"format": FORMAT, "n": n, "stat_names": list(stat_names),
           "stats": {name: np.round(stats[keep, j], STAT_DECIMALS).tolist() for j, name in enumerate(stat_names)}}
    if n_classes:
        predicted = outputs.argmax(axis=1)
        ref.update(classes=list(classes) if classes is not None else [str(i) for i in range(n_classes)],
                   predicted_counts=np.bincount(predicted, minlength=n_classes).tolist(),
                   confidence=np.round(outputs.max(axis=1)[keep], CONFIDENCE_DECIMALS).tolist())
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            ref.update(label_counts=np.bincount(labels, minlength=n_classes).tolist(),
                       accuracy=float((predicted == labels).mean()))
    return ref


def load_reference(model: str | Path) -> dict:
    """The reference recorded in an exported model: `model` is its folder (models/cnn) or its .onnx file."""
    from ptpipe import inference  # onnxruntime reads the metadata; only the monitor needs it here

    path = Path(model)
    path = path / "model.onnx" if path.is_dir() else path
    meta = inference.read_metadata(inference.open_session(path, threads=1))
    if METADATA_KEY not in meta:
        raise StageError(f"{path} has no drift reference (exported without its data, or by an older ptpipe): "
                         f"run `dvc repro export@{path.parent.name}`")
    ref = meta[METADATA_KEY]
    if not isinstance(ref, dict) or ref.get("format") != FORMAT:
        raise StageError(f"{path}: its drift reference is of another format than this ptpipe reads "
                         f"({ref.get('format') if isinstance(ref, dict) else ref!r}, expected {FORMAT}): "
                         f"run `dvc repro export@{path.parent.name}`")
    return ref


# -- the comparison ---------------------------------------------------------------------------------

def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise StageError("comparing a window with its reference needs scipy: pip install 'ptpipe[monitor]'") from None
    return stats


def _ks(stats, reference: np.ndarray, window: np.ndarray) -> dict:
    result = stats.ks_2samp(window, reference)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue),
            "window_mean": float(window.mean()), "reference_mean": float(reference.mean())}


def _length_corrected(ref_chars: np.ndarray, ref_bits: np.ndarray, chars: np.ndarray, bits: np.ndarray):
    """Bits/char less the reference's typical bits/char at the prompt's length: the part of a prompt's difficulty
    its length does not explain. The typical value is the median of each of LENGTH_BINS quantile bins of log
    length, interpolated linearly between the bins' median lengths. -> (reference's residuals, window's)."""
    log_ref, log_win = np.log(ref_chars), np.log(chars)
    edges = np.unique(np.quantile(log_ref, np.linspace(0, 1, LENGTH_BINS + 1)))
    which = np.clip(np.searchsorted(edges, log_ref, side="right") - 1, 0, len(edges) - 2)
    bins = [b for b in range(len(edges) - 1) if (which == b).any()]
    centres = np.array([np.median(log_ref[which == b]) for b in bins])
    medians = np.array([np.median(ref_bits[which == b]) for b in bins])
    return ref_bits - _interp(log_ref, centres, medians), bits - _interp(log_win, centres, medians)


def _interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp, continued past both ends along the end segments (a 4-character prompt is harder than the
    shortest bin's median length, not as hard)."""
    y = np.interp(x, xp, fp)
    if len(xp) < 2:
        return y
    low, high = x < xp[0], x > xp[-1]
    y[low] = fp[0] + (x[low] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[high] = fp[-1] + (x[high] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return y


def _input_drift(stats, ref: dict, window, t: dict) -> dict:
    names = list(window.stat_names)
    if names != ref["stat_names"]:
        raise StageError(f"window {window.model}: its statistics are {names}, the reference's "
                         f"{ref['stat_names']}: is the log of another kind of model?")
    columns = {name: np.round(np.asarray(window.stats[:, j], dtype=np.float64), STAT_DECIMALS)
               for j, name in enumerate(names)}
    reference = {name: np.asarray(ref["stats"][name], dtype=np.float64) for name in names}
    if names == list(TEXT_STATS):  # one test: bits/char corrected for the prompt's length
        ok = np.isfinite(columns["bits_per_char"]) & (columns["prompt_chars"] >= 2)
        ref_ok = np.isfinite(reference["bits_per_char"])
        ref_res, win_res = _length_corrected(reference["prompt_chars"][ref_ok], reference["bits_per_char"][ref_ok],
                                             columns["prompt_chars"][ok], columns["bits_per_char"][ok])
        features = {"bits_per_char_vs_length": {
            **(_ks(stats, ref_res, win_res) if ok.any() else {"p_value": 1.0}),  # only one-character prompts
            "window_bits_per_char": float(columns["bits_per_char"][ok].mean()) if ok.any() else None,
            "window_prompt_chars": float(columns["prompt_chars"].mean())}}
    else:
        features = {name: _ks(stats, reference[name], columns[name]) for name in names}
    # Bonferroni: the smallest p-value times the number of tests, so the family's false-alarm rate stays <= p_value
    p = min([1.0] + [f["p_value"] * len(features) for f in features.values()])
    drifted = p < t["p_value"]
    if names == list(TEXT_STATS):  # a text's passages differ in difficulty: a small shift is not drift
        f = features["bits_per_char_vs_length"]
        drifted = drifted and abs(f["window_mean"] - f["reference_mean"]) >= t["min_bits_shift"]
    return {"test": "ks", "p_value": p, "drifted": bool(drifted), "features": features}


def _prediction_drift(stats, ref: dict, probs: np.ndarray, p_value: float) -> dict:
    classes, ref_counts = ref["classes"], np.asarray(ref["predicted_counts"], dtype=np.float64)
    counts = np.bincount(probs.argmax(axis=1), minlength=len(classes)).astype(np.float64)
    seen = (counts + ref_counts) > 0  # a class neither side predicts adds nothing (and would divide by zero)
    table = np.stack([counts[seen], ref_counts[seen]])
    if seen.sum() < 2:
        chi2, p = 0.0, 1.0
    else:
        chi2, p = (float(v) for v in stats.chi2_contingency(table, correction=False)[:2])
    return {"test": "chi2", "statistic": chi2, "p_value": p, "drifted": p < p_value,
            "window_share": dict(zip(classes, (counts / counts.sum()).round(4).tolist())),
            "reference_share": dict(zip(classes, (ref_counts / ref_counts.sum()).round(4).tolist()))}


def _accuracy(stats, ref: dict, probs: np.ndarray, labels: list, t: dict) -> dict:
    rows = [i for i, label in enumerate(labels) if label is not None]
    result = {"accuracy": None, "n_labelled": len(rows), "reference_accuracy": ref.get("accuracy"),
              "accuracy_p_value": None, "accuracy_drifted": False}
    if not rows or not probs.shape[1]:
        return result
    predicted = [ref["classes"][k] for k in probs[rows].argmax(axis=1)]
    correct = sum(p == labels[i] for p, i in zip(predicted, rows))
    result["accuracy"] = correct / len(rows)
    if result["reference_accuracy"] is not None and len(rows) >= t["min_labelled"]:
        p = float(stats.binomtest(correct, len(rows), min(ref["accuracy"], 1.0), alternative="less").pvalue)
        result.update(accuracy_p_value=p, accuracy_drifted=bool(
            p < t["p_value"] and ref["accuracy"] - result["accuracy"] > t["accuracy_drop"]))
    return result


def check(reference: dict, window, thresholds: dict) -> dict:
    """A window of served traffic (predlog.Window) against the model's reference, with the `monitor:` params
    (params.yaml) as `thresholds`. JSON-able: {n, versions, input_drift, prediction_drift, confidence,
    accuracy, n_labelled, ..., drifted, reasons}. A window shorter than `thresholds["window"]` is described
    but not judged (`judged` false): too few requests for the tests' false-alarm rates to hold."""
    from ptpipe import params

    t = params.thresholds(thresholds)
    stats = _scipy_stats()
    n = len(window.ids)
    probs = np.asarray(window.outputs, dtype=np.float64).reshape(n, -1)
    result = {"model": window.model, "n": n, "versions": sorted(set(window.versions)), "judged": n >= t["window"],
              "input_drift": _input_drift(stats, reference, window, t) if n else None,
              "prediction_drift": None, "confidence": None}
    if probs.shape[1] and n:
        result["prediction_drift"] = _prediction_drift(stats, reference, probs, t["p_value"])
        conf = _ks(stats, np.asarray(reference["confidence"], dtype=np.float64),
                   np.round(probs.max(axis=1), CONFIDENCE_DECIMALS))
        result["confidence"] = {"test": "ks", **conf, "drifted": conf["p_value"] < t["p_value"]}
    result.update(_accuracy(stats, reference, probs, list(window.labels), t))
    reasons = [f"{name}: p = {result[name]['p_value']:.2g} < {t['p_value']}"
               for name in ("input_drift", "prediction_drift", "confidence") if result[name] and result[name]["drifted"]]
    text = (result["input_drift"] or {}).get("features", {}).get("bits_per_char_vs_length")
    if reasons and text and result["input_drift"]["drifted"]:  # the shift that made it drift, too
        reasons[0] += f", bits/char {text['window_mean'] - text['reference_mean']:+.2f} at equal prompt length"
    if result["accuracy_drifted"]:
        reasons.append(f"accuracy {result['accuracy']:.3f} on {result['n_labelled']} labelled vs reference "
                       f"{result['reference_accuracy']:.3f} (drop > {t['accuracy_drop']}, "
                       f"p = {result['accuracy_p_value']:.2g})")
    result.update(drifted=bool(result["judged"] and reasons), reasons=reasons if result["judged"] else [])
    return json.loads(json.dumps(result))  # plain floats and lists: what a report or an event carries
