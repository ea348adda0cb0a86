"""`ptpipe tune`: an Optuna study whose every trial is a DVC experiment.

    ptpipe tune [--workers 2] [--storage postgresql+psycopg://...] [--push origin]

The search is the `tune` section of params.yaml (docs/tune.md): params named by their dotted path,
the stages a trial reproduces, the metric it is judged by. Optuna's TPE sampler proposes the params;
trial n runs as `dvc exp run --temp -n <study>-<n> -S key=value ... <targets>` (DVC's own temporary
copy of the committed state, sharing the DVC cache), so `dvc exp show` lists it and
`dvc exp apply <study>-<n>` brings it into the workspace. The workspace itself is never changed.

- Pruning: while a trial runs, the per-epoch TSV DVCLive writes in its copy (`tune.prune.curve`) is
  read as it grows and reported to Optuna; a trial the pruner stops gets SIGINT (its whole process
  group: dvc and the stage), so the stage exits, DVC removes the copy and records no experiment and
  nothing reaches the cache; the trial is recorded as pruned.
- Workers: `--workers N` threads, each running one trial's `dvc exp run` at a time.
- Storage: an Optuna JournalStorage file under .dvc/tmp/tune/ by default, or any storage URL
  (e.g. PostgreSQL) shared by several machines, each pushing its experiments (`--push REMOTE`:
  `dvc exp push`, the git refs and the DVC outputs).
- Resume: a trial is RUNNING in the storage from the moment it is asked for until its result is
  told. A RUNNING trial whose process is gone (same host: its pid is dead; another host: no
  heartbeat for `stale_after_s`) is taken over by the next `ptpipe tune`: if its experiment exists
  (it finished, the result was not yet told) the result is read from it; otherwise it runs again
  under the same number and params. So a study killed with SIGKILL loses no trial and runs none twice.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ptpipe import files, params, pipeline
from ptpipe.stage import StageError

STATE_DIR = Path(".dvc") / "tmp" / "tune"  # default storage and trial logs: git-ignored, DVC's scratch space
HOST = socket.gethostname()
HEARTBEAT_S = 10.0  # how often a running trial says it is alive (for takeover from another host)


# -- the search, checked before anything runs ------------------------------------------------------

def _error(key: str, message: str) -> StageError:
    return StageError(f"invalid params\n  params.yaml: tune.{key}: {message}")


def _lookup(raw: dict, dotted: str) -> tuple[bool, object]:
    node: object = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def override(key: str, value: object) -> str:
    """`key=value` as `dvc exp run -S` parses it back to the same value and type."""
    if isinstance(value, str):
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"  # quoted: 'true' stays a string
    elif value is None or isinstance(value, (bool, list)):
        text = json.dumps(value)
    else:
        text = repr(value)  # int, or float with every digit (1e-05, 0.0123)
    return f"{key}={text}"


def _fits(dist: params.Distribution, current: object) -> bool:
    """Whether the value params.yaml has now is of the kind the distribution proposes."""
    if dist.type == "categorical":
        return not isinstance(current, (dict, list))
    if dist.type == "int":
        return isinstance(current, int) and not isinstance(current, bool)
    return current is None or (isinstance(current, (int, float)) and not isinstance(current, bool))


def _candidates(dist: params.Distribution) -> list[object]:
    if dist.type == "categorical":
        return list(dist.choices)
    cast = int if dist.type == "int" else float
    return [cast(dist.low), cast(dist.high)]


def check_search(root: Path, tune: params.Tune) -> None:
    """Every searched and fixed key exists in params.yaml, holds a value of the distribution's kind,
    and each end of its range (each choice) passes the params schema with the fixed overrides."""
    raw = yaml.safe_load((root / params.PARAMS_FILE).read_text(encoding="utf-8"))
    fixed = [override(k, v) for k, v in tune.fixed.items()]
    for section, keys in (("fixed", tune.fixed), ("space", tune.space)):
        for key in keys:
            found, current = _lookup(raw, key)
            if not found or key.split(".")[0] == "tune":
                raise _error(f"{section}.{key}", "no such key in params.yaml (name a param by its dotted path, "
                                                 "e.g. recipes.lstm.default.lr)")
            if section == "space" and not _fits(tune.space[key], current):
                raise _error(f"space.{key}", f"a {tune.space[key].type} range for {current!r} "
                                             f"({type(current).__name__}): use type: categorical, or another key")
    checks = [(f"fixed.{key}", value, [override(key, value)]) for key, value in tune.fixed.items()]
    checks += [(f"space.{key}", value, [*fixed, override(key, value)])
               for key, dist in tune.space.items() for value in _candidates(dist)]
    for where, value, overrides in checks:
        try:
            pipeline.check_overrides(root, overrides)
        except StageError as exc:
            # "params.yaml with k=v: lstm.lr: Input should be ..." -> the schema's key and reason
            reason = str(exc).splitlines()[-1].strip().split(": ", 1)[-1]
            raise _error(where, f"{value!r} is refused by the schema: {reason}") from None


def check_pipeline(root: Path, tune: params.Tune) -> None:
    """The targets are stages of dvc.yaml and the metric file is one of its metrics."""
    from dvc.repo import Repo

    stages = pipeline.stage_order(root)
    for target in tune.targets:
        if target not in stages and not any(s.startswith(f"{target}@") for s in stages):
            raise _error("targets", f"{target!r} is not a stage of dvc.yaml ({', '.join(stages)})")
    with Repo(str(root)) as repo:
        declared = sorted(Path(o.fs_path).relative_to(root).as_posix() for o in repo.index.outs if o.metric)
    if tune.metric.file not in declared:
        raise _error("metric.file", f"{tune.metric.file!r} is not a metrics file of dvc.yaml "
                                    f"(`dvc exp show` records only those: {', '.join(declared)})")
    if tune.prune is not None and (Path(tune.prune.curve).is_absolute() or ".." in Path(tune.prune.curve).parts):
        raise _error("prune.curve", "must be a path below the repository root, as the stage writes it")


def load(repo: str | os.PathLike = ".") -> tuple[Path, params.Tune]:
    """(repository root, the validated `tune` section): every check that needs no storage."""
    root = pipeline.repo_root(repo)
    tune = params.load(root / params.PARAMS_FILE).tune
    if tune is None:
        raise StageError("params.yaml has no `tune` section: add one (docs/tune.md has an example)")
    check_search(root, tune)
    check_pipeline(root, tune)
    return root, tune


# -- the study's storage ---------------------------------------------------------------------------

def storage_for(root: Path, tune: params.Tune, storage: str | None):
    """An Optuna storage: a journal file (default .dvc/tmp/tune/<study>.journal, or the path given),
    or an RDB URL (`postgresql+psycopg://user@host/db`, `sqlite:///file.db`)."""
    import optuna

    if storage and "://" in storage:
        if storage.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; we install psycopg 3
            storage = "postgresql+psycopg://" + storage[len("postgresql://"):]
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:  # noqa: BLE001 - a wrong host, password or driver: say which storage
            raise StageError(f"--storage {shown(storage)}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    path = Path(storage) if storage else root / STATE_DIR / f"{tune.study}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def shown(storage: str) -> str:
    """A storage URL with its password hidden, for messages and logs."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def _search_record(tune: params.Tune, baseline: str) -> dict:
    # What must not change while a study goes on: trials of another search or baseline are not comparable.
    return {"baseline": baseline, "targets": tune.targets, "metric": tune.metric.model_dump(),
            "fixed": tune.fixed, "space": {k: v.model_dump() for k, v in tune.space.items()}}


