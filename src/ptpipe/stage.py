"""What every stage entry point shares: the user-facing error type and how it is reported.

A `StageError` is a problem the user can fix (bad params, unreachable URL, corrupt input):
it is printed as one line naming what to change, with exit status 2 and no traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

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
