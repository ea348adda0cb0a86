"""The character transformer (`gpt`): it learns, goes through export / validate / generate with no
code of its own there, resumes after SIGKILL exactly, and its params and scoring are checked."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import (evaluate_model, recipe_keys, tool_env, train_command, train_model, write_params, write_prepared_text,
                      write_tiny_params)
from ptpipe import cli, export, generate, inference, kinds, params, train, validate
from ptpipe.kinds import gpt
from ptpipe.kinds.gpt import CharGPT, init_weights, window_loss
from ptpipe.stage import StageError

PHRASE = "the quick brown fox jumps over the lazy dog. "

# what these tests train: a small model that learns a repeated sentence (on top of the tiny params)
LEARN = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, init_std=0.06, batch_size=8, epochs=6,
             steps_per_epoch=25, lr=0.01, weight_decay=0.1, beta2=0.99, warmup_fraction=0.05, initial_lr_factor=0.1,
             final_lr_factor=0.1, clip=1.0, patience=None, seed=0, threads=1, eval_stride=16)


def gpt_params(root: Path, **recipe) -> Path:
    """root/params.yaml: the tiny params, models.gpt's recipe = LEARN + `recipe`, validate shapes within block 32."""
    path = write_tiny_params(root, **{"validate.shapes.gpt": {"batch": [1, 3], "seq": [1, 7, 32], "steps": [3]}})
    write_params(root, **recipe_keys("gpt", **{**LEARN, **recipe}))
    return path