def open_study(root: Path, tune: params.Tune, storage: str | None):
    """Create the study (seeded sampler) or join it (a sampler seeded apart from the other processes',
    so two workers never propose the same random start), refusing one started on another search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage_for(root, tune, storage)
    baseline = pipeline._git(root, "rev-parse", "HEAD").strip()
    record = _search_record(tune, baseline)
    pruner = _pruner(tune.prune, tune.direction)
    try:
        study = optuna.create_study(storage=store, study_name=tune.study, direction=tune.direction, pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=tune.seed))
        study.set_user_attr("search", record)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    seed = (tune.seed * 1_000_003 + hash((HOST, os.getpid()))) % 2**32
    study = optuna.load_study(study_name=tune.study, storage=store, pruner=pruner,
                              sampler=optuna.samplers.TPESampler(seed=seed))
    earlier = study.user_attrs.get("search")
    if earlier is not None and earlier != record:
        changed = [k for k in record if earlier.get(k) != record[k]]
        raise StageError(f"study {tune.study!r} in {shown(str(storage or 'the default storage'))} was started with "
                         f"another {', '.join(changed)} (baseline commit {earlier['baseline'][:8]}): its trials "
                         f"are not comparable; rename tune.study to start a new study")
    if study.direction.name.lower() != tune.direction:
        raise StageError(f"study {tune.study!r} maximizes/minimizes otherwise than tune.direction: rename tune.study")
    return study


def _pruner(prune: params.TunePrune | None, direction: str):
    import optuna

    if prune is None or prune.pruner == "none":
        return optuna.pruners.NopPruner()
    if prune.pruner == "threshold":  # worse than the threshold: above it when minimizing, below when maximizing
        side = "upper" if direction == "minimize" else "lower"
        return optuna.pruners.ThresholdPruner(**{side: prune.threshold}, n_warmup_steps=prune.warmup_epochs)
    # percentile p: a trial whose epoch is worse than the best p% of finished trials' same epoch stops
    # (median = percentile 50); optuna orients it by the study's direction
    return optuna.pruners.PercentilePruner(50.0 if prune.pruner == "median" else prune.percentile,
                                           n_startup_trials=prune.startup_trials, n_warmup_steps=prune.warmup_epochs)


# -- experiments, as DVC lists them ----------------------------------------------------------------

def experiments(root: Path) -> dict[str, dict]:
    """{name: {rev, params, metrics}} of the experiments on HEAD, from `dvc exp show --json`
    (params: params.yaml flattened to dotted keys; metrics: {file: flattened data})."""
    shown_json = pipeline._dvc_json(["exp", "show", "--no-fetch"], root) or []
    result = {}
    for baseline in shown_json:
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            if not exp.get("name") or not data:
                continue
            result[exp["name"]] = {
                "rev": rev.get("rev"),
                "params": pipeline._flatten(((data.get("params") or {}).get(params.PARAMS_FILE) or {}).get("data") or {}),
                "metrics": {f: pipeline._flatten(m["data"]) for f, m in (data.get("metrics") or {}).items() if "data" in m},
            }
    return result


def metric_of(experiment: dict, tune: params.Tune) -> float:
    value = experiment["metrics"].get(tune.metric.file, {}).get(tune.metric.key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise StageError(f"the experiment has no number at {tune.metric.file}:{tune.metric.key} (got {value!r}): "
                         f"check tune.metric against what the targets write")
    return float(value)


# -- running one trial -----------------------------------------------------------------------------

def _suggest(trial, space: dict[str, params.Distribution]) -> dict[str, object]:
    # On a trial taken over after a kill, suggest_* returns the value it was given the first time.
    values = {}
    for key, d in space.items():
        if d.type == "categorical":
            values[key] = trial.suggest_categorical(key, d.choices)
        elif d.type == "int":
            values[key] = trial.suggest_int(key, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return values


def _process(pid: int | None, started: float | None):
    """The psutil.Process with that pid and start time, or None (gone, or the pid reused)."""
    import psutil

    try:
        proc = psutil.Process(pid) if pid else None
        return proc if proc is not None and abs(proc.create_time() - (started or 0)) < 1e-3 else None
    except psutil.Error:
        return None


def _temp_copy(proc: subprocess.Popen, root: Path) -> Path | None:
    """The folder `dvc exp run --temp` runs the stages in: the working directory of its stage process."""
    import psutil

    exps = root / ".dvc" / "tmp" / "exps"
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            cwd = Path(child.cwd())
        except psutil.Error:
            continue
        if exps in cwd.parents:
            return Path(*cwd.parts[:len(exps.parts) + 2])  # .dvc/tmp/exps/<queue>/<tmpXXXX>
    return None


def _new_rows(path: Path, seen: int) -> list[tuple[int, float]]:
    """(step, value) rows of a DVCLive TSV after the first `seen`, complete lines only."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = text.split("\n")[1:-1]  # header; the last element is "" or a line still being written
    rows = []
    for line in lines[seen:]:
        cells = line.split("\t")
        rows.append((int(float(cells[0])), float(cells[-1])))
    return rows


