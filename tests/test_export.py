"""Stages `export` and `validate`, and onnxruntime-only inference, on tiny seeded models.

The models are built untrained from the project's classes (random seeded weights, BatchNorm
statistics off their defaults) and saved the way the trainers save them; the data is a few
CIFAR-format images and the fixture text in the prepared layout.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from PIL import Image

from fixtures import CLASSES, ROOT, tool_env, write_models, write_prepared
from ptpipe import export, files, kinds, validate
from ptpipe.inference import ImageClassifier, TextGenerator, load_image
from ptpipe.stage import StageError


def make_workdir(root: Path, cnn_arch: str) -> Path:
    """A folder with params.yaml, data/prepared, models/*/model.pt and the exported files."""
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_prepared(root)
    write_models(root / "models", cnn_arch=cnn_arch)
    for model in MODELS:
        export.export(root / "models" / model, root / "params.yaml", revision="abc123")
    return root


MODELS = ("cnn", "lstm", "gpt")  # what fixtures.write_models writes (params.yaml's models)


def models_of(root: Path, *names: str) -> dict:
    """{name: (models/<name>, its prepared data)} as the validate stage and flow pass them (params.yaml's models)."""
    found = validate.workspace_models(root, root / "params.yaml")
    return {name: found[name] for name in names or found}


def validate_in(root: Path, *names: str, **kw) -> dict:
    return validate.validate_models(models_of(root, *names), params_file=root / "params.yaml", **kw)


def validate_stage(model: str, cwd: Path):
    """The validate stage's command as dvc.yaml runs it for models.<model>."""
    data_set = {"cnn": "cifar10"}.get(model, "alice")
    return run_module("-m", "ptpipe.validate", "--model-dir", f"models/{model}", "--data", f"data/prepared/{data_set}",
                      "--metrics", f"metrics/{model}/validate.json", "--report", f"reports/{model}/validate.json",
                      cwd=cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("export"), "lenet")


def test_airbench_with_batchnorm_exports_and_validates(tmp_path):
    root = make_workdir(tmp_path, "airbench")
    report = validate_in(root, "cnn", atol=1e-4)
    assert report["passed"] and 0 < max(report["max_abs_diff"]["cnn"].values()) <= 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(root / "models/cnn/model.onnx").metadata_props}
    assert meta["arch"] == "airbench" and meta["model_args"] == {"arch": "airbench", "widths": [8, 16, 16],
                                                                  "num_classes": 10, "image_size": 32}


def run_module(*args, cwd, check=False):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
                          timeout=300, check=check)


def test_onnx_files_pass_the_full_check_and_describe_themselves(workdir):
    for kind, inputs in (("cnn", ["images"]), ("lstm", ["ids", "h0", "c0"])):
        model = onnx.load(workdir / "models" / kind / "model.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] >= 17
        assert [i.name for i in model.graph.input] == inputs  # weights are initializers, not inputs
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        meta = {p.key: json.loads(p.value) for p in model.metadata_props}
        assert meta["ptpipe.kind"] == kind and meta["git_revision"] == "abc123"
        assert [i["name"] for i in meta["inputs"]] == inputs
        assert meta["source_md5"] == files.digest(workdir / "models" / kind / "model.pt", "md5")
    cnn_meta = {p.key: json.loads(p.value) for p in onnx.load(workdir / "models/cnn/model.onnx").metadata_props}
    assert cnn_meta["params"] == {"recipe": "default", "lr": 0.001, "tta": 0, "seed": 0}  # the saved config's
    assert cnn_meta["classes"] == CLASSES and cnn_meta["mean"] == [0.49, 0.48, 0.45]
    assert cnn_meta["ptpipe.task"] == "image-classification" and cnn_meta["image_size"] == 32
    assert cnn_meta["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, 32, 32]}]
    assert cnn_meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    lstm = onnx.load(workdir / "models/lstm/model.onnx")
    lstm_meta = {p.key: json.loads(p.value) for p in lstm.metadata_props}
    saved = torch.load(workdir / "models/lstm/model.pt", weights_only=True)["config"]
    assert lstm_meta["params"] == saved["params"] and lstm_meta["model_args"] == saved["model_args"]
    from ptpipe import data

    assert lstm_meta["data"] == {"name": "alice", "md5": data.digest(workdir / "data/prepared/alice")}  # its data set
    assert lstm_meta["ptpipe.task"] == "text-generation"
    assert lstm_meta["generation"] == {"mode": "recurrent", "state": [
        {"input": "h0", "output": "h", "shape": [2, "batch", 16]}, {"input": "c0", "output": "c", "shape": [2, "batch", 16]}]}
    assert lstm_meta["vocab"] == json.loads((workdir / "data/prepared/alice/vocab.json").read_text())["chars"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(lstm.graph.input) + list(lstm.graph.output)}
    assert dims["ids"] == ["batch", "seq"] and dims["logits"][:2] == ["batch", "seq"]
    assert dims["h0"] == [2, "batch", 16] and dims["c"] == [2, "batch", 16]
    # no stray sidecar or temporary files
    assert sorted(p.name for p in (workdir / "models/cnn").iterdir()) == ["model.onnx", "model.pt", "model.ts"]


def test_validate_passes_at_shapes_the_export_never_saw(workdir):
    # the export ran batch 2 (and length 5); these are all different
    report = validate_in(workdir, atol=1e-4)
    assert report["passed"] and set(report["max_abs_diff"]) == set(MODELS)
    assert set(report["cnn"]["onnxruntime"]) == {"batch=1", "batch=7", "batch=64"}
    assert len(report["lstm"]["onnxruntime"]) == 2 * 3 * 2  # batches x lengths x (zero, carried)
    for model in ("cnn", "lstm"):
        for backend in ("torchscript", "onnxruntime"):
            for diffs in report[model][backend].values():
                assert diffs["top1"] == 1.0
                assert all(v <= 1e-4 for k, v in diffs.items() if k != "top1")
    assert set(report["max_abs_diff"]["lstm"]) == {"torchscript", "onnxruntime"}
    assert 0 < max(report["max_abs_diff"]["lstm"].values()) <= 1e-4


def _perturb_onnx(path: Path, name_part: str, delta: float) -> None:
    """Add `delta` to one element of the first initializer whose name contains name_part."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if name_part in init.name and init.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(init).copy()
            array.flat[0] += delta
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            onnx.save(model, path)
            return
    raise AssertionError(f"no float initializer named like {name_part!r}: {[i.name for i in model.graph.initializer]}")


def test_perturbed_onnx_weight_fails_validate_naming_model_backend_shape_and_difference(workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    onnx_cnn = onnx.load(work / "models/cnn/model.onnx")
    weights = {i.name for i in onnx_cnn.graph.initializer}
    last = [name for node in onnx_cnn.graph.node for name in node.input if name in weights][-1]  # the head's
    _perturb_onnx(work / "models/cnn/model.onnx", last, 0.5)

    with pytest.raises(validate.ValidationFailed) as exc:
        validate_in(work, "cnn", atol=1e-4)
    message = str(exc.value)
    match = re.search(r"cnn onnxruntime batch=(\d+): max \|logits difference\| = ([0-9.e+-]+) > atol 0.0001", message)
    assert match, message
    report = exc.value.report
    assert report["passed"] is False
    assert float(match.group(2)) == pytest.approx(report["cnn"]["onnxruntime"][f"batch={match.group(1)}"]["logits"], rel=1e-2)
    assert all(d["logits"] <= 1e-4 for d in report["cnn"]["torchscript"].values())  # only the ONNX file is wrong
    assert report["cnn"]["onnxruntime"]["batch=64"]["logits"] > 1e-3

    # the stage: exit 2, the same one-line message, and no metrics file that looks like a pass
    (work / "metrics/cnn").mkdir(parents=True)
    (work / "metrics/cnn/validate.json").write_text('{"passed": true}')  # an earlier run's metric
    result = validate_stage("cnn", cwd=work)
    assert result.returncode == 2, result.stderr
    assert "error: exported model disagrees with PyTorch: cnn onnxruntime batch=1:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (work / "metrics/cnn/validate.json").exists()
    # the report says which cases failed (for the user to read)
    failed = json.loads((work / "reports/cnn/validate.json").read_text())
    assert failed["passed"] is False and any(not c["ok"] for c in failed["checks"])


def test_perturbed_lstm_names_the_state_and_carry(workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    model = onnx.load(work / "models/lstm/model.onnx")
    lstm_weight = next(i.name for i in model.graph.initializer
                       if len(numpy_helper.to_array(i).shape) == 3)  # an ONNX LSTM W/R/B tensor
    _perturb_onnx(work / "models/lstm/model.onnx", lstm_weight, 0.05)
    with pytest.raises(validate.ValidationFailed, match=r"lstm onnxruntime batch=1 seq=1 state=zero: max \|\w+ "
                                                        r"difference\| = [0-9.e-]+ > atol"):
        validate_in(work, "lstm", atol=1e-4)


def test_an_onnx_model_that_drops_the_carried_state_fails_only_carried_checks(workdir, monkeypatch):
    """Generation steps one character at a time from the returned state: ignoring h0/c0 must fail."""
    real = validate._onnx_runner

    def forgetful(session):
        run = real(session)  # always from zero state:
        return lambda feeds: run({**feeds, "h0": np.zeros_like(feeds["h0"]), "c0": np.zeros_like(feeds["c0"])})

    monkeypatch.setattr(validate, "_onnx_runner", forgetful)
    with pytest.raises(validate.ValidationFailed, match=r"lstm onnxruntime batch=1 seq=1 state=carried") as exc:
        validate_in(workdir, "lstm", atol=1e-4)
    onnx_rows = [c for c in exc.value.report["checks"] if c["backend"] == "onnxruntime"]
    assert all(c["ok"] == c["shape"].endswith("state=zero") for c in onnx_rows)  # exactly the carried ones fail


def test_validate_stage_writes_the_metric_and_export_stage_refuses_missing_models(workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    for model in MODELS:
        result = validate_stage(model, cwd=work)
        assert result.returncode == 0, result.stderr
        metric = json.loads((work / f"metrics/{model}/validate.json").read_text())
        assert metric["passed"] is True and set(metric["max_abs_diff"]) == {model}
        assert json.loads((work / f"reports/{model}/validate.json").read_text())["checks"]

    (work / "models/lstm/model.pt").unlink()
    (work / "models/lstm/model.onnx").unlink()
    result = run_module("-m", "ptpipe.export", "--model-dir", "models/lstm", "--data", "data/prepared/alice", cwd=work)
    assert result.returncode == 2
    assert "models/lstm/model.pt is missing: run `dvc repro train@lstm` first" in result.stderr
    assert not (work / "models/lstm/model.onnx").exists()
    assert [p.name for p in (work / "models/lstm").iterdir()] == ["model.ts"]  # no temporaries left


def test_export_stage_runs_from_params(workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    for f in work.glob("models/*/model.[ot]*"):
        f.unlink()
    text = (work / "params.yaml").read_text().replace("opset: 17", "opset: 18")
    (work / "params.yaml").write_text(text)
    for model, data_set in (("cnn", "cifar10"), ("lstm", "alice")):
        result = run_module("-m", "ptpipe.export", "--model-dir", f"models/{model}", "--data",
                            f"data/prepared/{data_set}", cwd=work)
        assert result.returncode == 0, result.stderr
    for kind in ("cnn", "lstm"):
        model = onnx.load(work / "models" / kind / "model.onnx")
        assert {o.domain: o.version for o in model.opset_import}[""] == 18
        assert "ptpipe.reference" in {p.key for p in model.metadata_props}  # the stage records the drift reference
        assert (work / "models" / kind / "model.ts").stat().st_size > 0
    before = (work / "models/cnn/model.onnx").read_bytes()
    (work / "params.yaml").write_text(text.replace("opset: 18", "opset: 12"))
    result = run_module("-m", "ptpipe.export", "--model-dir", "models/cnn", "--data", "data/prepared/cifar10", cwd=work)
    assert result.returncode == 2 and "export.opset" in result.stderr
    assert (work / "models/cnn/model.onnx").read_bytes() == before  # params checked before anything is written


NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_exported_files_run_in_a_fresh_process_with_onnxruntime_alone(workdir):
    script = NO_TORCH + """
import json, numpy as np
from ptpipe.inference import ImageClassifier, TextGenerator, open_model
cnn = open_model('models/cnn/model.onnx')
assert isinstance(cnn, ImageClassifier)
images = np.load('data/prepared/cifar10/test_images.npy')[:3]
lstm = open_model('models/lstm/model.onnx')
assert isinstance(lstm, TextGenerator)
h = np.zeros((2, 3, 16), np.float32)
out = lstm.run({'ids': np.zeros((3, 11), np.int64), 'h0': h, 'c0': h})
text = lstm.generate('Alice', 10, 0.8, 1)
assert 'torch' not in sys.modules and 'onnx' not in sys.modules
print(json.dumps({'cnn': cnn.logits(images).tolist(), 'lstm': out['logits'].shape, 'top': cnn.top_k(images, 2),
                  'text': text, 'streamed': ''.join(lstm.stream('Alice', 10, 0.8, 1))}))
"""
    result = run_module("-c", script, cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    _, eager, _ = kinds.load(workdir / "models/cnn/model.pt")
    images = torch.from_numpy(np.load(workdir / "data/prepared/cifar10/test_images.npy")[:3])
    with torch.no_grad():
        np.testing.assert_allclose(out["cnn"], eager(images).numpy(), atol=1e-5)
    assert out["lstm"] == [3, 11, len(TextGenerator(workdir / "models/lstm/model.onnx").vocab)]
    assert out["text"] == "Alice" + out["streamed"] and len(out["streamed"]) == 10
    assert all(label in CLASSES for row in out["top"] for label, _ in row)


def _write_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size, mode in (("wide.png", (53, 17), "RGB"), ("tall.jpg", (31, 480), "RGB"),
                             ("grey.jpeg", (100, 100), "L"), ("alpha.png", (7, 9), "RGBA")):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode).save(folder / name)
        paths.append(folder / name)
    return paths


