"""Tiny data in the official formats, and a loopback HTTP server that can misbehave on purpose.

The tests never touch the internet or ../shared: they build a few hundred CIFAR-10-format
images (class-dependent colour patches, so a model can learn them) and a few KB of text,
and serve them from 127.0.0.1 so the real download code runs against a real socket.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import re
import shutil
import socketserver
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """n images N x 3072 uint8: noise plus a patch whose colour and place depend on the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    x = rng.integers(0, 80, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 5)
        colour = np.array([(c * 73) % 256, (c * 151) % 256, (c * 29 + 100) % 256], dtype=np.uint8)
        x[i, :, 4 + r * 14:14 + r * 14, 2 + col * 6:8 + col * 6] = colour[:, None, None]
    return x.reshape(n, 3072), labels.tolist()


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def cifar_archive(per_batch: int = 60, n_test: int = 100, seed: int = 0, extra=None) -> bytes:
    """A cifar-10-python.tar.gz with the official member names and pickled dicts (bytes keys)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for b in range(1, 6):
            data, labels = cifar_images(per_batch, seed + b)
            batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
                     b"filenames": [b"img%d.png" % i for i in range(per_batch)]}
            _tar_add(tar, f"cifar-10-batches-py/data_batch_{b}", pickle.dumps(batch, protocol=2))
        data, labels = cifar_images(n_test, seed + 100)
        _tar_add(tar, "cifar-10-batches-py/test_batch",
                 pickle.dumps({b"labels": labels, b"data": data, b"batch_label": b"testing batch"}, protocol=2))
        meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}
        _tar_add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        for name, payload in (extra or {}).items():
            _tar_add(tar, name, payload)
    return buf.getvalue()


ALICE_BODY = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having\r\n"
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it had\r\n"
    "no pictures or conversations in it, 'and what is the use of a book,' thought Alice\r\n"
    "'without pictures or conversations?'\r\n"
) * 30


def alice_text(markers: bool = True) -> bytes:
    body = ALICE_BODY
    if markers:
        body = ("The Project Gutenberg eBook of Alice's Adventures in Wonderland\r\n\r\n"
                "*** START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\r\n"
                + body + "*** END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\r\n"
                "Licence text that is not part of the book.\r\n")
    return body.encode("utf-8")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class FixtureServer:
    """Serves `files` (path -> bytes) on 127.0.0.1 with Range support and scripted faults.

    `fail(path, n, status)` answers the next n requests for path with that status;
    `drop(path, n, after)` sends only `after` bytes of the next n bodies, then closes the socket.
    `requests` records (path, Range header) of every request.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                fault = server.faults.get(self.path, [])
                action = fault.pop(0) if fault else None
                if isinstance(action, int):
                    self.send_error(action)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if isinstance(action, tuple):  # ("drop", after): cut the body short
                    self.wfile.write(part[:action[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url + path

    def fail(self, path: str, n: int, status: int = 503) -> None:
        self.faults.setdefault(path, []).extend([status] * n)

    def drop(self, path: str, n: int, after: int) -> None:
        self.faults.setdefault(path, []).extend([("drop", after)] * n)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_params(repo: Path, **overrides) -> None:
    """Set dotted keys in repo/params.yaml, e.g. write_params(repo, **{"datasets.cifar10.md5": "..."})
    (a missing section on the way is created: a new data set or model)."""
    path = repo / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def tool_env() -> dict:
    """The environment for dvc/python subprocesses: this interpreter's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def sh(*cmd, cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# What running the pipeline leaves in a workspace (dvc.lock, the stages' outputs, DVCLive's and the
# flows' records): never part of a test's project, so the tests pass in a used workspace as in a fresh
# clone. tests/test_pipeline.py checks that every output dvc.yaml declares falls under one of them.
PIPELINE_RESULTS = ("dvc.lock", "data/", "models/", "metrics/", "dvclive/", "plots/", "reports/", "incidents/")
KEPT_IN_RESULTS = ("data/README.md", "models/README.md")  # the folders' documentation is source


def project_files(source: Path = ROOT) -> list[str]:
    """The project's source files under `source` (tracked + untracked-not-ignored), pipeline results left out."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return [rel for rel in filter(None, listed)
            if rel in KEPT_IN_RESULTS or not any(rel == r or rel.startswith(r) for r in PIPELINE_RESULTS)]


def copy_project(dest: Path, source: Path = ROOT) -> Path:
    """A fresh git repo holding the project's source files (`project_files`), DVC initialised: the
    same project whether the workspace it comes from is a fresh clone or one where `dvc repro` ran."""
    for rel in project_files(source):
        src = source / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "project", cwd=dest)
    return dest


# -- dvc.yaml as DVC expands it (foreach over params.yaml's datasets and models) -----------------------

def load_params(root=ROOT) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _interpolate(text: str, key: str, item) -> str:
    text = text.replace("${key}", str(key))
    for field, value in (item.items() if isinstance(item, dict) else ()):
        text = text.replace("${item.%s}" % field, str(value))
    return text.replace("${item}", str(item))


def foreach_items(stage: dict, params: dict):
    """(key, item) pairs of a `foreach` stage: a list, a dict, or `${<params key>}` read from params.yaml."""
    items = stage["foreach"]
    if isinstance(items, str):
        match = re.fullmatch(r"\$\{([\w.]+)\}", items)
        assert match, f"foreach {items!r}: expected a list, a dict or ${{params key}}"
        items = params
        for part in match.group(1).split("."):
            items = items[part]
    return items.items() if isinstance(items, dict) else ((item, item) for item in items)


def expanded_stages(root=ROOT) -> dict[str, dict]:
    """dvc.yaml's stages with `foreach` expanded (list: ${item}; dict: ${key}, ${item.<field>}), as
    {name: (stage, the foreach group, its key)}."""
    params = load_params(root)
    out = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            out[name] = (stage, None, None)
            continue
        for key, item in foreach_items(stage, params):
            out[f"{name}@{key}"] = (yaml.safe_load(_interpolate(yaml.safe_dump(stage["do"]), key, item)), name, key)
    return out


# Params overrides that make the training stages take seconds on the tiny fixtures (write_params).
TINY_TRAINING = {
    "recipes.cnn.default.epochs": 1, "recipes.cnn.default.model_args": {"widths": [8, 16, 16], "scale": 0.5},
    "recipes.cnn.default.tta": 0,
    "recipes.lstm.default.epochs": 1, "recipes.lstm.default.hidden_size": 32,
    "recipes.lstm.default.embedding_size": 32, "recipes.lstm.default.batch_size": 4,
    "recipes.lstm.default.seq_len": 20, "recipes.lstm.default.eval_streams": 2, "evaluate.sample.length": 20,
    "recipes.gpt.default.epochs": 1, "recipes.gpt.default.steps_per_epoch": 2, "recipes.gpt.default.n_layer": 1,
    "recipes.gpt.default.n_head": 2, "recipes.gpt.default.n_embd": 16,
    "recipes.gpt.default.batch_size": 4,  # block_size stays 128: validate.shapes.gpt.seq goes up to it
}


def recipe_keys(kind: str, recipe: str = "default", **values) -> dict:
    """{"recipes.<kind>.<recipe>.<key>": value}: dotted keys for write_params."""
    return {f"recipes.{kind}.{recipe}.{key}": value for key, value in values.items()}


def write_tiny_params(root: Path, **overrides) -> Path:
    """root/params.yaml: the project's own params.yaml shrunk ONCE for tests (TINY_TRAINING), on the CPU, every
    recipe at 1 thread (a 2-thread op on a busy 2-core machine waits for the descheduled thread: 4-10x slower),
    then `overrides` (dotted keys, as write_params). The `tiny_params` fixture (conftest.py) is this in tmp_path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    recipes = yaml.safe_load(path.read_text())["recipes"]
    threads = {f"recipes.{kind}.{name}.threads": 1 for kind, named in recipes.items() for name in named}
    write_params(root, **{**TINY_TRAINING, **threads, "train.device": "cpu", **overrides})
    return path


def stage_paths(root: Path, name: str) -> dict:
    """The train stage's paths of model `name` under root, as dvc.yaml's `train@<name>` passes them."""
    data = yaml.safe_load((root / "params.yaml").read_text())["models"][name]["data"]
    return {"data_dir": root / PREPARED / data, "model_path": root / "models" / name / "model.pt",
            "live_dir": root / "dvclive" / name, "metrics_path": root / "metrics" / name / "train.json"}


def train_model(root: Path, name: str, **paths):
    """ptpipe.train.train of model `name` with root's params.yaml and paths (stage_paths, `paths` replacing
    some: live_dir=None / metrics_path=None write none), no progress bar: the stage, in-process."""
    from ptpipe import train

    return train.train(name, **{**stage_paths(root, name), **paths}, params_file=root / "params.yaml",
                       progress=False)


def train_command(root: Path, name: str) -> list[str]:
    """The train stage's command line (dvc.yaml's cmd) for model `name`, relative to root (run it with cwd=root)."""
    paths = {k: str(v.relative_to(root)) for k, v in stage_paths(root, name).items()}
    return [sys.executable, "-m", "ptpipe.train", name, "--data", paths["data_dir"], "--model", paths["model_path"],
            "--live", paths["live_dir"], "--metrics", paths["metrics_path"]]


def evaluate_model(root: Path, name: str, model_path: Path | None = None) -> dict:
    """ptpipe.evaluate.evaluate of model `name` under root, with dvc.yaml's evaluate@<name> paths."""
    from ptpipe import evaluate

    paths = stage_paths(root, name)
    return evaluate.evaluate(paths["data_dir"], model_path or paths["model_path"],
                             root / "metrics" / name / "evaluate.json", root / "reports" / name / "evaluate",
                             root / "params.yaml")


