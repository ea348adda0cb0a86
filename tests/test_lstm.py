"""The character LSTM: it learns, its state carry is right, generation is seeded, resume and errors work."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures import (evaluate_model, recipe_keys, tool_env, train_command, train_model, write_params,
                      write_prepared_text, write_tiny_params)
from ptpipe import cli, files, generate, params, train
from ptpipe.kinds import lstm
from ptpipe.kinds.lstm import batchify, build_model, load_model, stream_loss
from ptpipe.stage import StageError

REPO = Path(__file__).resolve().parents[1]
PHRASE = "the quick brown fox jumps over the lazy dog. "

# what these tests train: a small model that learns a repeated sentence (on top of the tiny params)
LEARN = dict(embedding_size=32, hidden_size=32, num_layers=1, dropout=0.0, tie_weights=True, seq_len=16,
             batch_size=4, epochs=30, clip=1.0, lr=0.02, optimizer="adam", weight_decay=0.0, schedule="cosine",
             patience=None, seed=0, threads=1, eval_streams=2)
SAMPLE = {"prompt": "the", "length": 40, "seed": 1, "temperatures": [0.0, 1.0]}


def lstm_params(root: Path, **recipe) -> Path:
    """root/params.yaml: the tiny params, models.lstm's recipe = LEARN + `recipe`, evaluate.sample = SAMPLE."""
    path = write_tiny_params(root, **{"evaluate.sample": SAMPLE})
    write_params(root, **recipe_keys("lstm", **{**LEARN, **recipe}))
    return path