def test_load_image_maps_any_size_and_mode_to_32x32_rgb(tmp_path):
    for path in _write_images(tmp_path):
        x = load_image(path)
        assert x.shape == (3, 32, 32) and x.dtype == np.uint8
    # a 32x32 image passes through unchanged (what CIFAR images are)
    cifar = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(cifar).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_image(tmp_path / "c.png"), cifar.transpose(2, 0, 1))
    (tmp_path / "fake.jpg").write_text("not an image")
    with pytest.raises(StageError, match="fake.jpg: not a readable image"):
        load_image(tmp_path / "fake.jpg")


def test_load_image_turns_an_image_upright_by_its_exif_orientation(tmp_path):
    # a phone photo stored sideways with Orientation 6 ("rotate 90 clockwise to view"): the 32 x 32
    # path that skips crop and resize must still turn it, like a larger image
    rng = np.random.default_rng(2)
    for size in (32, 64):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(pixels).save(tmp_path / f"side{size}.png", exif=exif)
        Image.fromarray(pixels).save(tmp_path / f"plain{size}.png")
        upright = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270).resize((32, 32), Image.BICUBIC)
        np.testing.assert_array_equal(load_image(tmp_path / f"side{size}.png"),
                                      np.asarray(upright).transpose(2, 0, 1))
        assert not np.array_equal(load_image(tmp_path / f"side{size}.png"), load_image(tmp_path / f"plain{size}.png"))