def _stop(proc: subprocess.Popen, copy: Path | None) -> None:
    """End a trial cleanly: SIGINT to its process group (dvc and the stage), so the stage stops, DVC
    removes its temporary copy and records nothing; SIGKILL only if that takes over a minute."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if copy is not None:
        shutil.rmtree(copy, ignore_errors=True)  # only left by a SIGKILL: DVC had no chance to remove it


@dataclass
class Study:
    """What the workers share: the study, the search and how far the study is."""

    root: Path
    tune: params.Tune
    study: object  # optuna.Study
    push: str | None = None
    log: Callable[[str], None] = print
    stale_after_s: float = 300.0
    poll_s: float = 0.5
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def name(self, number: int) -> str:
        return f"{self.tune.study}-{number}"


def _claim(s: Study):
    """The next trial this worker runs: a stale one to take over, a new one, or None (study done)."""
    import optuna
    from optuna.trial import TrialState

    with s.lock:
        trials = s.study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == TrialState.RUNNING and _is_stale(frozen, s.stale_after_s):
                trial = optuna.trial.Trial(s.study, frozen._trial_id)
                _end_orphan(frozen)
                s.log(f"{s.name(frozen.number)}: taking over (its process is gone)")
                break
        else:
            if len(trials) >= s.tune.trials:  # finished ones and those running elsewhere: the budget is spent
                return None
            trial = s.study.ask()
        _mark(trial, attempts=trial.user_attrs.get("attempts", 0) + 1)
        values = _suggest(trial, s.tune.space)  # proposed under the lock: the sampler sees every earlier trial
    return trial, values


def _mark(trial, **extra) -> None:
    import psutil

    me = psutil.Process()
    for key, value in {"host": HOST, "pid": me.pid, "pid_started": me.create_time(),
                       "heartbeat": time.time(), **extra}.items():
        trial.set_user_attr(key, value)


def _is_stale(frozen, stale_after_s: float) -> bool:
    attrs = frozen.user_attrs
    if attrs.get("host") == HOST:
        return _process(attrs.get("pid"), attrs.get("pid_started")) is None
    return time.time() - attrs.get("heartbeat", 0.0) > stale_after_s


def _end_orphan(frozen) -> None:
    """A trial's `dvc exp run` outlives a killed `ptpipe tune` (it has its own process group): end it
    before the trial is run again, so it cannot record an experiment of the same name meanwhile."""
    attrs = frozen.user_attrs
    orphan = _process(attrs.get("proc"), attrs.get("proc_started")) if attrs.get("host") == HOST else None
    if orphan is not None:
        import psutil

        os.killpg(orphan.pid, signal.SIGINT)
        try:
            orphan.wait(timeout=60)
        except psutil.TimeoutExpired:
            os.killpg(orphan.pid, signal.SIGKILL)


def _worker(s: Study) -> None:
    try:
        while not s.stopping.is_set():
            claimed = _claim(s)
            if claimed is None:
                return
            _run_trial(s, *claimed)
    except BaseException as exc:  # noqa: BLE001 - a bug or a storage error: stop the others, report it
        s.errors.append(exc)
        s.stopping.set()


def _run_trial(s: Study, trial, values: dict[str, object]) -> None:
    from optuna.trial import TrialState

    name = s.name(trial.number)
    trial.set_user_attr("experiment", name)
    existing = experiments(s.root).get(name)
    if existing is None:  # (it exists when an earlier process ran it and was killed before telling the result)
        overrides = [override(k, v) for k, v in {**s.tune.fixed, **values}.items()]
        s.log(f"{name}: {' '.join(overrides[len(s.tune.fixed):])}")
        outcome = _execute(s, trial, name, overrides)
        if outcome != "done":
            if outcome == "pruned":
                s.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            return  # "stopped": left RUNNING, for the next `ptpipe tune` to take over
        existing = experiments(s.root).get(name)
        if existing is None:
            return _fail(s, trial, f"dvc exp run succeeded but `dvc exp show` has no experiment {name}")
    elif not _same_params(existing["params"], {**s.tune.fixed, **values}):
        raise StageError(f"experiment {name} exists with other params than trial {trial.number} of study "
                         f"{s.tune.study!r} (an earlier study of that name whose storage is gone?): rename "
                         f"tune.study, or remove the old experiments (`dvc exp remove {name} ...`)")
    try:
        value = metric_of(existing, s.tune)
    except StageError as exc:
        return _fail(s, trial, str(exc))
    _report_curve(s, trial, existing["rev"])
    if s.push:
        try:
            pipeline.run_dvc(["exp", "push", s.push, name], s.root, log=lambda line: None)
        except StageError as exc:  # the trial stands (its experiment is here): push it by hand later
            trial.set_user_attr("push_error", str(exc)[-500:])
            s.log(f"{name}: not pushed ({str(exc).splitlines()[0]}); later: dvc exp push {s.push} {name}")
    s.study.tell(trial, value, skip_if_finished=True)
    s.log(f"{name}: {s.tune.metric.key} = {value:.6g}")


def _same_params(recorded: dict, wanted: dict) -> bool:
    import math

    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
        return a == b
    return all(same(recorded.get(k), v) for k, v in wanted.items())


def _report_curve(s: Study, trial, rev: str) -> None:
    """Report the epochs the polling missed (a trial can end between two looks) from the curve as the
    experiment's commit has it: the median pruner compares later trials with every epoch of this one."""
    if s.tune.prune is None:
        return
    shown_curve = subprocess.run(["git", "show", f"{rev}:{s.tune.prune.curve}"], cwd=s.root, capture_output=True,
                                 text=True)
    if shown_curve.returncode != 0:
        return  # the curve is not in git (a cached output): the epochs reported while it ran stand
    rows = [line.split("\t") for line in shown_curve.stdout.splitlines()[1:] if line]
    reported = next(t for t in s.study.get_trials(deepcopy=False) if t.number == trial.number).intermediate_values
    for cells in rows:
        step = int(float(cells[0]))
        if step not in reported:
            trial.report(float(cells[-1]), step)
    trial.set_user_attr("epochs", len(rows))


