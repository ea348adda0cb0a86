"""ptpipe.drift: the reference the export stage records inside the model, and `check` of a window against it.

Own small data: tiny seeded models and prepared data (fixtures), synthetic windows (predlog.Window) from seeded
generators."""
import json
import re
import sys

import numpy as np
import pytest
import yaml

from fixtures import ROOT, write_models, write_prepared
from ptpipe import drift, export, params
from ptpipe.inference import ImageClassifier, TextGenerator
from ptpipe.predlog import Window
from ptpipe.stage import StageError

THRESHOLDS = {"window": 200, "p_value": 0.01, "accuracy_drop": 0.05, "min_bits_shift": 0.2, "min_labelled": 50}


def window(outputs, stats, names=drift.IMAGE_STATS, labels=None) -> Window:
    n = len(stats)
    return Window("m", [f"r{i}" for i in range(n)], np.arange(n, dtype=np.float64), ["v1"] * n,
                  np.asarray(outputs, dtype=np.float32), np.asarray(stats, dtype=np.float32), names,
                  labels if labels is not None else [None] * n)


# -- the reference, recorded by the export stage ---------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A folder with prepared data and the three tiny models (cnn, lstm, gpt) exported with their references."""
    root = tmp_path_factory.mktemp("drift")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_prepared(root)
    write_models(root / "models")
    for model, data_set in (("cnn", "cifar10"), ("lstm", "alice"), ("gpt", "alice")):
        export.export(root / "models" / model, root / "params.yaml", revision="abc", data_dir=root / "data/prepared" / data_set)
    return root


def test_classifier_reference_is_the_validation_split_as_the_onnx_model_sees_it(exported):
    ref = drift.load_reference(exported / "models/cnn")  # a folder, or the file itself
    assert ref == drift.load_reference(exported / "models/cnn/model.onnx")
    prepared = exported / "data/prepared/cifar10"
    images, labels = np.load(prepared / "val_images.npy"), np.load(prepared / "val_labels.npy")
    model = ImageClassifier(exported / "models/cnn/model.onnx")
    probs = model.top_k(images, 1)
    predicted = [model.classes.index(row[0][0]) for row in probs]
    assert ref["n"] == len(images) and ref["classes"] == model.classes
    assert ref["predicted_counts"] == np.bincount(predicted, minlength=10).tolist()
    assert ref["label_counts"] == np.bincount(labels, minlength=10).tolist()
    assert ref["accuracy"] == pytest.approx(float(np.mean(np.asarray(predicted) == labels)))
    assert ref["confidence"] == pytest.approx([row[0][1] for row in probs], abs=1e-4)
    stats = drift.image_stats(images)
    assert ref["stat_names"] == list(drift.IMAGE_STATS)
    for j, name in enumerate(drift.IMAGE_STATS):
        assert ref["stats"][name] == pytest.approx(stats[:, j], abs=1e-3)
    # the TorchScript file carries the same reference (one metadata dict for both files)
    assert export.load_torchscript(exported / "models/cnn/model.ts")[1][drift.METADATA_KEY] == ref


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_text_reference_is_the_models_bits_per_char_on_validation_prompts(exported, model):
    ref = drift.load_reference(exported / "models" / model)
    assert ref["stat_names"] == list(drift.TEXT_STATS) and ref["n"] == export.REFERENCE_PROMPTS
    assert "classes" not in ref and "accuracy" not in ref
    val = np.load(exported / "data/prepared/alice/val_ids.npy").astype(np.int64)
    prompts = export.prompts(val, export.REFERENCE_PROMPTS, seed=0)
    assert ref["stats"]["prompt_chars"] == [len(p) for p in prompts]
    generator = TextGenerator(exported / "models" / model / "model.onnx")
    for i in (0, 1, 2):  # recomputed through onnxruntime, as the server would
        assert ref["stats"]["bits_per_char"][i] == pytest.approx(
            drift.prompt_stats(generator.run, generator.meta, prompts[i])[1], abs=1e-3)


def test_prompt_bits_per_char_is_the_mean_surprise_of_each_next_character():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1, 1, 1]]))
    assert drift.prompt_bits_per_char(logits, [0, 1, 2]) == pytest.approx((2 + 1) / 2)  # p(1)=.25, p(2)=.5
    assert np.isnan(drift.prompt_bits_per_char(logits[:1], [0]))  # one character: nothing predicted


def test_a_model_exported_without_its_data_has_no_reference_and_says_how_to_get_one(exported, tmp_path):
    other = tmp_path / "models/cnn"
    other.mkdir(parents=True)
    (other / "model.pt").write_bytes((exported / "models/cnn/model.pt").read_bytes())
    export.export(other, exported / "params.yaml", revision="abc")  # no data_dir: as an older ptpipe exported
    with pytest.raises(StageError, match=r"no drift reference .*dvc repro export@cnn"):
        drift.load_reference(other)
    with pytest.raises(StageError, match="is missing"):
        drift.load_reference(tmp_path / "models/none/model.onnx")