def test_load_image_scales_16_bit_grey_and_puts_transparency_on_white(tmp_path, monkeypatch):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # 16-bit grey, dark to light
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x = load_image(tmp_path / "deep.png")
    assert 100 < x.mean() < 155 and x.min() < 10  # scaled to 8 bits, not clipped to white
    hidden = np.zeros((32, 32, 4), np.uint8)
    hidden[..., 0] = 255  # red under alpha 0: a transparent image whose hidden colour is red
    Image.fromarray(hidden, "RGBA").save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()  # white, as it is displayed
    # an image over Pillow's size guard is refused for that file alone, not a traceback
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 > 2 x 100: a "decompression bomb"
    with pytest.raises(StageError, match="deep.png: image too large"):
        load_image(tmp_path / "deep.png")


def test_files_that_are_not_ours_are_one_line_errors(workdir, tmp_path):
    from onnx import TensorProto, helper

    from ptpipe import generate

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(other, {"author": "someone else"})  # not JSON
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(StageError, match=r"other.onnx is not a ptpipe model \(its metadata has no ptpipe.kind\)"):
        TextGenerator(tmp_path / "other.onnx")
    (tmp_path / "text.ts").write_text("not a TorchScript archive")
    with pytest.raises(StageError, match="text.ts: not a TorchScript file written by `ptpipe.export`"):
        generate.load_backend("torchscript", tmp_path / "text.ts")
    with pytest.raises(StageError, match=r"model.ts is a ptpipe cnn model for image-classification, not text"):
        generate.load_backend("torchscript", workdir / "models/cnn/model.ts")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    result = run_module("-m", "ptpipe.cli", "generate", "--prompt", "A", "--backend", "torch",
                        "--model", str(tmp_path / "text.pt"), cwd=tmp_path)
    assert result.returncode == 2 and "text.pt: not a model file written by a ptpipe train stage" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_cli_reports_bad_files_and_predicts_the_rest(workdir, tmp_path):
    images = _write_images(tmp_path / "img")
    bad = tmp_path / "img" / "notes.png"
    bad.write_text("this is text")
    args = [str(images[0]), str(bad), *map(str, images[1:]), "--model", str(workdir / "models/cnn/model.onnx")]
    result = run_module("-m", "ptpipe.cli", "predict", *args, "--json", "--top-k", "3", cwd=tmp_path)
    assert result.returncode == 1
    assert f"error: {bad}: not a readable image" in result.stderr
    out = json.loads(result.stdout)
    assert set(out["predictions"]) == set(map(str, images)) and set(out["errors"]) == {str(bad)}
    classifier = ImageClassifier(workdir / "models/cnn/model.onnx")
    for path in images:
        ranked = out["predictions"][str(path)]
        assert len(ranked) == 3 and ranked[0]["probability"] >= ranked[1]["probability"] >= ranked[2]["probability"]
        assert ranked[0]["label"] == classifier.top_k(load_image(path)[None], 1)[0][0][0]

    text = run_module("-m", "ptpipe.cli", "predict", str(images[1]), "--model",
                      str(workdir / "models/cnn/model.onnx"), cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"{images[1]}: ") and text.stdout.count("%") == 3

    missing = run_module("-m", "ptpipe.cli", "predict", str(images[0]), "--model", str(tmp_path / "nope.onnx"),
                         cwd=tmp_path)
    assert missing.returncode == 2 and "nope.onnx is missing" in missing.stderr


