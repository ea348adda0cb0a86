"""What every stage entry point shares: the user-facing error type, how it is reported, and the
command line (`parser`: `--params` and the stage's input/output paths, which dvc.yaml's `cmd` names).

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


def run(main: Callable[..., object], *args, **kwargs):
    """Run a stage's entry function as a command: exit 2 with a one-line message on StageError."""
    try:
        return main(*args, **kwargs)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """A stage's argparse parser: description = the module docstring's first line, `--params FILE`,
    and one required `--<path> PATH` option per name: the paths are dvc.yaml's (its `cmd` passes
    each one, matching the stage's deps and outs), written there and nowhere else."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name in paths:
        ap.add_argument(f"--{name}", required=True, metavar="PATH")
    return ap
