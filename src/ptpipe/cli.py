"""The `ptpipe` command: a thin dispatcher over the modules that do the work.

    ptpipe generate --prompt "Alice" --length 300 --temperature 0.8 --seed 1 [--backend onnx] [--model lstm]
    ptpipe predict cat.jpg dog.png [--top-k 3] [--json] [--model cnn]
    ptpipe release cifar10-cnn v1.0.0 | ptpipe promote cifar10-cnn v1.0.0 prod [--force]
    ptpipe unassign cifar10-cnn v1.0.0 prod | ptpipe versions cifar10-cnn      (any folder of the repo, or --repo)
    ptpipe serve [--model cifar10-cnn#prod] [--port 8000] [--log predictions.sqlite]   (docs/serving.md)
    ptpipe feedback-export --log predictions.sqlite --model cifar10-cnn --out labelled/   (docs/monitoring.md)
    ptpipe tune [--workers 2] [--storage URL] [--push origin]   (params.yaml `tune`, docs/tune.md)

`predict`, `serve` and `generate --backend onnx` run on onnxruntime and never import torch. `--model` is a
model's name (params.yaml `models`: its files under models/<name>/) or a model file's path.
"""
from __future__ import annotations

import argparse
import sys

from ptpipe.stage import StageError


def _at_least(minimum: int, option: str, meaning: str = ""):
    """An argparse type: an int >= minimum, else an argparse error (exit 2) naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be {minimum}{meaning} or more, got {value}")
        return value
    return parse


_threads = _at_least(0, "--threads", " (one per core)")


def _fraction(text: str) -> float:
    """--log-sample: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--log-sample must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--log-sample must be a fraction in (0, 1], got {text}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """--log-retention: a positive number of seconds, minutes, hours or days (90s, 30m, 12h, 7d)."""
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"--log-retention must be a positive duration such as 90s, 30m, 12h or 7d, "
                                         f"got {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def _model_file(model: str | None, default: str) -> tuple[str | None, str]:
    """(path or None, model name) of `--model`: an existing file is a path, anything else names a model
    (params.yaml models.<name>: its files under models/<name>/)."""
    import re
    from pathlib import Path

    if model is None:
        return None, default
    # a model name is letters, digits, - and _ (ptpipe.params.NAME): anything else (models/x.onnx) is a path,
    # so a missing file is reported as that file, not as models/<the path>/model.onnx
    if Path(model).is_file() or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", model):
        return model, default
    return None, model


def _generate(args: argparse.Namespace) -> None:
    from ptpipe import generate

    path, model = _model_file(args.model, generate.DEFAULT_MODEL)
    generate.main(args.prompt, args.length, args.temperature, args.seed, path, args.backend, args.threads, model,
                  args.keep)


def _predict(args: argparse.Namespace) -> int:
    from ptpipe import inference

    path, model = _model_file(args.model, "cnn")
    return inference.predict_main(args.images, path or inference.exported_file(model), args.top_k, args.json,
                                  args.threads)


def _release(args: argparse.Namespace) -> None:
    from ptpipe import registry

    registry.release(args.name, args.version, repo=args.repo, message=args.message)


def _promote(args: argparse.Namespace) -> None:
    from ptpipe import registry

    registry.promote(args.name, args.version, args.stage, repo=args.repo, force=args.force)
    print(f"{args.name} {args.version} -> {args.stage}")


def _unassign(args: argparse.Namespace) -> None:
    from ptpipe import registry

    registry.unassign(args.name, args.version, args.stage, repo=args.repo)
    print(f"{args.name} {args.version} no longer in {args.stage}")


def _versions(args: argparse.Namespace) -> None:
    from ptpipe import registry

    rows = registry.versions(args.name, repo=args.repo)
    if not rows:
        print(f"{args.name}: no released versions")
    for row in rows:
        print(f"{row['version']:<10} {row['commit'][:8]}  {row['created_at']:%Y-%m-%d %H:%M}  {', '.join(row['stages'])}")


def _serve(args: argparse.Namespace) -> None:
    from ptpipe import serve

    serve.main(args.model, args.repo, args.models_dir, args.host, args.port, serve.options_from(args))


def _feedback_export(args: argparse.Namespace) -> None:
    from ptpipe import predlog

    predlog.export_main(args.log, args.model, args.out)