def _fail(s: Study, trial, reason: str) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("error", reason[-2000:])
    s.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    s.log(f"{s.name(trial.number)} failed: {reason}")


def _execute(s: Study, trial, name: str, overrides: list[str]) -> str:
    """Run the trial's `dvc exp run --temp`, reporting its curve: "done", "failed", "pruned" or "stopped"."""
    logs = s.root / STATE_DIR / s.tune.study
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name,
               *[arg for o in overrides for arg in ("-S", o)], *s.tune.targets]
    env = {**os.environ, "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1"}
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(command, cwd=s.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # its own group: a prune stops all of it
    import psutil

    trial.set_user_attr("proc", proc.pid)
    trial.set_user_attr("proc_started", psutil.Process(proc.pid).create_time())
    copy, seen, beat = None, 0, time.monotonic()
    while proc.poll() is None:
        time.sleep(s.poll_s)
        if s.stopping.is_set():
            _stop(proc, copy)
            return "stopped"
        if time.monotonic() - beat > HEARTBEAT_S:
            trial.set_user_attr("heartbeat", time.time())
            beat = time.monotonic()
        copy = copy or _temp_copy(proc, s.root)
        if copy is None or s.tune.prune is None:
            continue
        for step, value in _new_rows(copy / s.tune.prune.curve, seen):
            seen += 1
            trial.report(value, step)
            if trial.should_prune():
                _stop(proc, copy)
                trial.set_user_attr("epochs", seen)
                s.log(f"{name}: pruned after {seen} epochs ({value:.6g})")
                return "pruned"
    trial.set_user_attr("epochs", seen)
    if proc.returncode != 0:
        tail = deque((logs / f"{name}.log").read_text(errors="replace").replace("\r", "\n").splitlines(), maxlen=8)
        _fail(s, trial, f"dvc exp run exited {proc.returncode}; last output:\n  " + "\n  ".join(tail))
        return "failed"
    return "done"


# -- the study as a whole --------------------------------------------------------------------------

def run(repo: str | os.PathLike = ".", workers: int = 1, storage: str | None = None, push: str | None = None,
        report_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print,
        stale_after_s: float = 300.0) -> dict:
    """Run (or resume, or join) the study of params.yaml's `tune` section until it has `tune.trials`
    trials; write the report. Returns the report's summary (`summary`)."""
    if workers < 1:
        raise StageError(f"--workers must be 1 or more, got {workers}")
    root, tune = load(repo)  # every check before anything runs
    changed = pipeline.uncommitted_inputs(root)
    if changed:
        raise StageError(f"the workspace is not the committed state ({', '.join(changed)} changed): every trial is "
                         f"the last commit plus its -S overrides, the same on every machine; commit first")
    if push and push not in pipeline._git(root, "remote").split():
        raise StageError(f"--push {push}: no such git remote (`git remote -v` lists them)")
    study = open_study(root, tune, storage)
    s = Study(root, tune, study, push=push, log=log, stale_after_s=stale_after_s)
    log(f"study {tune.study!r} in {shown(storage) if storage else root / STATE_DIR / (tune.study + '.journal')}: "
        f"{len(study.trials)} of {tune.trials} trials there; {workers} worker(s)")
    threads = [threading.Thread(target=_worker, args=(s,), name=f"tune-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        s.stopping.set()  # each worker stops its trial (SIGINT to its group) and leaves it RUNNING
        for t in threads:
            t.join()
        raise StageError("interrupted: the running trials were stopped; run the same command to resume them") from None
    if s.errors:
        raise s.errors[0]
    return write_report(root, study, tune, Path(report_dir) if report_dir else None, log)


# -- the report ------------------------------------------------------------------------------------

def summary(study, tune: params.Tune) -> dict:
    """Best trial, counts and one row per trial: what the report files and the Prefect artifact show."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "experiment": t.user_attrs.get("experiment", f"{tune.study}-{t.number}"),
                     "state": t.state.name.lower(), "value": t.value, "epochs": t.user_attrs.get("epochs"),
                     "params": t.params, "seconds": t.duration.total_seconds() if t.duration else None,
                     "error": t.user_attrs.get("error"),
                     "started": t.datetime_start.timestamp() if t.datetime_start else None,
                     "curve": [t.intermediate_values[k] for k in sorted(t.intermediate_values)]})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "experiment": b.user_attrs.get("experiment"), "value": b.value, "params": b.params}
    counts = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "fail", "running")}
    return {"study": tune.study, "direction": tune.direction, "metric": tune.metric.model_dump(),
            "trials_wanted": tune.trials, "counts": counts,
            "trial_epochs": sum(r["epochs"] or 0 for r in rows), "best": best, "trials": rows}


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))


def report_markdown(info: dict, images: dict[str, str]) -> str:
    """The report as markdown; `images` maps a title to the image source (a file name, or a data: URI)."""
    lines = [f"# Study `{info['study']}`", ""]
    best, counts = info["best"], info["counts"]
    metric = f"{info['metric']['file']}:{info['metric']['key']}"
    if best:
        lines += [f"Best: trial {best['number']} (`{best['experiment']}`), {metric} = **{best['value']:.6g}** "
                  f"({info['direction']}). Bring it into the workspace: `dvc exp apply {best['experiment']}`.", "",
                  "| param | value |", "|---|---|", *[f"| `{k}` | {_cell(v)} |" for k, v in best["params"].items()], ""]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += [f"{len(info['trials'])} of {info['trials_wanted']} trials: {counts['complete']} complete, "
              f"{counts['pruned']} pruned, {counts['fail']} failed, {counts['running']} running; "
              f"{info['trial_epochs']} trial-epochs in all.", ""]
    keys = sorted({k for r in info["trials"] for k in r["params"]})
    lines += ["| trial | experiment | state | value | epochs | " + " | ".join(f"`{k}`" for k in keys) + " |",
              "|---" * (5 + len(keys)) + "|"]
    for r in info["trials"]:
        lines.append(f"| {r['number']} | {r['experiment']} | {r['state']} | {_cell(r['value'])} | {_cell(r['epochs'])} | "
                     + " | ".join(_cell(r["params"].get(k)) for k in keys) + " |")
    for r in info["trials"]:
        if r["error"]:
            lines += ["", f"Trial {r['number']} failed:", "", "```", r["error"], "```"]
    for title, src in images.items():
        lines += ["", f"## {title}", "", f"![{title}]({src})"]
    return "\n".join(lines) + "\n"


PLOTS = {  # file -> (title, the optuna.visualization.matplotlib function, completed trials it needs, x label)
    "history.png": ("Optimisation history", "plot_optimization_history", 1, "trial"),
    "importances.png": ("Parameter importances (fANOVA over the completed trials)", "plot_param_importances", 2, None),
    "curves.png": ("Per-epoch curves (pruned trials stop early)", "plot_intermediate_values", 1, "epoch (0 = the first)"),
}


def _plots(study, out: Path, complete: int, metric: str) -> dict[str, str]:
    """Optuna's matplotlib plots as PNG files (Agg: no display, no browser); {title: file name}."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    made = {}
    curves = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    for name, (title, function, needs, x_label) in PLOTS.items():
        if complete < needs or (name == "curves.png" and not curves):
            continue  # importances need two completed trials to compare; curves, a pruned study's reports
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            ax = getattr(optuna_plots, function)(study)
        if x_label:  # Optuna's generic "Objective Value" / "Step": say which metric, and that steps are epochs
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric)
        figure = ax.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        with files.atomic_path(out / name, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=100, format="png")
        plt.close(figure)
        made[title] = name
    return made


def write_report(root: Path, study, tune: params.Tune, out: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """reports/tune/<study>/: report.md, study.json (the summary) and the PNG plots, each written atomically."""
    out = out or root / "reports" / "tune" / tune.study
    info = summary(study, tune)
    images = _plots(study, out, info["counts"]["complete"], tune.metric.key)
    files.write_json(out / "study.json", info)
    files.write_text(out / "report.md", report_markdown(info, images))
    info["report_dir"] = str(out)
    info["images"] = {title: str(out / name) for title, name in images.items()}
    best = info["best"]
    log(f"report: {out / 'report.md'}" + (f"; best {best['experiment']} {tune.metric.key} = {best['value']:.6g}: "
                                           f"dvc exp apply {best['experiment']}" if best else ""))
    return info


def report_main(repo: str | os.PathLike = ".", storage: str | None = None,
                report_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """The report of a study as it stands, without running trials (`ptpipe tune --report-only`)."""
    import optuna

    root, tune = load(repo)
    try:
        study = optuna.load_study(study_name=tune.study, storage=storage_for(root, tune, storage))
    except KeyError:
        raise StageError(f"no study {tune.study!r} in {shown(storage) if storage else 'the default storage'}: "
                         f"run `ptpipe tune` first") from None
    return write_report(root, study, tune, Path(report_dir) if report_dir else None, log)
