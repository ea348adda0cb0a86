"""`ptpipe tune` on the LSTM: a study with median pruning vs the same study without, and the default recipe.

    python benchmarks/tune.py --text ../shared/data/alice-11-0.txt --out benchmarks/results/tune.json

In a temporary clone of this repository's HEAD (its own DVC cache; the text given by a file:// URL,
prepared once and committed as the baseline), with params.yaml's `tune` section as committed except
what the options say:
1. the default recipe at the study's epoch budget (`tune.fixed`: recipes.lstm.default.epochs, recipes.lstm.default.threads 1), one
   `dvc exp run --temp` of the study's targets;
2. the study with `tune.prune` as committed (median pruner), `--workers` trials at once;
3. the same study with `tune.prune.pruner: none` (the curve recorded, no trial stopped), the same sampler seed.
Reported: wall seconds, trials completed / pruned, trial-epochs spent (epochs trained, all trials
together), the best metric and its experiment; pruning's saving in trial-epochs and the difference of
the two bests. Targets (issue 25): the best beats the default; pruning saves >= 30% of trial-epochs
for a best within 0.02 bits/char. Sampler seed: `tune.seed` (0), or `--seed`; training seeds: recipes.lstm.default.seed.
With 2 workers the order trials finish in depends on timing, so two runs can differ after the TPE
startup trials. Load average and CPU steal are recorded before and after: figures taken on a shared
machine say so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ptpipe import files, tune  # noqa: E402


def cpu_times() -> tuple[float, float]:
    """(total, steal) jiffies from /proc/stat, for the steal share of a stretch of time."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0.0


def machine(start: tuple[float, float]) -> dict:
    total, steal = cpu_times()
    return {"load_average": os.getloadavg(), "steal_share": (steal - start[1]) / max(1.0, total - start[0]),
            "cpus": os.cpu_count(), "platform": platform.platform()}


def sh(*cmd: str, cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def baseline_clone(work: Path, text: Path, overrides: dict) -> Path:
    """HEAD cloned into `work`, the text prepared and committed: what every trial starts from."""
    import hashlib

    repo = work / "repo"
    sh("git", "clone", "-q", str(ROOT), str(repo), cwd=work)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["datasets"]["alice"].update(url=text.resolve().as_uri(), md5=hashlib.md5(text.read_bytes()).hexdigest())
    for dotted, value in overrides.items():
        *parents, last = dotted.split("/")  # "/"-separated: the keys inside tune.fixed hold dots
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(work / "cache"), cwd=repo)
    sh(sys.executable, "-m", "dvc", "repro", "prepare@alice", cwd=repo)
    sh("git", "add", "params.yaml", "dvc.lock", cwd=repo)
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "baseline", cwd=repo)
    return repo


def default_recipe(repo: Path, spec) -> dict:
    start = time.perf_counter()
    overrides = [tune.override(k, v) for k, v in spec.fixed.items()]
    sh(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "default",
       *[a for o in overrides for a in ("-S", o)], *spec.targets, cwd=repo)
    value = tune.metric_of(tune.experiments(repo)["default"], spec)
    return {"wall_s": time.perf_counter() - start, "value": value, "epochs": spec.fixed.get("recipes.lstm.default.epochs")}


def study(repo: Path, name: str, prune: bool, workers: int) -> dict:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tune"]["study"] = name
    if not prune:  # the same curve recorded (trial-epochs counted alike), no trial stopped
        raw["tune"]["prune"].update(pruner="none", percentile=None, threshold=None)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", name, cwd=repo)
    start = time.perf_counter()
    info = tune.run(repo, workers=workers, log=lambda line: print(f"  [{name}] {line}", flush=True))
    best = info["best"] or {}
    return {"wall_s": time.perf_counter() - start, "trial_epochs": info["trial_epochs"], **info["counts"],
            "best": best.get("value"), "best_experiment": best.get("experiment"), "best_params": best.get("params"),
            "commit": sh("git", "rev-parse", "HEAD", cwd=repo).strip(),
            "trials": [{k: t[k] for k in ("number", "state", "value", "params", "started", "curve")}
                       for t in info["trials"]]}


# The pruners replayed on the unpruned study's full curves: how the shipped one was chosen (docs/tune.md).
REPLAYED = {"median, 5 start-up, 2 warm-up (the first default)": ("percentile", 50, 5, 2),
            "median, 3, 1": ("percentile", 50, 3, 1),
            "percentile 25, 5, 1": ("percentile", 25, 5, 1),
            "percentile 25, 3, 1 (shipped)": ("percentile", 25, 3, 1),
            "successive halving, min 1 epoch, factor 3": ("sha", 1, 3, None),
            "hyperband, 1-8 epochs, factor 3": ("hyperband", 1, 3, None)}


