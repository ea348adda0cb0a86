"""`ptpipe tune`: real Optuna, the real `dvc` CLI on temporary git repos, tiny data.

The fast tests check the search space against the project's own params.yaml and dvc.yaml (every bad
space a one-line error naming its key, before anything runs). The slow ones run studies whose trials
are real `dvc exp run --temp` experiments of the tiny LSTM: two workers with pruning, a SIGKILL and
resume, two clones sharing one study in a real PostgreSQL server.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fixtures import ROOT, TINY_TRAINING, alice_text, copy_project, md5, sh, tool_env, write_params
from test_flows import artifacts, client, free_port, load_flow_module, prefect_server  # noqa: F401 - fixtures
from ptpipe import pipeline, tune
from ptpipe.stage import StageError

CURVE = "dvclive/lstm/plots/metrics/val/bits_per_char.tsv"  # what train@lstm's DVCLive writes per epoch
BASELINE = "prepare@alice"  # the stage whose output every trial starts from (committed before the study)
MODEL = "models/lstm/model.pt"  # what the trial's stage writes (the applied experiment's model)
# The tests' study: the LSTM stage as it is named today (the lead renames it in this one place).
TINY_TUNE = {
    "tune.targets": ["train@lstm"],
    "tune.metric": {"file": "dvclive/lstm/metrics.json", "key": "val.bits_per_char"},
    "tune.fixed": {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 3},
    # adam learns the tiny text within an epoch (~2 bits/char), sgd does not (~4.4): the threshold pruner
    # stops every sgd trial after its second epoch, and the seeded sampler's first six draws hold both
    "tune.prune": {"curve": CURVE, "pruner": "threshold", "startup_trials": 0, "warmup_epochs": 1, "threshold": 3.5},
    "tune.space": {"recipes.lstm.default.lr": {"type": "float", "low": 0.005, "high": 0.03, "log": True},
                   "recipes.lstm.default.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}},
    "tune.seed": 0,
}


def tuned_project(repo: Path, trials: int, **extra) -> Path:
    """The project in a fresh git repo, tiny Alice from a file:// URL, prepared and committed (the
    baseline every trial starts from), with a tiny study in params.yaml."""
    repo.mkdir(parents=True)
    copy_project(repo)
    text = alice_text()
    (repo.parent / "pg11.txt").write_bytes(text)
    write_params(repo, **{"datasets.alice.url": f"file://{repo.parent / 'pg11.txt'}", "datasets.alice.md5": md5(text)},
                 **TINY_TRAINING, **{**TINY_TUNE, "tune.trials": trials, **extra})
    sh("dvc", "config", "--local", "cache.dir", str(repo.parent / "cache"), cwd=repo)
    sh("dvc", "repro", BASELINE, cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline: prepared data", cwd=repo)
    return repo


def ptpipe_tune(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "ptpipe.cli", "tune", *args, cwd=repo, **kwargs)


def study_of(repo: Path, storage: str | None = None):
    import optuna

    root, spec = tune.load(repo)
    return optuna.load_study(study_name=spec.study, storage=tune.storage_for(root, spec, storage))


def exps(repo: Path) -> dict[str, dict]:
    return tune.experiments(repo)


def assert_nothing_half_written(repo: Path, cache: Path) -> None:
    """No temporary copy left, the workspace as committed, every cache file whole (named by its md5)."""
    standalone = repo / ".dvc/tmp/exps/standalone"  # DVC's temporary copies (and its `run` records)
    if standalone.is_dir():
        assert [p.name for p in standalone.iterdir() if p.name != "run"] == []
    status = sh("git", "status", "--porcelain", "--untracked-files=all", cwd=repo).stdout.splitlines()
    assert [line for line in status if not line.endswith(".png") and "reports/tune/" not in line] == []
    for path in (cache / "files/md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name, path


def assert_every_finished_trial_is_its_experiment(repo: Path, study, fixed: dict) -> None:
    """Completed trial n <-> experiment <study>-n with the trial's params and value; no other experiment."""
    from optuna.trial import TrialState

    listed = exps(repo)
    complete = {f"{study.study_name}-{t.number}": t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert set(listed) == set(complete)
    metric = TINY_TUNE["tune.metric"]
    for name, trial in complete.items():
        assert listed[name]["metrics"][metric["file"]][metric["key"]] == pytest.approx(trial.value)
        for key, value in {**trial.params, **fixed}.items():
            assert listed[name]["params"][key] == pytest.approx(value) if isinstance(value, float) else value


# -- the search space, before anything runs --------------------------------------------------------

@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    """One copy of the project (git + dvc.yaml) whose params.yaml each test rewrites from the original."""
    repo = copy_project(tmp_path_factory.mktemp("tune-space") / "repo")
    original = (repo / "params.yaml").read_text()
    yield repo
    (repo / "params.yaml").write_text(original)


def test_the_shipped_tune_section_is_valid_against_params_and_dvc_yaml():
    root, spec = tune.load(ROOT)  # checks the targets are stages and the metric file a metric of dvc.yaml
    assert spec.targets and spec.space and root == ROOT


BAD_SPACES = [
    ({"tune.space": {"recipes.lstm.default.lrr": {"type": "float", "low": 0.001, "high": 0.01}}},
     "tune.space.recipes.lstm.default.lrr: no such key in params.yaml"),
    ({"tune.space": {"recipes.lstm.default.lr": {"type": "float", "low": 0.01, "high": 0.001}}},
     "tune.space.recipes.lstm.default.lr: empty range: low (0.01) must be below high (0.001)"),
    ({"tune.space": {"recipes.lstm.default.lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}},
     "tune.space.recipes.lstm.default.lr: log: true needs low > 0"),
    ({"tune.space": {"recipes.lstm.default.optimizer": {"type": "float", "low": 0.1, "high": 0.2}}},
     "tune.space.recipes.lstm.default.optimizer: a float range for 'adam' (str)"),
    ({"tune.space": {"recipes.lstm.default.batch_size": {"type": "int", "low": 8, "high": 32.5}}},
     "tune.space.recipes.lstm.default.batch_size: an int range needs whole numbers"),
    ({"tune.space": {"recipes.lstm.default.lr": {"type": "float", "low": 0.001, "high": 20.0}}},
     "tune.space.recipes.lstm.default.lr: 20.0 is refused by the schema: recipes.lstm.default.lr: Input should be less than or equal to 10"),
    ({"tune.space": {"recipes.lstm.default.optimizer": {"type": "categorical", "choices": ["adam", "adamx"]}}},
     "tune.space.recipes.lstm.default.optimizer: 'adamx' is refused by the schema: recipes.lstm.default.optimizer: Input should be"),
    ({"tune.space": {"recipes.lstm.default.hidden_size": {"type": "int", "low": 64, "high": 256}}},  # tie_weights needs 256
     "tune.space.recipes.lstm.default.hidden_size: 64 is refused by the schema: recipes.lstm.default: tie_weights: true needs embedding_size == hidden_size"),
    ({"tune.space": {"recipes.lstm.default.optimizer": {"type": "categorical", "choices": []}}},
     "tune.space.recipes.lstm.default.optimizer: empty choices"),
    ({"tune.space": {"recipes.lstm.default.lr": {"type": "uniform", "low": 0.001, "high": 0.01}}},
     "tune.space.recipes.lstm.default.lr.type: Input should be 'float', 'int' or 'categorical'"),
    ({"tune.space": {}}, "tune.space: Dictionary should have at least 1 item"),
    ({"tune.fixed": {"recipes.lstm.default.thread": 1}}, "tune.fixed.recipes.lstm.default.thread: no such key in params.yaml"),
    ({"tune.fixed": {"recipes.lstm.default.threads": -1}}, "tune.fixed.recipes.lstm.default.threads: -1 is refused by the schema: recipes.lstm.default.threads: Input should be greater than or equal to 0"),
    ({"tune.fixed": {"recipes.lstm.default.lr": 0.01}}, "tune: recipes.lstm.default.lr is both fixed and searched"),
    ({"tune.targets": ["train_lsmt"]}, "tune.targets: 'train_lsmt' is not a stage of dvc.yaml"),
    ({"tune.metric": {"file": "metrics/nope.json", "key": "x"}}, "tune.metric.file: 'metrics/nope.json' is not a metrics file"),
    ({"tune.prune.pruner": "threshold"}, "tune.prune: threshold is needed with pruner: threshold"),
    ({"tune.prune.percentile": None}, "tune.prune: percentile is needed with pruner: percentile"),
    ({"tune.prune.percentile": 100}, "tune.prune.percentile: Input should be less than 100"),
    ({"tune.study": "my study"}, "tune.study: String should match pattern"),
]


@pytest.mark.parametrize("change, message", BAD_SPACES, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_SPACES)])
def test_a_bad_search_space_is_one_line_naming_the_key_and_nothing_runs(project_copy, change, message):
    write_params(project_copy, **change)
    try:
        with pytest.raises(StageError) as err:
            tune.run(project_copy, workers=2)
        header, *lines = str(err.value).splitlines()
        assert header == "invalid params" and len(lines) == 1, str(err.value)
        assert f"params.yaml: {message}" in lines[0], lines[0]
        # no storage made, no trial run
        assert not (project_copy / tune.STATE_DIR).exists() and not (project_copy / ".dvc/tmp/exps").exists()
    finally:
        sh("git", "checkout", "params.yaml", cwd=project_copy)


def test_the_command_line_says_it_in_one_line_with_exit_status_2(project_copy, capsys):
    from ptpipe import cli

    write_params(project_copy, **BAD_SPACES[0][0])
    try:
        assert cli.main(["tune", "--repo", str(project_copy), "--workers", "2"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].strip().endswith(BAD_SPACES[0][1] + " (name a param by its dotted path, e.g. recipes.lstm.default.lr)")
        assert "Traceback" not in err
    finally:
        sh("git", "checkout", "params.yaml", cwd=project_copy)


def test_workers_below_one_and_a_missing_section_are_refused(project_copy, capsys):
    from ptpipe import cli

    with pytest.raises(SystemExit):
        cli.main(["tune", "--repo", str(project_copy), "--workers", "0"])
    assert "--workers must be 1 or more" in capsys.readouterr().err
    raw = yaml.safe_load((project_copy / "params.yaml").read_text())
    del raw["tune"]
    (project_copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        with pytest.raises(StageError, match="params.yaml has no `tune` section"):
            tune.run(project_copy)
    finally:
        sh("git", "checkout", "params.yaml", cwd=project_copy)


def test_overrides_come_back_from_dvcs_parser_with_their_value_and_type(project_copy):
    """What a trial passes to `dvc exp run -S` is read back by DVC as the value Optuna proposed."""
    values = {"recipes.lstm.default.lr": 1e-05, "recipes.lstm.default.dropout": 0.123456789012, "recipes.lstm.default.batch_size": 48, "recipes.lstm.default.optimizer": "adamw",
              "recipes.lstm.default.tie_weights": False, "recipes.lstm.default.embedding_size": 256, "recipes.lstm.default.clip": None, "evaluate.sample.prompt": "true", "evaluate.sample.length": 7}
    p = pipeline.check_overrides(project_copy, [tune.override(k, v) for k, v in values.items()])
    for key, value in values.items():
        if key.startswith("recipes.lstm.default."):  # a recipe as its kind's schema reads it (models.lstm's)
            got = getattr(p.recipe("lstm"), key.rsplit(".", 1)[1])
        else:
            got = getattr(p.evaluate.sample, key.rsplit(".", 1)[1])
        assert got == value and type(got) is type(value), key


def test_an_existing_experiment_counts_for_a_trial_only_with_the_trials_params():
    """A taken-over trial whose experiment exists takes its result from it, unless that experiment has
    other params (an earlier study of the same name): then the study stops instead of mixing them up."""
    recorded = {"recipes.lstm.default.lr": 0.0123456789, "recipes.lstm.default.optimizer": "adam", "recipes.lstm.default.epochs": 3}
    assert tune._same_params(recorded, {"recipes.lstm.default.lr": 0.0123456789, "recipes.lstm.default.optimizer": "adam", "recipes.lstm.default.epochs": 3})
    assert not tune._same_params(recorded, {"recipes.lstm.default.lr": 0.0123456788})
    assert not tune._same_params(recorded, {"recipes.lstm.default.optimizer": "adamw"})
    assert not tune._same_params(recorded, {"recipes.lstm.default.dropout": 0.1})


def test_curve_rows_are_read_once_and_a_line_being_written_waits(tmp_path):
    curve = tmp_path / "bits_per_char.tsv"
    curve.write_text("step\tbits_per_char\n0\t3.5\n1\t2.25\n2\t2.")  # the last line is still being written
    assert tune._new_rows(curve, 0) == [(0, 3.5), (1, 2.25)]
    curve.write_text("step\tbits_per_char\n0\t3.5\n1\t2.25\n2\t2.125\n")
    assert tune._new_rows(curve, 2) == [(2, 2.125)]
    assert tune._new_rows(tmp_path / "missing.tsv", 0) == []


# -- studies -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_prune_cleanly_every_trial_is_an_experiment_and_the_best_applies(tmp_path):
    from optuna.trial import TrialState
    from PIL import Image

    repo = tuned_project(tmp_path / "repo", trials=6)
    out = ptpipe_tune(repo, "--workers", "2").stdout
    study = study_of(repo)
    states = [t.state for t in study.trials]
    assert len(states) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, out
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and len(pruned) < 6, out
    for t in pruned:  # stopped at the first epoch it could be (warmup 1): step 1 reported, no more
        assert t.params["recipes.lstm.default.optimizer"] == "sgd" and max(t.intermediate_values) == 1 and t.user_attrs["epochs"] == 2
        assert f"{t.user_attrs['experiment']}: pruned after 2 epochs" in out
    assert_every_finished_trial_is_its_experiment(repo, study, {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 3})
    assert_nothing_half_written(repo, tmp_path / "cache")

    # the report: files, and the best trial applied with DVC's own command
    report = json.loads((repo / "reports/tune/lstm/study.json").read_text())
    best = study.best_trial
    assert report["best"]["experiment"] == f"lstm-{best.number}" and report["counts"]["pruned"] == len(pruned)
    for png in ("history.png", "importances.png", "curves.png"):
        with Image.open(repo / "reports/tune/lstm" / png) as image:
            assert image.format == "PNG" and image.size[0] >= 400
    assert f"dvc exp apply lstm-{best.number}" in (repo / "reports/tune/lstm/report.md").read_text()
    applied = sh("dvc", "exp", "apply", f"lstm-{best.number}", cwd=repo, check=False)
    if applied.returncode:  # this baseline ran only the Alice and LSTM stages: the others' outputs are missing
        missing = applied.stderr.split("Checkout failed for following targets:")[1].split("Is your cache")[0].split()
        assert missing and not [m for m in missing if "alice" in m or m == MODEL], applied.stderr
    applied = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in best.params.items():
        assert tune._lookup(applied, key)[1] == pytest.approx(value) if isinstance(value, float) else value
    metric = TINY_TUNE["tune.metric"]
    metrics = pipeline._flatten(json.loads((repo / metric["file"]).read_text()))
    assert metrics[metric["key"]] == pytest.approx(best.value) and (repo / MODEL).is_file()


@pytest.mark.slow
def test_the_percentile_pruner_stops_a_trial_worse_than_the_finished_ones(tmp_path):
    """The shipped pruner (percentile), one worker: the seeded sampler's first draws are adam, sgd, sgd; the
    adam trial finishes, each sgd trial is worse than it at its second epoch and stops there."""
    from optuna.trial import TrialState

    prune = {"curve": CURVE, "pruner": "percentile", "percentile": 25, "startup_trials": 1, "warmup_epochs": 1,
             "threshold": None}
    repo = tuned_project(tmp_path / "repo", trials=3, **{"tune.prune": prune})
    out = ptpipe_tune(repo).stdout
    study = study_of(repo)
    assert [t.params["recipes.lstm.default.optimizer"] for t in study.trials] == ["adam", "sgd", "sgd"], out
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED], out
    for t in study.trials[1:]:
        assert max(t.intermediate_values) == 1 and t.intermediate_values[1] > study.trials[0].intermediate_values[1]
    assert_every_finished_trial_is_its_experiment(repo, study, {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 3})
    assert_nothing_half_written(repo, tmp_path / "cache")


@pytest.mark.slow
def test_a_study_killed_with_sigkill_resumes_losing_no_trial_and_running_none_twice(tmp_path):
    """SIGKILL to `ptpipe tune` while two trials run: its `dvc exp run`s (own process groups) outlive it.
    The next `ptpipe tune` ends them, reruns unfinished trials under their numbers, and leaves the
    finished ones as they were."""
    import optuna
    from optuna.trial import TrialState

    repo = tuned_project(tmp_path / "repo", trials=4, **{"tune.prune": None, "tune.fixed": {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 4}})
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen([sys.executable, "-m", "ptpipe.cli", "tune", "--workers", "2"], cwd=repo,
                             env=tool_env(), stdout=log, stderr=subprocess.STDOUT)
    journal = repo / tune.STATE_DIR / "lstm.journal"

    def states():  # (not through params.yaml: `dvc exp run --temp` rewrites it for a moment while it stashes)
        if not journal.exists():
            return []
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        try:
            trials = optuna.load_study(study_name="lstm", storage=storage).trials
        except KeyError:  # the file is there, the study not yet
            return []
        # a running trial counts once its `dvc exp run` has started (the worker is then between two looks
        # at the curve, not writing to the journal, whose lock a kill would leave held for 30 s)
        return [t.state if t.state != TrialState.RUNNING or "proc" in t.user_attrs else None for t in trials]

    deadline = time.monotonic() + 400  # a bound on a hang, not a speed target
    while not (states().count(TrialState.COMPLETE) >= 2 and TrialState.RUNNING in states()):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
    before = {t.number: t for t in study_of(repo).trials}
    finished_revs = {f"lstm-{n}": exps(repo)[f"lstm-{n}"]["rev"] for n, t in before.items() if t.state == TrialState.COMPLETE}
    assert any(t.state == TrialState.RUNNING for t in before.values())

    second = ptpipe_tune(repo, "--workers", "2").stdout
    study = study_of(repo)
    assert [t.number for t in study.trials] == list(range(4))
    assert all(t.state == TrialState.COMPLETE for t in study.trials), second
    for n, t in before.items():
        after = study.trials[n]
        assert after.params == t.params  # a taken-over trial keeps its number and params
        if t.state == TrialState.COMPLETE:  # finished before the kill: not run again
            assert after.value == t.value and after.user_attrs["attempts"] == 1
            assert exps(repo)[f"lstm-{n}"]["rev"] == finished_revs[f"lstm-{n}"]
        else:
            assert "taking over" in second
    assert_every_finished_trial_is_its_experiment(repo, study, {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 4})
    assert_nothing_half_written(repo, tmp_path / "cache")


@pytest.mark.slow
def test_the_tune_flow_fails_on_a_bad_space_then_runs_the_study_and_attaches_the_report(prefect_server, client, tmp_path):
    import optuna

    repo = tuned_project(tmp_path / "repo", trials=2,
                         **{"tune.prune": None, "tune.fixed": {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 1}})
    flows = load_flow_module("tune")
    write_params(repo, **{"tune.space": {"recipes.lstm.default.lrr": {"type": "float", "low": 0.001, "high": 0.01}}})
    failed = flows.tune(repo=str(repo), return_state=True)
    assert failed.is_failed() and "tune.space.recipes.lstm.default.lrr: no such key" in failed.message
    (incident,) = [json.loads(p.read_text()) for p in (repo / "incidents").glob("*-tune-*.json")]
    assert "tune.space.recipes.lstm.default.lrr" in incident["error"] and not (repo / tune.STATE_DIR).exists()
    sh("git", "checkout", "params.yaml", cwd=repo)

    state = flows.tune(repo=str(repo), workers=2, return_state=True)
    assert state.is_completed(), state.message
    info = state.result()
    study = optuna.load_study(study_name="lstm", storage=tune.storage_for(repo, tune.load(repo)[1], None))
    assert info["best"]["value"] == study.best_value and len(info["trials"]) == 2
    found = artifacts(client, state.state_details.flow_run_id)
    markdown = found["tune-lstm"].data
    assert f"dvc exp apply {info['best']['experiment']}" in markdown and markdown.count("data:image/png;base64,") == 2
    rows = found["tune-lstm-trials"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert sorted(r["experiment"] for r in rows) == ["lstm-0", "lstm-1"]


def _postgres_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it."""
    found = shutil.which(name)
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return found or (str(candidates[0]) if candidates else None)


@pytest.fixture
def postgres():
    """A real PostgreSQL server on a free loopback port (trust auth, no password), removed afterwards.
    .ci/run installs the server when the machine has none."""
    initdb, pg_ctl = _postgres_program("initdb"), _postgres_program("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb/pg_ctl not found: .ci/run installs them (apt-get install postgresql)")
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    home = Path(tempfile.mkdtemp(prefix="ptpipe-pg-"))  # not under pytest's 0700 folders: the server user reads it
    run_as = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(home, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = home / "data"
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-w", "-t", "120", "-l", str(home / "server.log"), "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _clone(bare: Path, dest: Path, dvc_remote: Path) -> Path:
    """Another machine: its own clone, its own DVC cache, the shared DVC remote."""
    dest.parent.mkdir(parents=True)
    sh("git", "clone", "-q", str(bare), str(dest), cwd=dest.parent)
    sh("dvc", "config", "--local", "cache.dir", str(dest.parent / "cache"), cwd=dest)
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(dvc_remote), cwd=dest)
    return dest


@pytest.mark.slow
def test_two_clones_share_one_study_in_postgresql_and_a_third_sees_every_trial(tmp_path, postgres):
    from optuna.trial import TrialState

    bare, dvc_remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    sh("git", "init", "-q", "--bare", "-b", "main", str(bare), cwd=tmp_path)
    a = tuned_project(tmp_path / "a" / "repo", trials=4,
                      **{"tune.prune": None, "tune.fixed": {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 3}})
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(dvc_remote), cwd=a)
    sh("git", "remote", "add", "origin", str(bare), cwd=a)
    sh("git", "push", "-q", "origin", "main", cwd=a)
    sh("dvc", "push", "-q", cwd=a)  # the baseline's prepared data, for the other machines
    b = _clone(bare, tmp_path / "b" / "repo", dvc_remote)
    sh("dvc", "pull", "-q", BASELINE, cwd=b)

    command = [sys.executable, "-m", "ptpipe.cli", "tune", "--storage", postgres, "--push", "origin"]
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in "ab"}
    first = subprocess.Popen(command, cwd=a, env=tool_env(), stdout=logs["a"], stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300  # a bound on a hang, not a speed target
    while not any(t.state == TrialState.RUNNING for t in _trials(a, postgres)):  # a has its first trial: b joins
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
        time.sleep(0.2)
    second = subprocess.Popen(command, cwd=b, env=tool_env(), stdout=logs["b"], stderr=subprocess.STDOUT)
    assert first.wait() == 0 and second.wait() == 0, (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()

    study = study_of(a, postgres)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both machines ran trials of the one study
    c = _clone(bare, tmp_path / "c" / "repo", dvc_remote)
    sh("dvc", "exp", "pull", "origin", cwd=c)
    assert_every_finished_trial_is_its_experiment(c, study, {"recipes.lstm.default.threads": 1, "recipes.lstm.default.epochs": 3})
    best = f"lstm-{study.best_trial.number}"
    applied = sh("dvc", "exp", "apply", best, cwd=c, check=False)  # its model comes from the DVC remote
    assert (c / MODEL).is_file(), applied.stderr
    assert tune._lookup(yaml.safe_load((c / "params.yaml").read_text()), "recipes.lstm.default.lr")[1] == pytest.approx(study.best_params["recipes.lstm.default.lr"])


def _trials(repo: Path, storage: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name="lstm", storage=tune.storage_for(repo, tune.load(repo)[1], storage)).trials
    except KeyError:  # not created yet
        return []
