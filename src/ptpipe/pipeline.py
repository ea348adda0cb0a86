"""Driving the DVC pipeline from code: what the Prefect flows call, and nothing Prefect-specific.

Why not only `dvc exp run --temp -S ...`: the retrain flow runs each stage as its own Prefect task
(`dvc repro --single-item`: a run's log and state say which stage failed and show its output as it
comes), and when a validate stage fails it still tabulates the failing shapes from the models the run
made (--temp removes its copy, models included, when a stage fails). So an override run gets its own
git worktree of HEAD sharing the DVC cache (`temporary_copy`) and is recorded with `dvc exp save`, which
is what --temp does; tests/test_flows.py checks both behaviours. Everything else is DVC's commands.

- `stage_order` finds the pipeline's stages at run time (`dvc dag --dot`), dependencies first,
  so a stage added later is run without touching any flow.
- `expand_sweeps` turns `dvc exp run -S` sweep syntax (`lr=0.001,0.003`, `lr=range(1,3)`)
  into one list of overrides per experiment, with DVC's own (Hydra) parser.
- `check_overrides` applies `dvc exp run -S` style overrides to a *copy* of params.yaml
  (with DVC's own override parser) and validates the result with `ptpipe.params`, so a bad
  override fails before DVC runs. `apply_overrides` then writes them into params.yaml of a
  repository (the retrain flow: of a temporary copy), atomically, as `dvc exp run -S` would.
- `temporary_copy` is where an experiment runs: a git worktree of the committed state (HEAD)
  sharing the repository's DVC cache and experiment refs, removed afterwards, so the user's
  workspace is never changed; `uncommitted_inputs` tells a run in place whether the workspace
  still is the committed state.
- `run_dvc` runs one `dvc` command with its output handed line by line to a callback
  (the Prefect logger), and raises `DvcFailed` naming the stage on a non-zero exit.
- `metrics`, `params_changed`, `revision` and `report_markdown` describe the result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from ptpipe import files, params
from ptpipe.stage import StageError

# `key=value` as typed after `dvc exp run -S`; `+key` / `~key` (add / delete a key) are refused:
# the params schema forbids unknown keys and has no optional ones.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=.*$", re.S)


class DvcFailed(StageError):
    """A `dvc` command exited non-zero; `stage` names the stage it was running (or None)."""

    def __init__(self, stage: str | None, command: list[str], returncode: int, tail: list[str]):
        self.stage, self.command, self.returncode, self.tail = stage, command, returncode, tail
        what = f"stage {stage!r}" if stage else " ".join(command)
        last = "\n  ".join(tail) or "(no output)"
        super().__init__(f"{what} failed (dvc exit status {returncode}); last output:\n  {last}")


def repo_root(repo: str | os.PathLike = ".") -> Path:
    root = Path(repo).resolve()
    if not (root / "dvc.yaml").is_file():
        raise StageError(f"{root} has no dvc.yaml: pass the repository root (flow parameter `repo`)")
    return root


def stage_order(repo: str | os.PathLike = ".") -> list[str]:
    """Names of the pipeline stages (as `dvc repro` takes them), every stage after its dependencies,
    from `dvc dag --dot`; ties keep the order of dvc.yaml, so the run order is stable from run to run.
    `foreach` stages appear expanded (`download@cifar10`)."""
    dot = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=repo_root(repo), capture_output=True,
                         text=True)
    if dot.returncode != 0:
        raise StageError(f"`dvc dag` failed: {dot.stderr.strip() or dot.stdout.strip()}")
    nodes = re.findall(r'^"([^"]+)";$', dot.stdout, re.M)  # in dvc.yaml's order
    needs = {node: set() for node in nodes}
    for before, after in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot.stdout, re.M):
        needs[after].add(before)
    order: list[str] = []
    while len(order) < len(nodes):  # the first stage (in dvc.yaml's order) whose dependencies have run
        order.append(next(n for n in nodes if n not in order and needs[n] <= set(order)))
    return order


def _plain(overrides: list[str]) -> list[str]:
    """The overrides without DVC's `params.yaml:` prefix (the only params file this pipeline reads)."""
    overrides = [item.removeprefix(f"{params.PARAMS_FILE}:") for item in overrides]
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise StageError(f"override {item!r}: expected key=value or params.yaml:key=value, as after "
                             f"`dvc exp run -S` (e.g. lr=0.01)")
    return overrides


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One list of overrides per experiment: `lr=0.001,0.003` and `lr=range(1,3)` (Hydra sweeps, as
    `dvc exp run -S` takes them) give one experiment per value, several sweeps their product.
    Without a sweep: `[overrides]`, one experiment (or one plain run when `overrides` is empty)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import get_hydra_sweeps

    overrides = _plain(overrides)
    if not overrides:
        return [[]]
    try:
        combinations = get_hydra_sweeps({params.PARAMS_FILE: overrides})
    except InvalidArgumentError as exc:  # a glob sweep
        raise StageError(f"overrides {' '.join(overrides)}: {exc}") from None
    except Exception as exc:  # Hydra's parser: its message names the position of the error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"overrides {' '.join(overrides)}: {first}") from None
    return [combination[params.PARAMS_FILE] for combination in combinations]