def run_stage(root: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(root, "gpt"), cwd=root, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_gpt(root: Path, **recipe) -> train.FitResult:
    gpt_params(root, **recipe)
    return train_model(root, "gpt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (in-process, through the real stage) on a repeated sentence, then exported."""
    root = tmp_path_factory.mktemp("gpt")
    write_prepared_text(root, PHRASE * 40)
    result = train_gpt(root)
    export.export(root / "models/gpt", root / "params.yaml", revision="test")
    return root, result


def test_learns_repetitive_text_far_below_the_unigram(trained):
    root, result = trained
    metrics = json.loads((root / "metrics/gpt/train.json").read_text())
    assert result.best["val/bits_per_char"] == metrics["val_bits_per_char"] < 0.2
    evaluated = evaluate_model(root, "gpt")  # evaluate@gpt: the same windows as validation, beside the baseline
    assert evaluated["unigram_val_bits_per_char"] > 3.5  # 28 distinct characters
    assert evaluated["val_bits_per_char"] == pytest.approx(metrics["val_bits_per_char"], rel=1e-6)
    assert "temperature 0.5" in (root / "reports/gpt/evaluate/samples.txt").read_text()
    assert result.history[-1]["train/loss"] < 0.2 < result.history[0]["train/loss"]
    assert metrics["parameters"] == sum(p.numel() for p in CharGPT(**kinds.load_file(
        root / "models/gpt/model.pt")["config"]["model_args"]).parameters())
    assert not (root / "models/gpt/checkpoint.pt").exists()
    logged = json.loads((root / "dvclive/gpt/metrics.json").read_text())
    assert "bits_per_char" in logged["val"]
    assert torch.get_num_threads() == 1  # recipes.gpt.default.threads


def test_model_file_is_self_describing_and_ties_the_decoder(trained):
    root, _ = trained
    kind, model, config = kinds.load(root / "models/gpt/model.pt")
    assert kind.name == "gpt" and config["kind"] == "gpt" and config["data"]["vocab"] == sorted(set(PHRASE))
    assert config["params"]["lr"] == 0.01 and config["model_args"]["block_size"] == 32
    assert model.gpt.head.weight is model.gpt.tok.weight  # the deployable CachedGPT holds the trained CharGPT
    assert not model.training


def test_exports_and_validates_at_shapes_the_export_never_saw(trained):
    root, _ = trained
    meta = export.load_torchscript(root / "models/gpt/model.ts")[1]
    layers = [(i, part) for part in ("key", "value") for i in (0, 1)]  # the fixture: 2 layers of 2 heads of 16
    assert meta["generation"] == {"mode": "cached", "block_size": 32, "keep": 16, "pad": "pad",
                                  "past": [{"input": f"past_key_values.{i}.{part}", "output": f"present.{i}.{part}",
                                            "length_axis": 2} for i, part in layers]}
    assert meta["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]},
                              {"name": "pad", "dtype": "int64", "shape": ["batch"]},
                              *({"name": f"past_key_values.{i}.{part}", "dtype": "float32",
                                 "shape": ["batch", 2, "past", 16], "list": "past"} for i, part in layers)]
    assert [o["name"] for o in meta["outputs"]] == ["logits", *(f"present.{i}.{part}" for i, part in layers)]
    report = validate.validate_models({"gpt": (root / "models/gpt", root / "data/prepared/alice")},
                                      params_file=root / "params.yaml")
    assert report["passed"]
    # windows, and the cached path (prompt of seq - 3, then 3 single ids) against eager's uncached windows
    assert set(report["gpt"]["onnxruntime"]) == ({f"batch={b} seq={t}" for b in (1, 3) for t in (1, 7, 32)}
                                                 | {f"batch={b} prompt={p} steps={s}" for b in (1, 3)
                                                    for p, s in ((4, 3), (29, 3))})
    assert 0 < max(report["max_abs_diff"]["gpt"].values()) <= 1e-4


def test_validate_fails_a_cache_that_drifts_naming_the_cached_case(trained, monkeypatch):
    """An onnxruntime path that reads its carried keys/values 1e-3 off: the windows (no past) still pass,
    the cached steps do not, and the failure names the first cached case."""
    root, _ = trained
    real = validate._onnx_runner

    def drifting(session):
        run = real(session)
        return lambda feeds: run({**feeds, "past_key_values.1.value": feeds["past_key_values.1.value"] + np.float32(1e-3)})

    monkeypatch.setattr(validate, "_onnx_runner", drifting)
    with pytest.raises(validate.ValidationFailed, match=r"gpt onnxruntime batch=1 prompt=4 steps=3: max \|"):
        validate.validate_models({"gpt": (root / "models/gpt", root / "data/prepared/alice")},
                                 params_file=root / "params.yaml")


def test_cached_logits_equal_the_uncached_window_at_every_step_on_every_backend(trained):
    """Prompts shorter than the block, then single ids with the past each backend returned, up to the block:
    every step's logits within validate.atol of eager CharGPT.forward over the whole window (no cache)."""
    root, _ = trained
    kind, eager, config = kinds.load(root / "models/gpt/model.pt")
    signature = kind.signature(config)
    backends = {"eager": kinds.runner(eager, signature),
                "torchscript": kinds.runner(export.load_torchscript(root / "models/gpt/model.ts")[0], signature),
                "onnxruntime": inference.TextGenerator(root / "models/gpt/model.onnx").run}
    text = np.asarray([config["data"]["vocab"].index(c) for c in (PHRASE * 2)[:32]], np.int64)[None]
    for prompt in (1, 9, 31):
        with torch.no_grad():
            window = [eager.gpt(torch.from_numpy(text[:, :t]))[:, -1].numpy() for t in range(prompt, 33)]
        for backend, run in backends.items():
            out = run({"ids": text[:, :prompt], "pad": np.zeros(1, np.int64), **gpt.empty_past(config["model_args"], 1)})
            steps = [out["logits"][:, -1]]
            for t in range(prompt, 32):
                past = {name: out[name.replace("past_key_values", "present")] for name in gpt.past_names(config["model_args"])}
                out = run({"ids": text[:, t: t + 1], "pad": np.zeros(1, np.int64), **past})
                steps.append(out["logits"][:, -1])
            assert len(steps) == len(window) == 33 - prompt
            worst = max(float(np.abs(a - b).max()) for a, b in zip(steps, window))
            assert worst <= 1e-4, (backend, prompt, worst)


def test_rows_of_other_lengths_share_a_call_left_padded(trained):
    """The server's batched step: rows with 3 and 11 cached ids in one call (the shorter left-padded) give
    each row's logits as it gets them alone."""
    root, _ = trained
    onnx = inference.TextGenerator(root / "models/gpt/model.onnx")
    vocab = onnx.vocab
    seqs = [inference.Sequence([vocab.index(c) for c in PHRASE[:n]], 1.0, 5) for n in (3, 11)]
    alone = [inference.Sequence(list(s.ids), 1.0, 5) for s in seqs]
    for _ in range(40):  # past the block (32) for both rows: each re-prefills its last `keep` ids on the way
        assert inference.step(onnx.run, onnx.meta, seqs) == [inference.step(onnx.run, onnx.meta, [a])[0] for a in alone]
    assert [s.ids for s in seqs] == [a.ids for a in alone]


def test_validate_refuses_a_sequence_longer_than_the_block(trained):
    root, _ = trained
    with pytest.raises(StageError, match=r"validate.shapes.gpt.seq: \[33\] longer than the model's block_size 32"):
        validate.validate_models({"gpt": (root / "models/gpt", root / "data/prepared/alice")},
                                 shapes={"gpt": {"batch": [1], "seq": [8, 33]}}, params_file=root / "params.yaml")


def uncached_text(root: Path, prompt: str, length: int, temperature: float, seed: int) -> str:
    """What generation gave before the cache: eager CharGPT.forward re-fed the last block_size ids every step."""
    _, model, config = kinds.load(root / "models/gpt/model.pt")
    meta = {"vocab": config["data"]["vocab"], "generation": {"mode": "window", "block_size": 32},
            "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", "vocab_size"]}]}
    return prompt + "".join(inference.stream_text(kinds.runner(model.gpt, meta), meta, prompt, length, temperature, seed))


