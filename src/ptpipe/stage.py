"""What every stage entry point shares: the user-facing error type, how it is reported, and the
command line (`parser`: `--params` and the stage's input/output paths, so dvc.yaml's `cmd` names them).

A `StageError` is a problem the user can fix (bad params, unreachable URL, corrupt input):
it is printed as one line naming what to change, with exit status 2 and no traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class StageError(Exception):
    """An error whose message tells the user what to change."""


def run(main: Callable[..., object], *args, **kwargs) -> None:
    """Run a stage's `main` as a command: exit 2 with a one-line message on StageError."""
    try:
        main(*args, **kwargs)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parser(doc: str, params: bool = True, **paths: str) -> argparse.ArgumentParser:
    """A stage's argparse parser: description = the module docstring's first line, `--params FILE`,
    and one `--<name> PATH` option per keyword (underscores become dashes) with that default."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if params:
        ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name, default in paths.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=default, help="(default: %(default)s)")
    return ap


def add_kinds(ap: argparse.ArgumentParser) -> None:
    """Positional model kinds (ptpipe.kinds); none = every kind."""
    from ptpipe import kinds

    ap.add_argument("kinds", nargs="*", metavar="KIND", help=f"model kinds (default: all of {', '.join(kinds.names())})")


def chosen_kinds(ap: argparse.ArgumentParser, args: argparse.Namespace, single: bool = False) -> list[str]:
    """The kinds asked for (default all), an unknown one an argparse error naming the known ones;
    `single`: exactly one must be named (an option gives one kind's paths)."""
    from ptpipe import kinds

    chosen = list(args.kinds) or kinds.names()
    unknown = [k for k in chosen if k not in kinds.known()]
    if unknown:
        ap.error(f"unknown model kind {unknown[0]!r}: known kinds are {', '.join(kinds.known())}")
    if single and len(chosen) != 1:
        ap.error("a per-model path option needs exactly one KIND")
    return chosen