def run_stage(root: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(root, "lstm"), cwd=root, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (in-process, through the real stage) on a repeated sentence."""
    root = tmp_path_factory.mktemp("repetitive")
    write_prepared_text(root, PHRASE * 40)
    lstm_params(root)
    torch.set_num_threads(2)  # the stage must set its own (threads: 1 in LEARN)
    result = train_model(root, "lstm")
    return root, result, torch.get_num_threads()


def test_learns_repetitive_text_to_near_zero_loss(trained):
    root, result, threads_after = trained
    assert result.history[-1]["train/loss"] < 0.05
    assert result.best["val/bits_per_char"] < 0.1
    assert (root / "models/lstm/model.pt").exists()
    assert not (root / "models/lstm/checkpoint.pt").exists()
    logged = json.loads((root / "dvclive/lstm/metrics.json").read_text())
    assert {"train", "val"} <= logged.keys() and "bits_per_char" in logged["val"]
    final = json.loads((root / "metrics/lstm/train.json").read_text())
    assert final["val_bits_per_char"] == result.best["val/bits_per_char"] and final["epochs_run"] == 30
    assert threads_after == 1  # recipes.lstm.default.threads


def test_model_file_loads_with_weights_only_and_rebuilds_without_params(trained):
    root, _, _ = trained
    saved = torch.load(root / "models/lstm/model.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["kind"] == "lstm" and saved["config"]["data"]["vocab"] == sorted(set(PHRASE))
    model = build_model(**saved["config"]["model_args"])
    model.load_state_dict(saved["state_dict"])
    assert model.decoder.weight is model.embed.weight  # tie_weights survives the round trip


def test_greedy_generation_reproduces_the_repetitive_text(trained):
    root, _, _ = trained
    model, config = load_model(root / "models/lstm/model.pt")
    text = generate.generate(model, config, "the quick", 3 * len(PHRASE), temperature=0.0, seed=0)
    expected = (PHRASE * 5)[: len(text)]
    assert text == expected


def test_generation_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    vocab = list("abcdefgh ")
    args = dict(vocab_size=len(vocab), embedding_size=16, hidden_size=16, num_layers=2, dropout=0.0, tie_weights=True)
    model = build_model(**args).eval()
    config = {"kind": "lstm", "model_args": args, "params": {}, "data": {"vocab": vocab}}
    a = generate.generate(model, config, "abc", 200, temperature=1.0, seed=7)
    b = generate.generate(model, config, "abc", 200, temperature=1.0, seed=7)
    c = generate.generate(model, config, "abc", 200, temperature=1.0, seed=8)
    assert a == b and a != c and len(a) == 203


def test_streaming_evaluation_with_carried_state_equals_one_pass():
    torch.manual_seed(0)
    model = build_model(11, 8, 12, 2, 0.5, False).eval()  # eval: dropout off
    ids = torch.randint(0, 11, (301,))
    for streams in (1, 3):
        rows = batchify(ids, streams)  # [streams, n]
        with torch.no_grad():
            logits, _, _ = model(rows[:, :-1], *model.init_state(streams))
        whole = F.cross_entropy(logits.reshape(-1, 11), rows[:, 1:].reshape(-1), reduction="sum").item()
        for seq_len in (1, 7, 1000):
            nats, n = stream_loss(model, ids, streams, seq_len)
            assert n == rows[:, 1:].numel()
            assert nats == pytest.approx(whole, rel=1e-5)
    # Without the carry (state reset every window) the loss is different: the check has teeth.
    h0, c0 = model.init_state(1)
    with torch.no_grad():
        reset = sum(F.cross_entropy(model(ids[i:i + 7][None], h0, c0)[0][0], ids[i + 1:i + 8], reduction="sum").item()
                    for i in range(0, 294, 7))
    assert reset != pytest.approx(stream_loss(model, ids[:295], 1, 7)[0], rel=1e-5)


def test_tbptt_carries_the_detached_state_from_window_to_window_within_an_epoch(tmp_path):
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path)
    p = params.load(tmp_path / "params.yaml")
    t = lstm.training(p.recipe("lstm"), tmp_path / "data/prepared/alice", torch.device("cpu"), train.Distributed(),
                      key="recipes.lstm.default", default_lr=p.lr)
    first, second = list(t.batches(0))[:2]
    assert torch.equal(first[0][:, 1:], first[1][:, :-1])  # targets: the inputs shifted by one character
    assert torch.equal(first[1][:, -1], second[0][:, 0])  # each row goes on where the last window ended
    _, _, state = t.loss(t.model, first, None)  # None: the zero state of an epoch's start
    assert all(s.shape == (1, 4, 32) and not s.requires_grad for s in state)
    loss, n, _ = t.loss(t.model, second, state)
    assert n == second[1].numel() and loss.requires_grad
    cold, _, _ = t.loss(t.model, second, None)
    assert cold.item() != pytest.approx(loss.item())  # the carried state changes the prediction


def test_evaluate_writes_metrics_and_samples(trained):
    root, _, _ = trained
    metrics = evaluate_model(root, "lstm")
    assert json.loads((root / "metrics/lstm/evaluate.json").read_text()) == metrics
    assert metrics["val_bits_per_char"] < 0.1 < metrics["unigram_bits_per_char"]
    assert metrics["val_perplexity"] == pytest.approx(np.exp(metrics["val_loss_nats_per_char"]))
    samples = (root / "reports/lstm/evaluate/samples.txt").read_text()
    assert "temperature 0, seed 1" in samples and "temperature 1, seed 1" in samples


def test_cli_generate_prints_text_and_rejects_unknown_prompt_characters(trained, capsys):
    root, _, _ = trained
    model = str(root / "models/lstm/model.pt")
    assert cli.main(["generate", "--prompt", "the", "--length", "20", "--temperature", "0", "--model", model]) == 0
    assert capsys.readouterr().out.startswith("the quick brown fox")
    assert cli.main(["generate", "--prompt", "Alice§", "--model", model]) == 2
    err = capsys.readouterr().err
    assert "'A'" in err and "'§'" in err and "'l'" not in err and "vocabulary" in err


@pytest.mark.parametrize("change, key", [
    ({"hiden_size": 32}, "recipes.lstm.default.hiden_size: unknown key"),
    ({"lr": -0.1}, "recipes.lstm.default.lr"),
    ({"batch_size": "4"}, "recipes.lstm.default.batch_size"),
    ({"tie_weights": True, "embedding_size": 16}, "recipes.lstm.default: tie_weights"),
])
def test_bad_params_name_the_key_and_write_nothing(tmp_path, change, key):
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path, **change)
    with pytest.raises(StageError, match=key):
        train_model(tmp_path, "lstm")
    assert not any((tmp_path / d).exists() for d in ("models", "dvclive", "metrics"))


def test_bad_params_exit_2_with_one_line_from_the_command(tmp_path):
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path, seq_len=0)
    proc = run_stage(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "recipes.lstm.default.seq_len" in out and "Traceback" not in out
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), 12_000))
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        write_prepared_text(root, text)
        lstm_params(root, epochs=4, hidden_size=32, embedding_size=32, num_layers=2, dropout=0.2,
                    seq_len=32, batch_size=8, patience=2)
        runs[name] = root
    assert run_stage(runs["straight"]).wait(timeout=600) == 0

    killed = runs["killed"]
    ckpt = killed / "models/lstm/checkpoint.pt"
    proc = run_stage(killed)
    while not ckpt.exists():  # wait for the first epoch's checkpoint, then kill mid-epoch
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "models/lstm/model.pt").exists(), "the run ended before the kill: make it longer"
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 0  # complete, loadable checkpoint

    proc = run_stage(killed)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resuming from" in out

    # same weights, same bytes (DVC's hash and the exports' source_md5 agree)
    assert files.digest(runs["straight"] / "models/lstm/model.pt", "md5") == files.digest(
        killed / "models/lstm/model.pt", "md5")
    a = torch.load(runs["straight"] / "models/lstm/model.pt", weights_only=True)
    b = torch.load(killed / "models/lstm/model.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    metrics = [json.loads((r / "dvclive/lstm/metrics.json").read_text()) for r in runs.values()]
    for m in metrics:
        m["train"].pop("char_per_s")  # wall-clock throughput: the one thing allowed to differ
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_dvc_repro_runs_train_and_evaluate_then_nothing(tmp_path):
    """The real dvc CLI on a temp git repo: the stages' cmd/deps/params/outs/metrics are wired right."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    write_prepared_text(repo, PHRASE * 20)
    lstm_params(repo, epochs=3)
    env = {**tool_env(), "PYTHONPATH": str(repo / "src")}  # this interpreter's `python` on PATH

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    # --single-item: data/prepared/alice is made here, not by the prepare stage.
    sh(sys.executable, "-m", "dvc", "repro", "--single-item", "train@lstm", "evaluate@lstm")
    for out in ("models/lstm/model.pt", "metrics/lstm/train.json", "metrics/lstm/evaluate.json",
                "reports/lstm/evaluate/samples.txt", "dvclive/lstm/metrics.json"):
        assert (repo / out).exists(), out
    shown = json.loads(sh(sys.executable, "-m", "dvc", "metrics", "show", "--json"))
    assert "val_bits_per_char" in json.dumps(shown)
    again = sh(sys.executable, "-m", "dvc", "repro", "--single-item", "train@lstm", "evaluate@lstm")
    assert "Running stage" not in again, again


def lstm_training(root: Path) -> train.Training:
    p = params.load(root / "params.yaml")
    return lstm.training(p.recipe("lstm"), root / "data/prepared/alice", torch.device("cpu"), train.Distributed(),
                         key="recipes.lstm.default", default_lr=p.lr)


def test_the_lstm_trains_at_its_own_lr_and_null_is_refused(tmp_path):
    """train@lstm does not depend on the top-level lr (the CNN's), so recipes.lstm.<name>.lr is required."""
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path, lr=0.003)
    t = lstm_training(tmp_path)
    p = params.load(tmp_path / "params.yaml")
    assert t.config["params"]["lr"] == p.recipe("lstm").lr == 0.003 == t.optimizer.param_groups[0]["initial_lr"] != p.lr
    assert t.optimizer.param_groups[0]["betas"][0] == p.recipe("lstm").momentum  # Adam's beta1: the recipe's momentum
    with pytest.raises(StageError, match=r"recipes.lstm.default.lr: Input should be a valid number"):
        params.load(lstm_params(tmp_path, lr=None))