def _params_after(root: Path, overrides: list[str]) -> tuple[str, params.Params]:
    """params.yaml text with `overrides` applied (to a copy), and its validated content."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply

    overrides = _plain(overrides)
    for item in overrides:
        if len(expand_sweeps([item])) > 1:  # one experiment's overrides: a sweep is expanded before
            raise StageError(f"override {item!r} is a sweep (several values): expand it with "
                             f"`pipeline.expand_sweeps` first, one experiment per value")
    source = root / params.PARAMS_FILE
    with tempfile.TemporaryDirectory(prefix="ptpipe-params-") as tmp:
        copy = Path(tmp) / params.PARAMS_FILE  # same name: DVC picks its YAML writer by suffix
        shutil.copyfile(source, copy)
        for item in overrides:  # one at a time, so the error names the override at fault
            try:
                dvc_apply(copy, [item])
            except InvalidArgumentError as exc:
                cause = exc.__cause__ or exc
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                raise StageError(f"override {item!r}: {first} (keys must already exist in params.yaml)") from None
        text = copy.read_text(encoding="utf-8")
    label = f"params.yaml with {' '.join(overrides)}" if overrides else "params.yaml"
    return text, params.parse(yaml.safe_load(text), label)


def check_overrides(repo: str | os.PathLike, overrides: list[str]) -> params.Params:
    """Validate `overrides` against the params schema without touching the workspace."""
    root = repo_root(repo)
    params.load(root / params.PARAMS_FILE)  # the unmodified file must be valid too
    return _params_after(root, overrides)[1]


def apply_overrides(repo: str | os.PathLike, overrides: list[str]) -> None:
    """Write `overrides` into `repo`'s params.yaml (validated first; one atomic rename)."""
    if not overrides:
        return
    root = repo_root(repo)
    text, _ = _params_after(root, overrides)
    files.write_text(root / params.PARAMS_FILE, text)


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip()}")
    return out.stdout


def _git_kept_outputs(root: Path) -> list[str]:
    """dvc.lock and the stage outputs git keeps (`cache: false`): what a run in place rewrites."""
    from dvc.repo import Repo

    with Repo(str(root)) as dvc_repo:
        outs = [Path(out.fs_path) for out in dvc_repo.index.outs if not out.use_cache]
    return ["dvc.lock"] + sorted(out.relative_to(root).as_posix() for out in outs)


def commit_results(repo: str | os.PathLike, message: str) -> bool:
    """Commit what a run in place rewrote (dvc.lock, the outputs git keeps); False when nothing changed.
    A release is a commit whose dvc.lock names the model's files: the promotion gate needs this one."""
    root = repo_root(repo)
    _git(root, "add", "--", *[p for p in _git_kept_outputs(root) if (root / p).exists()])
    if not _git(root, "diff", "--cached", "--name-only").strip():
        return False
    _git(root, "commit", "-q", "-m", message)
    return True


def uncommitted_inputs(repo: str | os.PathLike) -> list[str]:
    """Tracked files that differ from the last commit, except what the pipeline itself rewrites
    (dvc.lock, `cache: false` outputs): non-empty means the workspace is not the committed state."""
    root = repo_root(repo)
    changed = [line for line in _git(root, "diff", "--name-only", "HEAD").splitlines() if line]
    outputs = _git_kept_outputs(root)
    return [path for path in changed if not any(path == out or path.startswith(out + "/") for out in outputs)]


# Where `temporary_copy` puts its worktrees: inside the repository's own ignored .dvc/tmp (what
# `dvc exp run --temp` uses too), so a copy left by a killed run is found and removed by the next.
COPIES_DIR = Path(".dvc") / "tmp" / "ptpipe-retrain"


