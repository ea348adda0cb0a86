"""The `ptpipe` command: a thin dispatcher over the modules that do the work.

    ptpipe generate --prompt "Alice" --length 300 --temperature 0.8 --seed 1
"""
from __future__ import annotations

import argparse
import sys

from ptpipe.stage import StageError


def _generate(args: argparse.Namespace) -> None:
    from ptpipe import generate

    generate.main(args.prompt, args.length, args.temperature, args.seed, args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with the trained character LSTM")
    gen.add_argument("--prompt", required=True, help="text that warms the state; every character must be in the vocabulary")
    gen.add_argument("--length", type=int, default=300, help="characters to generate after the prompt (default 300)")
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="softmax temperature; 0 = greedy, <1 safer, >1 wilder (default 0.8)")
    gen.add_argument("--seed", type=int, default=1, help="sampling seed: same seed, same text (default 1)")
    gen.add_argument("--model", default="models/lstm/model.pt", help="model file (default models/lstm/model.pt)")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