def refeed_text(root: Path, prompt: str, length: int, temperature: float, seed: int, keep: int) -> str:
    """The cached generation's policy written out on eager CharGPT.forward, no cache: each character sees the
    ids from `start`, and once those are more than block_size, `start` moves to the last `keep`."""
    _, model, config = kinds.load(root / "models/gpt/model.pt")
    vocab, block = config["data"]["vocab"], config["model_args"]["block_size"]
    ids, rng = [vocab.index(c) for c in prompt], np.random.default_rng(seed)
    start = max(0, len(ids) - block)
    for _ in range(length):
        if len(ids) - start > block:
            start = len(ids) - keep
        with torch.no_grad():
            logits = model.gpt(torch.tensor([ids[start:]]))[0, -1].numpy()
        ids.append(inference._draw(logits, temperature, rng))
    return "".join(vocab[i] for i in ids)


GENERATE_FILES = {"torch": "model.pt", "torchscript": "model.ts", "onnx": "model.onnx"}
PROMPTS = ["the quick brown fox jumps over the lazy",  # 39 characters: longer than the block
           "the qu"]  # shorter: the cache fills, then generation goes past the block


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_with_keep_block_size_gives_the_uncached_text_on_all_three_backends(trained, temperature, prompt):
    root, _ = trained
    texts = {backend: generate.main(prompt, 80, temperature, 3, root / "models/gpt" / name, backend, model="gpt",
                                    keep=32) for backend, name in GENERATE_FILES.items()}
    assert set(texts.values()) == {uncached_text(root, prompt, 80, temperature, 3)}, texts
    text = texts["onnx"]
    assert text.startswith(prompt) and len(text) == len(prompt) + 80
    if temperature == 0:  # the model learned the sentence: greedy decoding continues it
        assert text == (PHRASE * 4)[: len(text)]