@contextlib.contextmanager
def temporary_copy(repo: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[Path]:
    """A git worktree of `repo`'s HEAD with its outputs checked out from `repo`'s DVC cache.

    It shares the repository's git objects and refs (so `dvc exp save` there records an
    experiment `dvc exp show` lists here) and its DVC cache (so unchanged stages are not rerun
    and `dvc exp apply` finds the outputs); uncommitted edits of the workspace are not in it.
    Removed on exit, failed or not; copies left by a killed run are removed on entry."""
    root = repo_root(repo)
    copies = root / COPIES_DIR
    for stale in sorted(copies.glob("*")) if copies.is_dir() else []:  # runs hold one slot: none is live
        log(f"removing {stale}, left by an earlier run that did not finish")
        shutil.rmtree(stale, ignore_errors=True)
    _git(root, "worktree", "prune")
    path = copies / uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", str(path), "HEAD")
    try:
        cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        run_dvc(["config", "--local", "cache.dir", cache], path, log)
        if (path / "dvc.lock").is_file():  # outputs not in the cache: their stages rerun
            run_dvc(["checkout", "--allow-missing"], path, log)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _git(root, "worktree", "prune")


def run_dvc(
    args: list[str],
    repo: str | os.PathLike,
    log: Callable[[str], None] = print,
    stage: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run `dvc <args>` in `repo`, handing each output line to `log` as it comes."""
    command = [sys.executable, "-m", "dvc", *args]
    run_env = {
        **os.environ,
        # Progress bars redrawn with \r would become one log line per redraw: ask tqdm
        # (>= 4.66 reads TQDM_* defaults from the environment) for one every 30 s at most.
        "TQDM_MININTERVAL": "30",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(
        command,
        cwd=repo_root(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        env=run_env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode turns \r into line breaks too
            line = line.rstrip()
            if line:
                tail.append(line)
                log(line)
        returncode = proc.wait()
    if returncode != 0:
        raise DvcFailed(stage, ["dvc", *args], returncode, list(tail))


def repro_stage(repo: str | os.PathLike, stage: str, log: Callable[[str], None] = print) -> None:
    """`dvc repro --single-item <stage>`: callers run stages in `stage_order`."""
    run_dvc(["repro", "--single-item", stage], repo, log, stage=stage)


def _dvc_json(args: list[str], repo: str | os.PathLike) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args, "--json"],
        cwd=repo_root(repo),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise StageError(f"dvc {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    text = out.stdout.strip()
    return json.loads(text) if text else {}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def metrics(repo: str | os.PathLike = ".") -> dict[str, dict[str, object]]:
    """Workspace metrics from `dvc metrics show --json`: {metrics file: {dotted key: value}}."""
    shown = _dvc_json(["metrics", "show"], repo)
    # {"<rev>": {"data": {"<file>": {"data": {...}} | {"error": ...}}}}
    workspace = shown.get("workspace", next(iter(shown.values()), {})) if shown else {}
    result = {}
    for path, entry in (workspace.get("data") or {}).items():
        if "data" in entry:
            result[path] = _flatten(entry["data"])
    return result


def params_changed(repo: str | os.PathLike = ".") -> dict[str, dict[str, object]]:
    """`dvc params diff --json`: workspace vs the last commit, {file: {key: {old, new}}}."""
    return _dvc_json(["params", "diff"], repo)


def revision(repo: str | os.PathLike = ".") -> dict[str, object]:
    """Where the result came from: git commit, uncommitted changes, dvc.lock digest, DVC version."""
    import dvc

    root = repo_root(repo)

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    lock = root / "dvc.lock"
    return {
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "dvc_lock_md5": hashlib.md5(lock.read_bytes()).hexdigest() if lock.is_file() else None,
        "dvc_version": dvc.__version__,
    }


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def report_markdown(
    stages: Iterable[str],
    overrides: list[str],
    metrics_: dict[str, dict[str, object]],
    changed: dict[str, dict[str, object]],
    rev: dict[str, object],
    experiment: str | None = None,
) -> str:
    """The retrain artifact: revision, params changed, metrics (one table each)."""
    lines = ["# Retrain", ""]
    lines += ["| revision | |", "|---|---|"]
    for key, value in rev.items():
        lines.append(f"| {key} | {_cell(value)} |")
    if experiment:
        lines.append(f"| experiment | {_cell(experiment)} |")
    lines.append(f"| stages | {_cell(', '.join(stages))} |")
    lines += ["", "## Params changed", ""]
    if overrides:
        lines.append("Overrides: " + ", ".join(f"`{o}`" for o in overrides))
        lines.append("")
    lines += _table(["file", "param", "old", "new"],
                    [(f, k, d.get("old"), d.get("new")) for f, keys in changed.items() for k, d in keys.items()],
                    "none (params.yaml as committed)")
    lines += ["", "## Metrics", ""]
    lines += _table(["file", "metric", "value"],
                    [(f, k, v) for f, keys in metrics_.items() for k, v in keys.items()],
                    "no metrics declared in dvc.yaml yet")
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[tuple], empty: str) -> list[str]:
    """Markdown table lines for `rows` (cells through `_cell`), or the one line `empty`."""
    if not rows:
        return [empty]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key for `name` (keys are lowercase ASCII letters, digits and dashes): `<prefix>-<name>`."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