def test_a_reference_of_another_format_is_refused(tmp_path, monkeypatch):
    from ptpipe import inference

    monkeypatch.setattr(inference, "open_session", lambda path, threads=0: None)
    monkeypatch.setattr(inference, "read_metadata", lambda session: {drift.METADATA_KEY: {"format": 99}})
    with pytest.raises(StageError, match=r"another format .*99, expected 1.*dvc repro export"):
        drift.load_reference(tmp_path / "model.onnx")


def test_export_refuses_data_other_than_the_models(exported, tmp_path):
    other = tmp_path / "data/prepared/cifar10"
    other.mkdir(parents=True)
    for f in (exported / "data/prepared/cifar10").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    np.save(other / "val_labels.npy", np.zeros(64, dtype=np.uint8))  # another data set now
    before = (exported / "models/cnn/model.onnx").read_bytes()
    with pytest.raises(StageError, match="was trained on data set .cifar10. as prepared then"):
        export.export(exported / "models/cnn", exported / "params.yaml", revision="abc", data_dir=other)
    assert (exported / "models/cnn/model.onnx").read_bytes() == before  # nothing written


# -- check: a window against the reference -------------------------------------------------------

def synthetic(n: int, seed: int, brightness: float = 0.0, classes_from: int = 10, acc: float = 0.8):
    """(probabilities n x 10, image_stats n x 6, true labels) of seeded noise images: per-image brightness
    ~ N(120, 30) (+ `brightness`), predictions from the first `classes_from` classes with confidence
    ~ U(0.4, 0.99), right with probability `acc`."""
    rng = np.random.default_rng(seed)
    level = rng.normal(120, 30, (n, 1, 1, 1)) + brightness
    images = np.clip(level + rng.normal(0, 40, (n, 3, 8, 8)), 0, 255).astype(np.uint8)
    predicted = rng.integers(0, classes_from, n)
    top = rng.uniform(0.4, 0.99, n)
    probs = np.repeat(((1 - top) / 9)[:, None], 10, axis=1)
    probs[np.arange(n), predicted] = top
    labels = np.where(rng.random(n) < acc, predicted, (predicted + 1) % 10)
    return probs, drift.image_stats(images), labels


@pytest.fixture(scope="module")
def ref():
    probs, stats, labels = synthetic(3000, seed=0)
    return drift.reference(probs, stats, drift.IMAGE_STATS, labels, [f"c{i}" for i in range(10)])


def test_an_unshifted_window_is_not_flagged(ref):
    probs, stats, _ = synthetic(500, seed=1)
    result = drift.check(ref, window(probs, stats), THRESHOLDS)
    assert result["judged"] and not result["drifted"] and result["reasons"] == []
    assert result["input_drift"]["p_value"] > 0.01 and result["prediction_drift"]["p_value"] > 0.01
    assert result["n"] == 500 and result["versions"] == ["v1"] and result["accuracy"] is None
    json.dumps(result)  # what an event or a report carries


def test_brighter_images_are_flagged_as_input_drift(ref):
    probs, stats, _ = synthetic(500, seed=1, brightness=15)
    result = drift.check(ref, window(probs, stats), THRESHOLDS)
    assert result["drifted"] and result["input_drift"]["drifted"] and not result["prediction_drift"]["drifted"]
    assert result["reasons"][0].startswith("input_drift: p = ")
    assert result["input_drift"]["features"]["mean_r"]["window_mean"] == pytest.approx(
        result["input_drift"]["features"]["mean_r"]["reference_mean"] + 15, abs=4)


def test_a_prior_shift_is_flagged_as_prediction_drift(ref):
    probs, stats, _ = synthetic(500, seed=1, classes_from=3)
    result = drift.check(ref, window(probs, stats), THRESHOLDS)
    assert result["prediction_drift"]["drifted"] and not result["input_drift"]["drifted"] and result["drifted"]
    assert result["prediction_drift"]["window_share"]["c9"] == 0


def test_lower_confidence_is_flagged(ref):
    probs, stats, _ = synthetic(500, seed=1)
    flat = 0.6 * probs + 0.4 / 10  # the same predictions, less sure of them
    result = drift.check(ref, window(flat, stats), THRESHOLDS)
    assert result["confidence"]["drifted"] and not result["prediction_drift"]["drifted"]
    assert result["confidence"]["window_mean"] < result["confidence"]["reference_mean"]


def test_live_accuracy_is_judged_on_enough_labelled_rows_only(ref):
    probs, stats, labels = synthetic(500, seed=1, acc=0.6)  # 20 points below the reference's 0.8
    names = [f"c{k}" for k in labels]
    few = [names[i] if i < 20 else None for i in range(500)]
    result = drift.check(ref, window(probs, stats, labels=few), THRESHOLDS)
    assert result["n_labelled"] == 20 and result["accuracy"] is not None and not result["accuracy_drifted"]
    result = drift.check(ref, window(probs, stats, labels=names), THRESHOLDS)
    assert result["accuracy"] == pytest.approx(0.6, abs=0.05) and result["accuracy_drifted"] and result["drifted"]
    assert any(r.startswith("accuracy ") for r in result["reasons"])
    good_probs, good_stats, good_labels = synthetic(500, seed=1)
    result = drift.check(ref, window(good_probs, good_stats, labels=[f"c{k}" for k in good_labels]), THRESHOLDS)
    assert not result["accuracy_drifted"] and not result["drifted"]