def serve_data(server: FixtureServer, repo: Path, **archive_kwargs) -> None:
    """Put tiny CIFAR + Alice on the server and point repo's params.yaml at them."""
    cifar = cifar_archive(**archive_kwargs)
    text = alice_text()
    write_params(repo, **{
        "datasets.cifar10.url": server.add("/cifar-10-python.tar.gz", cifar),
        "datasets.cifar10.md5": md5(cifar),
        "datasets.alice.url": server.add("/pg11.txt", text),
        "datasets.alice.md5": md5(text),
        "datasets.cifar10.val_size": 50,
    })


# -- tiny trained-model files, for export / validate / inference tests --------------------------

PREPARED = Path("data/prepared")


def write_prepared_cifar(root: Path, n_train: int = 600, n_val: int = 200, n_test: int = 200) -> Path:
    """The `prepare` stage's CIFAR layout (ptpipe.data) under `root`, written directly:
    `cifar_images` (class-dependent colour patches on noise), card with the train split's mean/std."""
    import json

    out = root / PREPARED / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        x, y = cifar_images(n, seed)
        np.save(out / f"{split}_images.npy", x.reshape(n, 3, 32, 32))
        np.save(out / f"{split}_labels.npy", np.asarray(y, dtype=np.uint8))
    x = np.load(out / "train_images.npy") / 255
    (out / "card.json").write_text(json.dumps({
        "classes": CLASSES, "image_size": 32, "mean": x.mean(axis=(0, 2, 3)).tolist(),
        "std": x.std(axis=(0, 2, 3)).tolist()}))
    return out


