"""The model-kind interface (ptpipe.kinds): a kind defined here, in the test suite, goes through export,
validate and inference with no edit to those modules; unknown kinds, foreign and stale files are
one-line errors from every command; exports are byte-reproducible."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
import torch
from onnx import TensorProto, helper
from torch import nn

from fixtures import ROOT, tool_env, write_models, write_prepared
from ptpipe import export, files, generate, inference, kinds, validate
from ptpipe.data import load_text
from ptpipe.stage import StageError


# -- a third kind, defined here: a windowed character model (the "window" generation mode) -------

class Bigram(nn.Module):
    """ids [B, T] -> logits [B, T, V]: each position sees its own character and its predecessor."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(2 * width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        before = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return self.head(torch.cat([x, before], dim=-1))


def _cases(config, prepared_dir, shapes):
    _, val, _ = load_text(prepared_dir)
    out = []
    for b in kinds.shape_params(shapes, "bigram", "batch"):
        for t in kinds.shape_params(shapes, "bigram", "seq"):
            ids = np.resize(val.numpy(), b * t).reshape(b, t).astype(np.int64)
            out.append(kinds.Case(f"batch={b} seq={t}", [{"ids": ids}]))
    return out


BIGRAM = kinds.ModelKind(
    name="bigram", task="text-generation", formats=("text",),
    inputs=(kinds.TensorSpec("ids", "int64", ("batch", "seq")),),
    outputs=(kinds.TensorSpec("logits", "float32", ("batch", "seq", "vocab_size")),),
    build=lambda config: Bigram(**config["model_args"]),
    example_inputs=lambda model, config: (torch.zeros(2, 5, dtype=torch.int64),),
    metadata=lambda config: {"vocab": config["data"]["vocab"], "generation": {"mode": "window", "block_size": 6}},
    validation_cases=_cases,
)


def add_bigram(mp: pytest.MonkeyPatch) -> None:
    """Make `bigram` a known kind in this process, as the tests of the kinds interface do: KINDS and get."""
    real_get = kinds.get
    mp.setattr(kinds, "KINDS", (*kinds.KINDS, "bigram"))
    mp.setattr(kinds, "get", lambda name, where="the request": BIGRAM if name == "bigram" else real_get(name, where))


@pytest.fixture
def bigram(monkeypatch):
    add_bigram(monkeypatch)


PROJECT_KINDS = kinds.KINDS  # what a fresh process knows (the package's own kinds)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Prepared data, the project's three models and a bigram model, all exported."""
    from ptpipe import data

    root = tmp_path_factory.mktemp("kinds")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_prepared(root)
    write_models(root / "models")
    vocab = json.loads((root / "data/prepared/alice/vocab.json").read_text())["chars"]
    torch.manual_seed(0)
    config = {"kind": "bigram", "model_args": {"vocab_size": len(vocab), "width": 8}, "params": {"seed": 0},
              "data": {"name": "alice", "md5": data.digest(root / "data/prepared/alice"), "vocab": vocab}}
    (root / "models/bigram").mkdir()
    files.save_torch(root / "models/bigram/model.pt", {"state_dict": Bigram(len(vocab), 8).state_dict(),
                                                      "config": config})
    with pytest.MonkeyPatch.context() as mp:
        add_bigram(mp)
        for model in (*PROJECT_KINDS, "bigram"):
            export.export(root / "models" / model, root / "params.yaml", revision="abc")
    return root