def _tune(args: argparse.Namespace) -> None:
    from ptpipe import tune

    if args.report_only:
        tune.report_main(args.repo, args.storage, args.report)
    else:
        tune.run(args.repo, args.workers, args.storage, args.push, args.report, stale_after_s=args.stale_after)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_inference, _add_registry, _add_serve, _add_feedback, _add_tune):
        add(sub)
    return parser


def _add_inference(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with a trained text model (default: the character LSTM)")
    gen.add_argument("--prompt", required=True, help="text that warms the state; every character must be in the vocabulary")
    gen.add_argument("--length", type=_at_least(0, "--length"), default=300,
                     help="characters to generate after the prompt (default 300)")
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="softmax temperature; 0 = greedy, <1 safer, >1 wilder (default 0.8)")
    gen.add_argument("--seed", type=int, default=1, help="sampling seed: same seed, same text (default 1)")
    gen.add_argument("--backend", choices=("torch", "torchscript", "onnx"), default="torch",
                     help="torch: eager from model.pt; torchscript: model.ts; onnx: model.onnx via onnxruntime "
                          "(same text for the same seed on all three)")
    gen.add_argument("--model", default=None,
                     help="a text model of params.yaml (lstm, gpt, yours: models/<name>/model.pt, .ts or .onnx "
                          "after --backend) or a model file (default: lstm)")
    gen.add_argument("--threads", type=_threads, default=0,
                     help="CPU threads (default 0 = one per core; 1 on a machine busy with other work)")
    gen.add_argument("--keep", type=_at_least(1, "--keep"), default=None,
                     help="gpt past its block: characters re-fed when the key/value cache is full (default: the "
                          "model's, half the block); the block size gives the uncached model's text, ~5x slower")
    gen.set_defaults(func=_generate)

    pred = sub.add_parser("predict", help="classify images with an exported image model (onnxruntime; default: the CNN)")
    pred.add_argument("images", nargs="+", help="PNG/JPEG files of any size (centre square, resized to 32x32)")
    pred.add_argument("--top-k", type=_at_least(1, "--top-k"), default=3,
                      help="labels to show per image (default 3; at most the number of classes)")
    pred.add_argument("--json", action="store_true", help="print JSON {predictions, errors} instead of text")
    pred.add_argument("--model", default=None,
                      help="an image model of params.yaml (its models/<name>/model.onnx) or an ONNX file (default: cnn)")
    pred.add_argument("--threads", type=_threads, default=0,
                      help="CPU threads (default 0 = one per core; 1 on a machine busy with other work)")
    pred.set_defaults(func=_predict)


def _add_registry(sub) -> None:
    rel = sub.add_parser("release", help="push a model's files to the DVC remote and tag the version (GTO)")
    rel.add_argument("name", help="artifact name from dvc.yaml, e.g. cifar10-cnn or alice-lstm")
    rel.add_argument("version", help="vMAJOR.MINOR.PATCH, e.g. v1.0.0")
    rel.add_argument("--message", default=None, help="tag message (default: 'Release NAME VERSION')")
    rel.set_defaults(func=_release)

    pro = sub.add_parser("promote", help="assign a registry stage (e.g. prod) to a released version")
    pro.add_argument("name")
    pro.add_argument("version")
    pro.add_argument("stage", help="e.g. dev, staging, prod")
    pro.add_argument("--force", action="store_true", help="assign the stage again to a version that has it")
    pro.set_defaults(func=_promote)

    una = sub.add_parser("unassign", help="take a registry stage away from a version (GTO unassign)")
    una.add_argument("name")
    una.add_argument("version")
    una.add_argument("stage")
    una.set_defaults(func=_unassign)

    ver = sub.add_parser("versions", help="list a model's released versions and stages")
    ver.add_argument("name")
    ver.set_defaults(func=_versions)
    for registry_command in (rel, pro, una, ver):
        registry_command.add_argument("--repo", default=None,
                                      help="the project (default: the repository holding the current folder)")