@pytest.mark.parametrize("keep", [None, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_past_the_block_re_prefills_the_last_keep_ids_on_all_three_backends(trained, temperature, prompt,
                                                                                     keep):
    """The model's keep (16 of a 32 block) and --keep 2: every backend gives the policy's text; inside the block
    it is the uncached model's text to the character."""
    root, _ = trained
    texts = {backend: generate.main(prompt, 80, temperature, 3, root / "models/gpt" / name, backend, model="gpt",
                                    keep=keep) for backend, name in GENERATE_FILES.items()}
    assert set(texts.values()) == {refeed_text(root, prompt, 80, temperature, 3, keep=keep or 16)}, texts
    uncached = uncached_text(root, prompt, 80, temperature, 3)
    inside = max(33, len(prompt) + 1)  # characters (prompt included) generated with the whole window either way
    assert texts["onnx"][:inside] == uncached[:inside]


@pytest.mark.parametrize("keep", [16, 2, 32])
def test_a_full_cache_is_re_fed_its_last_keep_ids_then_stepped_again(trained, keep):
    """What onnxruntime is fed for a 6-character prompt and 80 characters: the prompt, single ids until the
    cache holds the block (32), then the last `keep` ids with an empty past, single ids again, and so on."""
    root, _ = trained
    model = inference.TextGenerator(root / "models/gpt/model.onnx")
    fed = []
    meta = inference.with_keep(model.meta, keep)

    def run(feeds):
        fed.append((feeds["ids"].shape[1], feeds["past_key_values.0.key"].shape[2]))
        return model.run(feeds)

    "".join(inference.stream_text(run, meta, "the qu", 80, 1.0, 3))
    expected, cached = [(6, 0)], 6
    while len(expected) < 80:
        if cached == 32:
            expected.append((keep, 0))
            cached = keep
        else:
            expected.append((1, cached))
            cached += 1
    assert fed == expected


def test_keep_outside_the_block_or_for_a_model_without_a_cache_is_refused_naming_it(trained):
    root, _ = trained
    with pytest.raises(StageError, match=r"--keep must be 1..32 \(the model's block_size"):
        generate.main("the", 5, 0.0, 1, root / "models/gpt/model.onnx", "onnx", model="gpt", keep=33)
    meta = {"ptpipe.kind": "lstm", "generation": {"mode": "recurrent"}}
    with pytest.raises(StageError, match="--keep is for models with a key/value cache"):
        inference.with_keep(meta, 4)


def test_cli_generate_model_gpt(trained, capsys, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)  # `--model gpt` names models/gpt/model.onnx under the working directory
    assert cli.main(["generate", "--model", "gpt", "--backend", "onnx", "--prompt", "the", "--length", "20",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the quick brown fox")


def test_window_loss_scores_every_character_once_with_the_context_asked_for():
    torch.manual_seed(0)
    model = CharGPT(11, 16, 2, 2, 16, 0.0).eval()
    ids = torch.randint(0, 11, (203,))
    for stride in (1, 5, 16):
        nats, n = window_loss(model, ids, 16, stride, batch=7)
        assert n == 202
    # stride 1 = every character with its full (up to 16) context: the same as scoring each target
    # from the window that ends at it
    with torch.no_grad():
        ref = 0.0
        for j in range(1, 203):
            x = ids[max(0, j - 16): j][None]
            ref -= torch.log_softmax(model(x)[0, -1], -1)[ids[j]].item()
    assert window_loss(model, ids, 16, 1)[0] == pytest.approx(ref, rel=1e-5)
    # non-overlapping windows give the early positions less context: a different (worse) number
    assert window_loss(model, ids, 16, 16)[0] != pytest.approx(ref, rel=1e-5)


def test_the_eager_model_refuses_more_positions_than_block_size():
    model = CharGPT(5, 8, 1, 1, 8, 0.0)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.int64))


def test_init_weights_follows_gpt2():
    model = CharGPT(50, 16, 4, 2, 64, 0.0)
    init_weights(model, 0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.1)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_adamw_decays_only_2d_weights_and_the_lr_warms_up_then_follows_the_cosine(tmp_path):
    write_prepared_text(tmp_path, PHRASE * 10)
    p = params.load(gpt_params(tmp_path, lr=0.004, epochs=4, steps_per_epoch=50, warmup_fraction=0.1))
    t = gpt.training(p.recipe("gpt"), tmp_path / "data/prepared/alice", torch.device("cpu"), train.Distributed(),
                     key="recipes.gpt.default", default_lr=p.lr)
    model, optimizer, schedule, config = t.model, t.optimizer, t.lr_factor, t.config
    decayed, plain = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW) and decayed["betas"] == plain["betas"] == (0.9, 0.99)  # beta1, beta2
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(t.dim() == 2 for t in decayed["params"]) and all(t.dim() == 1 for t in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert config["params"]["lr"] == 0.004 == decayed["initial_lr"] == plain["initial_lr"]  # recipes.gpt.default.lr, not the top-level lr
    factors = [schedule(s) for s in range(220)]  # 200 steps, 20 of them warm-up
    assert factors[0] == pytest.approx(0.1) and factors[20] == pytest.approx(1.0)
    assert factors[110] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert factors[200] == pytest.approx(0.1) and factors[219] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factors[:20], factors[1:21]))
    assert all(a >= b for a, b in zip(factors[20:], factors[21:]))