def replay(trials: list[dict]) -> dict:
    """Each REPLAYED pruner fed the completed trials' curves in the order they started (Optuna's own
    pruner objects, ask/tell): trial-epochs it would have spent, trials it would have stopped, the best
    kept. It leaves out what a live study adds (the sampler seeing pruned trials, two workers' timing)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = sorted((t for t in trials if t["state"] == "complete"), key=lambda t: t["started"])
    pruners = {"percentile": lambda a, b, c: optuna.pruners.PercentilePruner(a, n_startup_trials=b, n_warmup_steps=c),
               "sha": lambda a, b, _: optuna.pruners.SuccessiveHalvingPruner(min_resource=a, reduction_factor=b),
               "hyperband": lambda a, b, _: optuna.pruners.HyperbandPruner(min_resource=a, reduction_factor=b,
                                                                           max_resource=len(done[0]["curve"]))}
    out = {}
    for name, (kind, *args) in REPLAYED.items():
        study = optuna.create_study(direction="minimize", pruner=pruners[kind](*args))
        epochs, stopped, best = 0, 0, None
        for t in done:
            trial = study.ask()
            for step, value in enumerate(t["curve"]):
                trial.report(value, step)
                epochs += 1
                if trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    stopped += 1
                    break
            else:
                study.tell(trial, t["value"])
                best = t["value"] if best is None else min(best, t["value"])
        out[name] = {"trial_epochs": epochs, "pruned": stopped, "best": best}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/alice-11-0.txt",
                    help="the UTF-8 text to train on (default: ../shared/data/alice-11-0.txt)")
    ap.add_argument("--trials", type=int, default=20, help="trials per study (default 20)")
    ap.add_argument("--epochs", type=int, default=8, help="epoch budget per trial (default 8: tune.fixed)")
    ap.add_argument("--workers", type=int, default=2, help="trials at once, one thread each (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (default 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tune.json")
    ap.add_argument("--label", default="", help="e.g. 'under load' or 'idle': stored with the figures")
    args = ap.parse_args()
    start_cpu = cpu_times()
    before = machine(start_cpu)
    with tempfile.TemporaryDirectory(prefix="ptpipe-bench-tune-") as tmp:
        repo = baseline_clone(Path(tmp), args.text, {"tune/trials": args.trials, "tune/seed": args.seed,
                                                     "tune/fixed/recipes.lstm.default.epochs": args.epochs,
                                                     "tune/fixed/recipes.lstm.default.threads": 1})
        spec = tune.load(repo)[1]
        print(f"default recipe, {args.epochs} epochs ...", flush=True)
        default = default_recipe(repo, spec)
        pruned = study(repo, "pruned", True, args.workers)
        unpruned = study(repo, "unpruned", False, args.workers)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "label": args.label,
        "head": sh("git", "rev-parse", "HEAD", cwd=ROOT).strip(), "text": str(args.text),
        "settings": {"trials": args.trials, "epochs": args.epochs, "workers": args.workers, "threads_per_trial": 1,
                     "sampler_seed": args.seed, "prune": spec.prune.model_dump() if spec.prune else None,
                     "metric": spec.metric.model_dump(), "targets": spec.targets},
        "default": default, "pruned": pruned, "unpruned": unpruned,
        "pruning_saves": 1 - pruned["trial_epochs"] / max(1, unpruned["trial_epochs"]),
        "best_difference": (pruned["best"] - unpruned["best"]) if pruned["best"] and unpruned["best"] else None,
        "machine_before": before, "machine_after": machine(start_cpu),
        "replay": replay(unpruned["trials"]),
    }
    files.write_json(args.out, result)
    print(table(result))


def table(r: dict) -> str:
    rows = [("default recipe", r["default"]["wall_s"], r["default"]["epochs"], "-", "-", r["default"]["value"])]
    for name in ("pruned", "unpruned"):
        s = r[name]
        rows.append((f"study, {name}", s["wall_s"], s["trial_epochs"], s["complete"], s["pruned"], s["best"]))
    lines = [f"{'':<18} {'wall s':>8} {'trial-epochs':>13} {'complete':>9} {'pruned':>7} {'best':>8}"]
    lines += [f"{a:<18} {b:>8.0f} {c!s:>13} {d!s:>9} {e!s:>7} {f:>8.4f}" for a, b, c, d, e, f in rows]
    lines.append(f"pruning saves {r['pruning_saves']:.0%} of trial-epochs; best pruned - unpruned = "
                 f"{r['best_difference']:+.4f}; best vs default: {min(r['pruned']['best'], r['unpruned']['best']) - r['default']['value']:+.4f}")
    full = r["unpruned"]["trial_epochs"]
    lines.append("replayed on the unpruned study's curves (start order):")
    lines += [f"  {name:<45} saves {1 - x['trial_epochs'] / full:4.0%}, {x['pruned']:>2} pruned, best {x['best']:.4f}"
              for name, x in r["replay"].items()]
    m0, m1 = r["machine_before"], r["machine_after"]
    lines.append(f"{r['label'] or 'unlabelled'}: load average before {m0['load_average'][0]:.2f}, after "
                 f"{m1['load_average'][0]:.2f}; CPU steal {m1['steal_share']:.1%} over the run")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