@pytest.mark.parametrize("recipe, expected", [
    ({"lr": 0.5, "clip": 2.0}, "lower the learning rate (recipes.lstm.default.lr: 0.5, recipes.lstm.default.optimizer: "
                               "adam) or lower recipes.lstm.default.clip (2)"),
    ({"lr": 0.02, "clip": None}, "lower the learning rate (recipes.lstm.default.lr: 0.02, "
                                 "recipes.lstm.default.optimizer: adam) or set a gradient clip (recipes.lstm.default.clip)"),
    ({"lr": 0.5, "optimizer": "sgd", "weight_decay": 0.5},  # weight decay can be what blows up the loss
     "lower the learning rate (recipes.lstm.default.lr: 0.5, recipes.lstm.default.optimizer: sgd), lower "
     "recipes.lstm.default.clip (1) or lower recipes.lstm.default.weight_decay (0.5)"),
])
def test_non_finite_hint_names_the_keys_in_effect(tmp_path, recipe, expected):
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path, **recipe)
    assert lstm_training(tmp_path).hint == expected


def test_text_too_short_for_the_streams_and_window_phase_is_refused_before_training(tmp_path):
    # 21 training characters: enough for 4 streams of 2 (the old check), not after a phase of up to 15
    write_prepared_text(tmp_path, "abcdefghij" * 3, val_fraction=0.3)
    lstm_params(tmp_path)
    with pytest.raises(StageError, match=r"the training text has 21 characters: too few for "
                                         r"recipes.lstm.default.batch_size=4 streams \(x 1 processes\) with "
                                         r"recipes.lstm.default.seq_len=16"):
        train_model(tmp_path, "lstm")
    # the validation text against eval_streams, checked before training too (evaluate scores as validation did)
    write_prepared_text(tmp_path, PHRASE * 10)
    lstm_params(tmp_path, eval_streams=5000)
    with pytest.raises(StageError, match=r"too few for recipes.lstm.default.eval_streams=5000; "
                                         r"lower recipes.lstm.default.eval_streams"):
        train_model(tmp_path, "lstm")
    assert not any((tmp_path / d).exists() for d in ("models", "dvclive", "metrics"))


def test_a_run_that_diverges_but_stays_finite_writes_no_model(tmp_path):
    """The issue's `lr=10 optimizer=sgd clip=null`: finite losses far above the unigram baseline."""
    write_prepared_text(tmp_path, PHRASE * 40)
    lstm_params(tmp_path, lr=10, optimizer="sgd", clip=None, epochs=2)
    with pytest.raises(StageError) as err:
        train_model(tmp_path, "lstm")
    message = str(err.value)
    assert message.startswith("training diverged: the best val/loss")
    assert "the larger of twice the unigram baseline" in message and "no model file was written" in message
    assert "recipes.lstm.default.lr: 10, recipes.lstm.default.optimizer: sgd" in message
    assert "set a gradient clip (recipes.lstm.default.clip)" in message
    # nothing that looks like a run: no model, no checkpoint to resume, no DVCLive params/metrics, no metrics
    assert not (tmp_path / "models/lstm/model.pt").exists()
    assert not (tmp_path / "models/lstm/checkpoint.pt").exists()
    assert not (tmp_path / "dvclive").exists() or not any((tmp_path / "dvclive").rglob("*"))
    assert not (tmp_path / "metrics/lstm/train.json").exists()
