"""Text generation from a trained text model: `ptpipe generate --prompt "Alice" [--model lstm] ...`.

Backends (`ptpipe generate --backend`): `torch` (eager, from models/<model>/model.pt), `torchscript`
(model.ts) and `onnx` (model.onnx through onnxruntime: this module imports torch only for the first
two, so the ONNX path runs where torch is not installed). Each backend only supplies a `run`
function ({input name: array} -> {output name: array}) and the model's metadata; the sampling loop
and its seeded numpy RNG are `ptpipe.inference.sample_ids`, shared by all three, so the same seed,
prompt and temperature give the same text on every backend (tests check it). How the model is fed
(a recurrent state carried, or a window re-fed) is in its metadata, written from its kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ptpipe import inference
from ptpipe.stage import StageError

if TYPE_CHECKING:
    from torch import nn

BACKENDS = ("torch", "torchscript", "onnx")
DEFAULT_MODEL = "lstm"  # params.yaml models.lstm: the tutorial's text model


def generate(model: nn.Module, config: dict, prompt: str, length: int, temperature: float, seed: int) -> str:
    """The prompt followed by `length` generated characters, from an eager model and its saved config."""
    from ptpipe import kinds

    meta = kinds.get(config["kind"]).describe(config)
    return prompt + "".join(inference.stream_text(kinds.runner(model, meta), meta, prompt, length, temperature, seed))


def load_backend(backend: str, path: str | Path | None = None, threads: int = 0, model: str = DEFAULT_MODEL
                 ) -> tuple[inference.Run, dict]:
    """(run function, metadata) of one backend's model file (default models/<model>/model.<ext>);
    `threads`: CPU threads of the backend (0 = its default, one per core). A file that is not a text
    model of a known kind, or an export older than the model.pt beside it, is a StageError."""
    if backend not in BACKENDS:
        raise StageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    path = Path(path or inference.exported_file(model, backend))
    if backend == "onnx":
        model = inference.TextGenerator(path, threads)
        return model.run, model.meta
    import torch

    from ptpipe import kinds

    if threads > 0:
        torch.set_num_threads(threads)
    if backend == "torch":
        found, module, config = kinds.load(path)
        meta = found.describe(config)
    else:
        from ptpipe.export import load_torchscript

        module, meta = load_torchscript(path)
        inference.check_ptpipe_meta(meta, path)
        inference.check_fresh(path, meta)
    if meta["ptpipe.task"] != "text-generation":
        raise StageError(f"{path} is a ptpipe {meta['ptpipe.kind']} model for {meta['ptpipe.task']}, "
                         f"not text generation")
    return kinds.runner(module, meta), meta


def main(prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 1,
         model_path: str | Path | None = None, backend: str = "torch", threads: int = 0,
         model: str = DEFAULT_MODEL, keep: int | None = None) -> str:
    run, meta = load_backend(backend, model_path, threads, model)
    meta = inference.with_keep(meta, keep)
    text = prompt + "".join(inference.stream_text(run, meta, prompt, length, temperature, seed))
    print(text)
    return text