def test_thread_count_changes_speed_only(workdir, tmp_path):
    images = np.stack([load_image(p) for p in _write_images(tmp_path / "img")])
    path = workdir / "models/cnn/model.onnx"
    one, per_core = ImageClassifier(path, threads=1), ImageClassifier(path)  # default: one per core
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert per_core.session.get_session_options().intra_op_num_threads == 0
    np.testing.assert_allclose(one.logits(images), per_core.logits(images), rtol=0, atol=1e-5)
    bad = run_module("-m", "ptpipe.cli", "predict", "x.png", "--threads", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--threads must be 0 (one per core) or more, got -1" in bad.stderr


def test_generate_backends_give_the_same_text(workdir):
    from ptpipe import generate

    models = workdir / "models/lstm"
    for temperature in (0.0, 0.8):
        texts = {backend: generate.main("Alice was ", 120, temperature, 3, models / f"model.{ext}", backend)
                 for backend, ext in (("torch", "pt"), ("torchscript", "ts"), ("onnx", "onnx"))}
        assert len(set(texts.values())) == 1, texts
        assert texts["onnx"].startswith("Alice was ") and len(texts["onnx"]) == 130
    with pytest.raises(StageError, match="prompt characters not in the model's vocabulary: 'Z'"):
        generate.main("Zebra", 5, 0.8, 1, models / "model.onnx", "onnx")


def test_generate_cli_onnx_backend_runs_without_torch(workdir):
    script = NO_TORCH + """
from ptpipe import cli
code = cli.main(['generate', '--backend', 'onnx', '--prompt', 'Alice', '--length', '50', '--seed', '5',
                 '--model', 'models/lstm/model.onnx'])
assert 'torch' not in sys.modules, 'torch was imported'
sys.exit(code)
"""
    result = run_module("-c", script, cwd=workdir)
    assert result.returncode == 0, result.stderr
    ts = run_module("-m", "ptpipe.cli", "generate", "--backend", "torchscript", "--prompt", "Alice", "--length", "50",
                    "--seed", "5", "--model", "models/lstm/model.ts", cwd=workdir)
    assert ts.returncode == 0, ts.stderr
    assert result.stdout == ts.stdout and len(result.stdout.strip()) == 55


def test_predict_runs_without_torch(workdir, tmp_path):
    images = _write_images(tmp_path)
    script = NO_TORCH + f"""
from ptpipe import cli
code = cli.main(['predict', {str(images[0])!r}, {str(images[1])!r}, '--model', 'models/cnn/model.onnx'])
assert 'torch' not in sys.modules, 'torch was imported'
sys.exit(code)
"""
    result = run_module("-c", script, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 2


@pytest.mark.slow
def test_dvc_repro_through_export_and_validate_on_tiny_fixtures(server, tmp_path):
    """The real dvc CLI: download -> prepare -> train -> export -> validate; metrics show the report;
    a second repro runs nothing; the exported CNN predicts."""
    from fixtures import TINY_TRAINING, copy_project, serve_data, sh, write_params

    repo = copy_project(tmp_path / "repo")
    serve_data(server, repo)
    write_params(repo, **TINY_TRAINING)
    first = sh("dvc", "repro", "validate", cwd=repo)
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    for model in models:
        for stage in ("train", "export", "validate"):
            assert f"Running stage '{stage}@{model}'" in first.stdout
        metric = json.loads((repo / f"metrics/{model}/validate.json").read_text())
        assert metric["passed"] and set(metric["max_abs_diff"][model]) == {"torchscript", "onnxruntime"}
        assert json.loads((repo / f"reports/{model}/validate.json").read_text())["checks"]  # the per-case rows
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    columns = json.dumps(shown)
    assert "metrics/lstm/validate.json" in columns and "max_abs_diff" in columns
    assert "checks" not in columns and "seq=37" not in columns  # a few numbers, not the per-case table

    again = sh("dvc", "repro", "validate", cwd=repo)
    assert "Running stage" not in again.stdout
    # each model exports and validates on its own: a change to the LSTM's kind leaves the CNN's stages alone
    with open(repo / "src/ptpipe/kinds/lstm.py", "a") as f:
        f.write("# edited\n")
    changed = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    assert {"train@lstm", "export@lstm", "validate@lstm"} <= set(changed)
    for model in ("cnn", "gpt"):  # another kind's models (the gpt shares the LSTM's data, not its module)
        assert not {f"train@{model}", f"export@{model}", f"validate@{model}"} & set(changed), changed

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img)
    result = run_module("-m", "ptpipe.cli", "predict", str(img), "--json", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["predictions"][str(img)][0]["label"] in CLASSES