def test_a_kind_from_the_test_suite_exports_validates_and_generates_on_every_backend(work, bigram):
    meta = inference.read_metadata(inference.open_session(work / "models/bigram/model.onnx"))
    assert meta["ptpipe.kind"] == "bigram" and meta["generation"]["mode"] == "window"
    assert meta["outputs"][0]["shape"] == ["batch", "seq", meta["model_args"]["vocab_size"]]  # fixed from model_args
    report = validate.validate_models({"bigram": (work / "models/bigram", work / "data/prepared/alice")}, atol=1e-4,
                                      shapes={"bigram": {"batch": [1, 3], "seq": [1, 9]}})
    assert report["passed"] and {c["shape"] for c in report["checks"]} == {
        "batch=1 seq=1", "batch=1 seq=9", "batch=3 seq=1", "batch=3 seq=9"}
    model = inference.open_model(work / "models/bigram/model.onnx")
    assert isinstance(model, inference.TextGenerator)
    texts = {backend: generate.main("Alice was", 30, 0.8, 3, work / "models/bigram" / f"model.{ext}", backend)
             for backend, ext in (("torch", "pt"), ("torchscript", "ts"), ("onnx", "onnx"))}
    assert len(set(texts.values())) == 1 and texts["onnx"] == model.generate("Alice was", 30, 0.8, 3)
    assert len(texts["onnx"]) == len("Alice was") + 30  # the prompt (9) is longer than block_size (6)


def test_the_shared_modules_have_no_kind_branches():
    """No `kind == "cnn"`-style branch outside the kind modules: a new kind must not fall into one."""
    shared = ("export", "validate", "evaluate", "train", "data", "prepare", "download", "generate", "inference", "cli",
              "registry", "pipeline", "serve", "served")
    for path in [ROOT / "src/ptpipe" / f"{name}.py" for name in shared] + sorted(ROOT.glob("flows/*.py")):
        text, name = path.read_text(), path.name
        for kind in kinds.KINDS:
            assert f'== "{kind}"' not in text and f"== '{kind}'" not in text, (name, kind)


def test_validate_shapes_of_an_unknown_kind_are_refused_naming_the_key(tmp_path):
    from ptpipe import params

    data = yaml.safe_load((ROOT / "params.yaml").read_text())  # as data: `dvc exp run -S` reformats the file
    shapes = data["validate"]["shapes"]
    shapes["lstn"] = shapes.pop("lstm")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    known = ", ".join(kinds.KINDS)
    with pytest.raises(StageError, match=rf"validate.shapes: unknown model kind 'lstn' \(known kinds are {known}\)"):
        params.load(tmp_path / "params.yaml")


def test_a_model_of_an_unknown_kind_in_params_is_refused_naming_its_key(tmp_path):
    from fixtures import write_params
    from ptpipe import params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_params(tmp_path, **{"models.mine": {"kind": "resnet", "data": "cifar10", "recipe": "default"}})
    with pytest.raises(StageError, match=r"params.yaml: models.mine.kind: unknown model kind 'resnet' "
                                         rf"\(known kinds are {', '.join(kinds.KINDS)}\)"):
        params.load(tmp_path / "params.yaml")


# -- one-line errors from the commands --------------------------------------------------------------

def run_module(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
                          timeout=300)


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def validate_stage(model, data_set, cwd, metrics=None, report=None):
    """The validate stage's command as dvc.yaml runs it for models.<model> (data set `data_set`)."""
    return run_module("-m", "ptpipe.validate", "--model-dir", f"models/{model}", "--data", f"data/prepared/{data_set}",
                      "--metrics", metrics or f"metrics/{model}/validate.json",
                      "--report", report or f"reports/{model}/validate.json", cwd=cwd)


def _with_meta(src: Path, dest: Path, **changes) -> None:
    model = onnx.load(src)
    for entry in model.metadata_props:
        if entry.key in changes:
            entry.value = json.dumps(changes[entry.key])
    onnx.save(model, dest)