def _add_serve(sub) -> None:
    from ptpipe.limits import Limits  # standard library only: the serve flags' defaults, defined once

    srv = sub.add_parser("serve", help="HTTP inference server for the exported models (onnxruntime, no torch)")
    srv.add_argument("--model", action="append", default=[],
                     help="NAME@vX.Y.Z, NAME#STAGE (registry) or [NAME=]PATH; repeatable (default: models/*/model.onnx)")
    srv.add_argument("--repo", default=None, help="registry git repo, path or URL (default: this directory)")
    srv.add_argument("--models-dir", default="models", help="workspace models folder (default models)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--no-batching", action="store_true", help="one onnxruntime call per request")
    srv.add_argument("--batch-window-ms", type=float, default=2.0, help="micro-batch gathering window (default 2)")
    srv.add_argument("--max-batch", type=_at_least(1, "--max-batch"), default=Limits.max_batch,
                     help=f"images per request and per call (default {Limits.max_batch})")
    srv.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20,
                     help=f"request body limit in MiB (default {Limits.max_body_bytes / 2**20:g})")
    srv.add_argument("--max-pixels", type=_at_least(1, "--max-pixels"), default=Limits.max_pixels,
                     help=f"pixels of one uploaded image, refused before decoding (default {Limits.max_pixels:,})")
    srv.add_argument("--max-decodes", type=_at_least(1, "--max-decodes"), default=Limits.max_decodes,
                     help=f"images decoded at once: the ceiling of decoding memory (default {Limits.max_decodes})")
    srv.add_argument("--body-timeout-s", type=float, default=Limits.body_timeout_s,
                     help=f"seconds for a whole request body to arrive, else 408 (default {Limits.body_timeout_s:g})")
    srv.add_argument("--poll-s", type=float, default=0.0,
                     help="re-resolve the models every N s and swap in new versions (default 0: only on "
                          "POST /v2/repository/models/NAME/load)")
    srv.add_argument("--threads", type=_threads, default=1,
                     help="onnxruntime intra-op threads per call (default 1: the event loop needs the other cores; "
                          "0 = one per core)")
    from ptpipe.limits import LogOptions

    srv.add_argument("--log", default=None, metavar="PATH",
                     help="prediction log: an SQLite file recording each answer for monitoring (docs/monitoring.md); "
                          "default: nothing is logged")
    srv.add_argument("--log-sample", type=_fraction, default=None, metavar="FRACTION",
                     help=f"fraction of requests logged, drawn per request (default {LogOptions.sample:g})")
    srv.add_argument("--log-retention", type=_duration, default=None, metavar="AGE",
                     help=f"log rows older than this are deleted: 90s, 30m, 12h, 7d "
                          f"(default {LogOptions.retention_s / 86400:g}d)")
    srv.add_argument("--log-max-rows", type=_at_least(1, "--log-max-rows"), default=None, metavar="N",
                     help=f"and at most N rows are kept, the newest (default {LogOptions.max_rows:,})")
    srv.add_argument("--log-raw", type=_at_least(0, "--log-raw"), default=None, metavar="N",
                     help="keep the raw input (the model's input image as PNG, or the prompt) of the first N "
                          "inputs per model per clock hour, for labelling (default 0: never, inputs may be private)")
    srv.set_defaults(func=_serve)


def _add_feedback(sub) -> None:
    exp = sub.add_parser("feedback-export", help="labelled raw inputs of the prediction log as an image-folder "
                                                 "data set (docs/monitoring.md)")
    exp.add_argument("--log", required=True, metavar="PATH", help="the prediction log (`ptpipe serve --log PATH`)")
    exp.add_argument("--model", required=True, help="the served model's name")
    exp.add_argument("--out", required=True, metavar="DIR",
                     help="folder to write <label>/<id>.png into (replaced whole, atomically)")
    exp.set_defaults(func=_feedback_export)


def _add_tune(sub) -> None:
    tun = sub.add_parser("tune", help="an Optuna study over params.yaml's `tune` section, each trial a DVC experiment")
    tun.add_argument("--workers", type=_at_least(1, "--workers"), default=1,
                     help="trials run at once on this machine (default 1; give each a thread budget in tune.fixed)")
    tun.add_argument("--storage", default=None,
                     help="Optuna storage: a journal file path or a URL such as postgresql+psycopg://user@host/db, "
                          "shared by every machine of the study (default: .dvc/tmp/tune/<study>.journal)")
    tun.add_argument("--push", default=None, metavar="REMOTE",
                     help="after each trial, `dvc exp push REMOTE <experiment>` (git refs + DVC outputs): for "
                          "studies spread over machines")
    tun.add_argument("--repo", default=".", help="the project's root (default: the current directory)")
    tun.add_argument("--report", default=None, metavar="DIR", help="report folder (default reports/tune/<study>)")
    tun.add_argument("--report-only", action="store_true", help="write the report of the study as it is; run nothing")
    tun.add_argument("--stale-after", type=float, default=300.0, metavar="SECONDS",
                     help="a trial of another host with no heartbeat for this long is taken over (default 300)")
    tun.set_defaults(func=_tune)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0  # predict: 1 when some file was not an image
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