def write_prepared_text(root: Path, text: str, val_fraction: float = 0.1) -> Path:
    """The `prepare` stage's text layout (ptpipe.data) under `root` for `text`: sorted vocabulary,
    uint8 ids, the last `val_fraction` for validation, unigram stats."""
    import json

    out = root / PREPARED / "alice"
    out.mkdir(parents=True, exist_ok=True)
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text], dtype=np.uint8)
    n_val = int(len(ids) * val_fraction)
    np.save(out / "train_ids.npy", ids[:-n_val])
    np.save(out / "val_ids.npy", ids[-n_val:])
    (out / "vocab.json").write_text(json.dumps({"chars": vocab}), encoding="utf-8")
    p = np.bincount(ids[:-n_val], minlength=len(vocab)) / (len(ids) - n_val)
    (out / "stats.json").write_text(json.dumps({
        "unigram_bits_per_char": float(-(p[p > 0] * np.log2(p[p > 0])).sum()),
        "unigram_val_bits_per_char": float(-np.log2(p[ids[-n_val:]]).mean())}))
    return out


def write_prepared(root: Path, n_images: int = 64) -> Path:
    """Both prepared data sets under `root`: `n_images` CIFAR-format images per split and the Alice
    excerpt (enough for the export / validate / inference tests)."""
    write_prepared_cifar(root, n_images, n_images, n_images)
    write_prepared_text(root, ALICE_BODY.replace("\r\n", "\n"))
    return root / PREPARED