@pytest.fixture
def copy(work, tmp_path):
    shutil.copytree(work / "models", tmp_path / "models", ignore=shutil.ignore_patterns("bigram"))
    shutil.copytree(work / "data", tmp_path / "data")
    shutil.copy(work / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_an_unknown_kind_is_a_one_line_error_from_export_validate_generate_and_predict(copy, tmp_path):
    saved = torch.load(copy / "models/lstm/model.pt", weights_only=True)
    saved["config"]["kind"] = "mystery"
    torch.save(saved, copy / "models/lstm/model.pt")
    known = f"known kinds are {', '.join(PROJECT_KINDS)}"  # what a fresh process knows
    one_line_error(run_module("-m", "ptpipe.export", "--model-dir", "models/lstm", "--data", "data/prepared/alice", cwd=copy),
                   "unknown model kind 'mystery'", "models/lstm/model.pt", known)
    one_line_error(run_module("-m", "ptpipe.export", "--model-dir", "models/nope", "--data", "data/prepared/alice", cwd=copy),
                   "models/nope/model.pt is missing: run `dvc repro train@nope` first")
    one_line_error(validate_stage("lstm", "alice", cwd=copy), "unknown model kind 'mystery'", known)
    one_line_error(run_module("-m", "ptpipe.cli", "generate", "--prompt", "A", "--backend", "torch",
                              "--model", "models/lstm/model.pt", cwd=copy), "unknown model kind 'mystery'", known)
    # exported files naming an unknown kind
    _with_meta(copy / "models/lstm/model.onnx", tmp_path / "mystery_lstm.onnx", **{"ptpipe.kind": "mystery"})
    _with_meta(copy / "models/cnn/model.onnx", tmp_path / "mystery_cnn.onnx", **{"ptpipe.kind": "mystery"})
    one_line_error(run_module("-m", "ptpipe.cli", "generate", "--prompt", "A", "--backend", "onnx",
                              "--model", str(tmp_path / "mystery_lstm.onnx"), cwd=copy),
                   "unknown model kind 'mystery' in", known)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    one_line_error(run_module("-m", "ptpipe.cli", "predict", str(tmp_path / "x.png"),
                              "--model", str(tmp_path / "mystery_cnn.onnx"), cwd=copy),
                   "unknown model kind 'mystery' in", known)


def test_validate_refuses_foreign_onnx_files_before_running_and_removes_the_old_metric(copy):
    """Issue 16.1 and 16.2: an identity graph from another tool, the CNN's file copied into models/lstm,
    and a truncated file are one-line errors (exit 2), and an earlier passing metric is removed."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    identity = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    good = (copy / "models/lstm/model.onnx").read_bytes()
    metric = copy / "metrics/lstm/validate.json"
    cases = {
        "identity": (identity.SerializeToString(), "models/lstm/model.onnx is not a ptpipe model"),
        "cnn file": ((copy / "models/cnn/model.onnx").read_bytes(),
                     "models/lstm/model.onnx is not a ptpipe lstm model (its metadata says 'cnn')"),
        "truncated": (good[: len(good) // 2], "models/lstm/model.onnx: onnxruntime cannot load it"),
    }
    for name, (payload, message) in cases.items():
        metric.parent.mkdir(parents=True, exist_ok=True)
        metric.write_text('{"passed": true}')  # an earlier run's metric
        (copy / "models/lstm/model.onnx").write_bytes(payload)
        one_line_error(validate_stage("lstm", "alice", cwd=copy), message)
        assert not metric.exists(), name
    # a graph with the right kind in its metadata but other inputs than the kind's
    (copy / "models/lstm/model.onnx").write_bytes(good)
    model = onnx.load(copy / "models/lstm/model.onnx")
    model.graph.input[0].name = "tokens"
    for node in model.graph.node:
        node.input[:] = ["tokens" if i == "ids" else i for i in node.input]
    onnx.save(model, copy / "models/lstm/model.onnx")
    one_line_error(validate_stage("lstm", "alice", cwd=copy), "its graph takes tokens int64",
                   "its kind expects ids int64")


def test_validate_writes_a_small_metric_and_the_per_case_report_apart(copy):
    """Issue 16.5: `dvc metrics show` gets a few numbers; the per-case rows go to the report file."""
    rows = {}
    for model, data_set in (("cnn", "cifar10"), ("lstm", "alice")):
        result = validate_stage(model, data_set, cwd=copy, metrics=f"m/{model}.json", report=f"r/{model}/v.json")
        assert result.returncode == 0, result.stderr
        metric = json.loads((copy / f"m/{model}.json").read_text())
        assert set(metric) == {"passed", "atol", "max_abs_diff"} and metric["passed"] is True
        assert set(metric["max_abs_diff"]) == {model}  # one model per stage
        assert set(metric["max_abs_diff"][model]) == {"torchscript", "onnxruntime"}
        report = json.loads((copy / f"r/{model}/v.json").read_text())
        rows[model] = report["checks"]
        assert {c["model"] for c in report["checks"]} == {model}
    assert {m: len(r) for m, r in rows.items()} == {"cnn": 2 * 3, "lstm": 2 * 2 * 3 * 2}
    assert "batch=5 seq=37 state=carried" in {c["shape"] for c in rows["lstm"]}


def test_exports_are_byte_reproducible(copy, tmp_path):
    """Issue 16.3: the same model.pt exported twice (other folders) gives the same model.ts and model.onnx."""
    other = tmp_path / "other"
    shutil.copytree(copy / "models/lstm", other)
    export.export(other, copy / "params.yaml", revision="abc")
    for name in ("model.ts", "model.onnx"):
        assert files.digest(other / name, "md5") == files.digest(copy / "models/lstm" / name, "md5"), name
    saved = torch.load(copy / "models/cnn/model.pt", weights_only=True)
    files.save_torch(tmp_path / "a/model.pt", saved)
    files.save_torch(tmp_path / "b/model.pt", saved)
    assert files.digest(tmp_path / "a/model.pt", "md5") == files.digest(tmp_path / "b/model.pt", "md5")


def test_an_export_older_than_its_model_file_is_refused(copy, tmp_path):
    """Issue 16.4: after retraining (model.pt changed) the old export is refused, naming `dvc repro export`."""
    saved = torch.load(copy / "models/lstm/model.pt", weights_only=True)
    saved["state_dict"]["decoder.bias"] += 1.0
    torch.save(saved, copy / "models/lstm/model.pt")
    for backend, ext in (("onnx", "onnx"), ("torchscript", "ts")):
        one_line_error(run_module("-m", "ptpipe.cli", "generate", "--prompt", "A", "--backend", backend,
                                  "--model", "lstm", cwd=copy),
                       f"models/lstm/model.{ext} is stale", "run `dvc repro export`")
    assert run_module("-m", "ptpipe.cli", "generate", "--prompt", "A", "--length", "5", "--backend", "torch",
                      cwd=copy).returncode == 0  # eager reads model.pt itself
    saved = torch.load(copy / "models/cnn/model.pt", weights_only=True)
    saved["config"]["params"]["retrained"] = True
    torch.save(saved, copy / "models/cnn/model.pt")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    one_line_error(run_module("-m", "ptpipe.cli", "predict", str(tmp_path / "x.png"), cwd=copy),
                   "models/cnn/model.onnx is stale", "run `dvc repro export`")
    one_line_error(validate_stage("cnn", "cifar10", cwd=copy), "models/cnn/model.onnx is stale")
    # a file on its own (deployed, fetched from the registry) has nothing to compare with: it runs
    shutil.copy(copy / "models/cnn/model.onnx", tmp_path / "model.onnx")
    assert inference.open_model(tmp_path / "model.onnx").kind == "cnn"


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "A", "--length", "-5"], "--length must be 0 or more, got -5"),
    (["predict", "x.png", "--top-k", "0"], "--top-k must be 1 or more, got 0"),
    (["predict", "x.png", "--top-k", "-2"], "--top-k must be 1 or more, got -2"),
])
def test_negative_length_and_top_k_are_argparse_errors(args, message, tmp_path):
    """Issue 16.10: before, --length -5 printed the prompt (exit 0) and --top-k 0 silently became 1."""
    result = run_module("-m", "ptpipe.cli", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