@pytest.mark.parametrize("change, key", [
    ({"n_embed": 32}, "recipes.gpt.default.n_embed: unknown key"),
    ({"lr": -0.1}, "recipes.gpt.default.lr"),
    ({"lr": None}, "recipes.gpt.default.lr"),
    ({"beta1": 1.0}, "recipes.gpt.default.beta1"),
    ({"batch_size": "4"}, "recipes.gpt.default.batch_size"),
    ({"n_head": 3}, r"n_embd \(32\) must be a multiple of n_head \(3\)"),
    ({"eval_stride": 64}, r"eval_stride \(64\) must be at most block_size \(32\)"),
])
def test_bad_params_name_the_key_and_write_nothing(tmp_path, change, key):
    write_prepared_text(tmp_path, PHRASE * 10)
    with pytest.raises(StageError, match=key):
        train_gpt(tmp_path, **change)
    assert not any((tmp_path / d).exists() for d in ("models", "dvclive", "metrics"))


def test_text_shorter_than_a_window_is_refused_before_training(tmp_path):
    write_prepared_text(tmp_path, PHRASE)  # 41 training characters
    with pytest.raises(StageError, match="too few for recipes.gpt.default.block_size=64 windows; "
                                         "lower recipes.gpt.default.block_size"):
        train_gpt(tmp_path, block_size=64, eval_stride=8)
    assert not any((tmp_path / d).exists() for d in ("models", "dvclive", "metrics"))


def test_bad_params_exit_2_with_one_line_from_the_command(tmp_path):
    write_prepared_text(tmp_path, PHRASE * 10)
    gpt_params(tmp_path, warmup_fraction=1.5)
    proc = run_stage(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "recipes.gpt.default.warmup_fraction" in out and "Traceback" not in out
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), 12_000))
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        write_prepared_text(root, text)
        gpt_params(root, epochs=5, steps_per_epoch=30, dropout=0.2, patience=2)
        runs[name] = root
    assert run_stage(runs["straight"]).wait(timeout=600) == 0

    killed = runs["killed"]
    ckpt = killed / "models/gpt/checkpoint.pt"
    proc = run_stage(killed)
    while not ckpt.exists():  # wait for the first epoch's checkpoint, then kill mid-epoch
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "models/gpt/model.pt").exists(), "the run ended before the kill: make it longer"
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 0  # complete, loadable checkpoint

    proc = run_stage(killed)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resuming from" in out

    a = torch.load(runs["straight"] / "models/gpt/model.pt", weights_only=True)
    b = torch.load(killed / "models/gpt/model.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    metrics = [json.loads((r / "dvclive/gpt/metrics.json").read_text()) for r in runs.values()]
    for m in metrics:
        m["train"].pop("char_per_s")  # wall-clock throughput: the one thing allowed to differ
    assert metrics[0] == metrics[1]
    final = [json.loads((r / "metrics/gpt/train.json").read_text()) for r in runs.values()]
    for m in final:
        for timing in ("train_seconds", "other_seconds", "setup_seconds"):
            m.pop(timing)
    assert final[0] == final[1]


def test_a_run_that_diverges_but_stays_finite_writes_no_model(tmp_path):
    """lr 10 without clipping: the loss stays finite but ends far above the unigram baseline and chance;
    the run stops naming the gpt keys in effect (weight decay included), and no model file is written."""
    write_prepared_text(tmp_path, PHRASE * 40)
    model_path = tmp_path / "models/gpt/model.pt"
    with pytest.raises(StageError, match=r"training diverged: .*far above the larger of twice the unigram baseline"
                                         r".*lower the learning rate \(recipes.gpt.default.lr: 10\), set a gradient "
                                         r"clip \(recipes.gpt.default.clip\) or lower recipes.gpt.default.weight_decay "
                                         r"\(0.5\)"):
        train_gpt(tmp_path, lr=10.0, clip=None, epochs=2, steps_per_epoch=10, weight_decay=0.5)
    assert not model_path.exists() and not (tmp_path / "metrics/gpt/train.json").exists()
    assert not (tmp_path / "dvclive/gpt").exists()