def test_a_window_shorter_than_the_param_is_described_not_judged(ref):
    probs, stats, _ = synthetic(100, seed=1, brightness=40)
    result = drift.check(ref, window(probs, stats), THRESHOLDS)
    assert not result["judged"] and not result["drifted"] and result["input_drift"]["drifted"]


def test_a_window_of_another_kind_of_statistics_is_refused(ref):
    with pytest.raises(StageError, match="statistics are"):
        drift.check(ref, window(np.zeros((300, 0)), np.zeros((300, 2)), drift.TEXT_STATS), THRESHOLDS)


def text_rows(n: int, seed: int, harder: float = 0.0, short: bool = False) -> np.ndarray:
    """(prompt_chars, bits_per_char): lengths log-uniform 4..256 as export.prompts draws them (short: uniform
    4..40); bits/char falls with length (more context), + `harder` for another text."""
    rng = np.random.default_rng(seed)
    chars = rng.integers(4, 40, n) if short else np.exp(rng.uniform(np.log(4), np.log(256), n)).astype(int)
    return np.stack([chars, 2.0 + 6.0 / np.sqrt(chars) + harder + rng.normal(0, 0.3, n)], axis=1)


def test_text_windows_are_compared_on_bits_per_char_at_the_prompts_length():
    ref = drift.reference(np.zeros((1000, 0)), text_rows(1000, 0), drift.TEXT_STATS)
    same = drift.check(ref, window(np.zeros((500, 0)), text_rows(500, 1), drift.TEXT_STATS), THRESHOLDS)
    assert not same["drifted"] and same["prediction_drift"] is None and same["confidence"] is None
    # shorter prompts cost more bits/char, and that alone is not drift
    short = drift.check(ref, window(np.zeros((500, 0)), text_rows(500, 1, short=True), drift.TEXT_STATS), THRESHOLDS)
    assert not short["drifted"], short["input_drift"]
    other = drift.check(ref, window(np.zeros((500, 0)), text_rows(500, 1, harder=0.3), drift.TEXT_STATS), THRESHOLDS)
    assert other["drifted"] and other["input_drift"]["features"]["bits_per_char_vs_length"]["statistic"] > 0.2
    assert re.search(r"bits/char \+0\.[23]\d at equal prompt length$", other["reasons"][0]), other["reasons"]
    # a clear but small shift (another passage of the same text) stays below min_bits_shift: not drift
    passage = drift.check(ref, window(np.zeros((500, 0)), text_rows(500, 1, harder=0.15), drift.TEXT_STATS), THRESHOLDS)
    assert passage["input_drift"]["p_value"] < 0.01 and not passage["drifted"]


# -- the thresholds ------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("p_value", 2, "monitor.p_value: Input should be less than 1"),
    ("window", 5, "monitor.window: Input should be greater than or equal to 20"),
    ("accuracy_drop", "much", "monitor.accuracy_drop: Input should be a valid number"),
    ("min_labelled", 0.5, "monitor.min_labelled: Input should be a valid integer"),
    ("min_bits_shift", -0.1, "monitor.min_bits_shift: Input should be greater than or equal to 0"),
    ("cooldown_s", 60, "monitor.cooldown_s: unknown key"),  # prefect.yaml's trigger holds the cooldown
    ("p_valu", 0.01, "monitor.p_valu: unknown key"),
])
def test_bad_thresholds_are_refused_naming_the_key(ref, key, value, message):
    probs, stats, _ = synthetic(300, seed=1)
    with pytest.raises(StageError, match=message):
        drift.check(ref, window(probs, stats), {**THRESHOLDS, key: value})


def test_a_missing_threshold_is_named(ref):
    with pytest.raises(StageError, match="monitor.min_labelled: missing"):
        drift.check(ref, window(*synthetic(300, seed=1)[:2]), {k: v for k, v in THRESHOLDS.items() if k != "min_labelled"})


def test_params_yaml_monitor_section_is_validated_with_the_file(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.thresholds(params.parse(raw).monitor) == raw["monitor"]
    raw["monitor"]["window"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(StageError, match=r"params.yaml: monitor.window: Input should be greater than or equal to 20"):
        params.load(tmp_path / "params.yaml")


def test_check_without_scipy_says_which_extra_to_install(ref, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # as in a core install without the monitor extra
    with pytest.raises(StageError, match=r"pip install 'ptpipe\[monitor\]'"):
        drift.check(ref, window(*synthetic(300, seed=1)[:2]), THRESHOLDS)