def write_models(models_dir: Path, cnn_arch: str = "lenet", seed: int = 0) -> Path:
    """models/{cnn,lstm,gpt}/model.pt as the train stage saves them ({state_dict, config} in the shape of
    ptpipe.kinds), untrained but with random (seeded) weights, and BatchNorm statistics moved off
    their defaults. They record the data sets of `write_prepared` (under models_dir's parent, when it
    has them: name and md5, so validate and evaluate accept that data)."""
    import torch

    from ptpipe import data

    def data_facts(name: str) -> dict:
        prepared = models_dir.parent / PREPARED / name
        return {"name": name, **({"md5": data.digest(prepared)} if prepared.is_dir() else {})}

    from ptpipe.kinds.cnn import build_model as build_cnn
    from ptpipe.kinds.gpt import CharGPT, init_weights
    from ptpipe.kinds.lstm import build_model as build_lstm

    torch.manual_seed(seed)
    model_args = {"lenet": {}, "airbench": {"widths": [8, 16, 16]}}[cnn_arch]
    model_args.update(num_classes=len(CLASSES), image_size=32)  # as the train stage saves them
    cnn = build_cnn(cnn_arch, **model_args)
    for module in cnn.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    (models_dir / "cnn").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": cnn.state_dict(), "config": {
        "kind": "cnn", "model_args": {"arch": cnn_arch, **model_args},
        "params": {"recipe": "default", "lr": 0.001, "tta": 0, "seed": seed},
        "data": {**data_facts("cifar10"), "classes": CLASSES, "mean": [0.49, 0.48, 0.45],
                 "std": [0.25, 0.24, 0.26]}}},
        models_dir / "cnn" / "model.pt")
    vocab = sorted(set(ALICE_BODY.replace("\r\n", "\n")))
    lstm_args = dict(vocab_size=len(vocab), embedding_size=16, hidden_size=16, num_layers=2,
                     dropout=0.1, tie_weights=True)
    lstm = build_lstm(**lstm_args)
    (models_dir / "lstm").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": lstm.state_dict(), "config": {
        "kind": "lstm", "model_args": lstm_args, "params": {"seed": seed, "eval_streams": 2, "seq_len": 20},
        "data": {**data_facts("alice"), "vocab": vocab}}},
        models_dir / "lstm" / "model.pt")
    gpt_args = dict(vocab_size=len(vocab), block_size=128, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    gpt = CharGPT(**gpt_args)
    init_weights(gpt, 0.1)
    (models_dir / "gpt").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": gpt.state_dict(), "config": {
        "kind": "gpt", "model_args": gpt_args, "params": {"seed": seed, "eval_stride": 64},
        "data": {**data_facts("alice"), "vocab": vocab}}},
        models_dir / "gpt" / "model.pt")
    return models_dir


def model_registry(repo: Path, remote: Path, versions: list[tuple[str, Path, dict]],
                   name: str = "tiny-cnn", model: str = "cnn", kind: str = "cnn", data: str = "cifar10") -> Path:
    """A small git + DVC project that releases artifact `name` (folder models/<model>) once per
    (version, onnx file, metrics/<model>/evaluate.json content): a `publish` stage copies the committed
    candidate/model.onnx to models/<model>/model.onnx, pushed to the local `remote` by ptpipe.registry.release.
    Its params.yaml names the model (models.<model>: kind, data set): the promote flow reads the metric
    that kind declares from the model's evaluate file."""
    from ptpipe import registry

    repo.mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "storage", str(remote), cwd=repo)
    (repo / "params.yaml").write_text(yaml.safe_dump({"models": {model: {"kind": kind, "data": data,
                                                                        "recipe": "default"}}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"publish": {"cmd": f"mkdir -p models/{model} && cp candidate/model.onnx models/{model}/model.onnx",
                               "deps": ["candidate/model.onnx"], "outs": [f"models/{model}/model.onnx"]}},
        "artifacts": {name: {"path": f"models/{model}", "type": "model"}}}))
    for version, onnx_file, metrics in versions:
        add_candidate(repo, onnx_file, metrics, model)
        registry.release(name, version, repo=repo)
    return repo


def add_candidate(repo: Path, onnx_file: Path, metrics: dict, model: str = "cnn") -> None:
    """Commit a new model (and its metrics/<model>/evaluate.json) in a `model_registry` repo, reproduced but
    not released."""
    (repo / "candidate").mkdir(exist_ok=True)
    shutil.copy(onnx_file, repo / "candidate" / "model.onnx")
    (repo / "metrics" / model).mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / model / "evaluate.json").write_text(json.dumps(metrics))
    sh("dvc", "repro", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", f"candidate {onnx_file.parent.name}", cwd=repo)
