"""Versioned models: release a trained model to the DVC remote under a GTO version tag, load one back.

A release is two things that must agree: the model files pushed to the DVC remote, and a git
tag `<artifact>@v<semver>` (GTO's format) on the commit whose `dvc.lock` records their hashes.
Anyone with the git repo and the remote can then fetch exactly those bytes:

    ptpipe release cifar10-cnn v1.0.0           # refuses a dirty workspace or a stale dvc.lock
    ptpipe promote cifar10-cnn v1.0.0 prod      # tag cifar10-cnn#prod#1 (--force: again, or a newer one)
    ptpipe unassign cifar10-cnn v1.0.0 prod     # take the stage away again
    dvc artifacts get <repo-url> cifar10-cnn --rev v1.0.0
    load_model("cifar10-cnn", "v1.0.0")         # an onnxruntime session, cached locally

Artifacts are declared in dvc.yaml (`artifacts:`; `dvc artifacts get` reads them there), and every
model of params.yaml that no artifact names is one too, under its own name (models.<name> ->
models/<name>); each path is a folder holding the model's ONNX file (`model.onnx`, what
`load_model` serves) and TorchScript file (`model.ts`).
The commands work from any folder inside the repository (its root is found as git and dvc
find it), or on another repository with `--repo`.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import yaml

from ptpipe import files
from ptpipe.stage import StageError

ONNX_FILE = "model.onnx"
SEMVER = re.compile(r"^v\d+\.\d+\.\d+$")
CACHE_DIR = Path(os.environ.get("PTPIPE_CACHE", Path.home() / ".cache" / "ptpipe" / "models"))


def find_root(start: str | Path | None = None) -> Path:
    """The repository holding `start` (default: the current folder): the nearest folder above it
    with a `.dvc` folder, as `dvc` finds it, which must have the dvc.yaml declaring the artifacts."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    start = Path(start or ".").resolve()
    if not start.is_dir():
        raise StageError(f"{start} is not a folder: pass the repository (--repo)")
    try:
        root = Path(Repo.find_root(str(start)))
    except NotDvcRepoError:
        raise StageError(f"{start} is not inside a DVC repository: run from the project, or pass --repo") from None
    if not (root / "dvc.yaml").is_file():
        raise StageError(f"{root} has no dvc.yaml (it declares the artifacts): pass the project with --repo")
    return root


def artifacts(repo: str | Path = ".") -> dict:
    """dvc.yaml's artifacts, and each model of params.yaml whose folder no artifact names, under the model's
    own name (path models/<name>): a model a user adds to params.yaml is releasable as it is."""
    root = find_root(repo)
    declared = yaml.safe_load((root / "dvc.yaml").read_text()).get("artifacts", {}) or {}
    named = {Path(a.get("path", "")).as_posix() for a in declared.values()}
    params_file = root / "params.yaml"
    models = (yaml.safe_load(params_file.read_text()) or {}).get("models") or {} if params_file.is_file() else {}
    for model in models:
        if f"models/{model}" not in named and model not in declared:
            declared[model] = {"path": f"models/{model}", "type": "model"}
    return declared


def _artifact(repo: Path, name: str) -> dict:
    known = artifacts(repo)
    if name not in known:
        raise StageError(f"no artifact {name!r} in dvc.yaml; known: {', '.join(sorted(known)) or 'none'}")
    return known[name]


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed in {repo}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def _gto_errors():
    """GTO's refusals (unknown version, stage already assigned, ...) as StageErrors: one line, no traceback."""
    from gto.exceptions import GTOException

    try:
        yield
    except GTOException as exc:
        raise StageError(str(exc)) from None


def check_releasable(repo: Path, targets: list[str]) -> None:
    """A release must be reproducible: everything committed, and dvc.lock describing the stages that make
    `targets` (the artifact's outputs) and every stage upstream of them (other models may be stale)."""
    from dvc.repo import Repo

    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no").strip()
    if dirty:
        raise StageError(f"the workspace has uncommitted changes; commit them first:\n{dirty}")
    with Repo(str(repo)) as dvc_repo:
        stale = dvc_repo.status(targets=[str(repo.resolve() / t) for t in targets], with_deps=True)
    if stale:
        raise StageError(f"dvc.lock is stale for {', '.join(sorted(stale))}: run `dvc repro`, commit dvc.lock, "
                         f"then release")


def _outs_under(repo: Path, path: str) -> list[str]:
    """The DVC outputs that make up an artifact folder (each pushed by its own path)."""
    from dvc.repo import Repo

    root = (repo / path).resolve()
    with Repo(str(repo)) as dvc_repo:
        outs = [Path(out.fs_path) for out in dvc_repo.index.outs]
    found = [str(o.relative_to(repo.resolve())) for o in outs if o == root or root in o.parents]
    if not found:
        raise StageError(f"no DVC output under {path}: does a stage write it?")
    return sorted(found)


def missing_on_remote(repo: Path, targets: list[str]) -> list[str]:
    """Files of `targets` the default DVC remote does not have (`dvc status --cloud`)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:  # (DVC resolves relative targets against the current folder)
        status = dvc_repo.status(targets=[str(repo / target) for target in targets], cloud=True)
    return sorted(path for path, state in status.items() if state != "deleted")


def release(name: str, version: str, repo: str | Path = ".", message: str | None = None) -> str:
    """Push the artifact's files to the DVC remote, check the remote has them all, then tag the
    commit `name@version`. The workspace is checked first: nothing is pushed or tagged from a
    workspace that is not what the commit says."""
    repo = find_root(repo)
    if not SEMVER.match(version):
        raise StageError(f"version {version!r} is not of the form vMAJOR.MINOR.PATCH (e.g. v1.0.0)")
    artifact = _artifact(repo, name)
    targets = _outs_under(repo, artifact["path"])
    check_releasable(repo, targets)
    tag = f"{name}@{version}"
    if _git(repo, "tag", "--list", tag).strip():
        raise StageError(f"{tag} already exists: versions are immutable, release a new one")
    head = _git(repo, "rev-parse", "HEAD").strip()
    same_commit = [v["version"] for v in versions(name, repo) if v["commit"] == head]
    if same_commit:  # GTO allows one version per commit: refuse before anything is pushed
        raise StageError(f"this commit is already released as {name}@{same_commit[0]}: "
                         f"commit a change to release {version}, or promote {same_commit[0]}")

    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        pushed = dvc_repo.push(targets=[str(repo.resolve() / target) for target in targets])  # from any folder
    # A local path remote would let a missing file go unnoticed on this machine (DVC reads the
    # repository's own cache): ask the remote itself, before the tag promises the files exist.
    missing = missing_on_remote(repo, targets)
    if missing:
        raise StageError(f"the DVC remote lacks {', '.join(missing)} after `dvc push`; nothing tagged: check "
                         f"`dvc remote list` and its permissions, then `dvc push` and release again")
    import gto.api

    with _gto_errors():
        gto.api.register(str(repo), name, ref="HEAD", version=version,
                         message=message or f"Release {name} {version}")
    print(f"released {tag}: pushed {pushed} file(s) of {', '.join(targets)} to the DVC remote")
    return tag


def promote(name: str, version: str, stage: str, repo: str | Path = ".", force: bool = False) -> None:
    """Assign a registry stage (e.g. prod) to a released version: tag `name#stage#N`.

    GTO refuses to assign the same stage to the same version twice unless `force`."""
    import gto.api

    repo = find_root(repo)
    _artifact(repo, name)
    try:
        with _gto_errors():
            gto.api.assign(str(repo), name, stage, version=version, force=force)
    except StageError as err:
        if "--force" in str(err):  # GTO's own advice names a flag of `gto`, say ours
            raise StageError(f"{name} {version} is already in stage {stage}: `ptpipe promote --force` assigns it "
                             f"again, `ptpipe unassign {name} {version} {stage}` takes it away") from None
        raise


def unassign(name: str, version: str, stage: str, repo: str | Path = ".") -> None:
    """Take registry stage `stage` away from `version` (GTO's unassign: tag `name#stage!#N`)."""
    import gto.api

    repo = find_root(repo)
    _artifact(repo, name)
    if stage not in next((v["stages"] for v in versions(name, repo) if v["version"] == version), []):
        raise StageError(f"{name} {version} is not in stage {stage!r} (`ptpipe versions {name}` lists the stages)")
    with _gto_errors():
        gto.api.unassign(str(repo), name, version=version, stage=stage)


def versions(name: str, repo: str | Path = ".") -> list[dict]:
    """[{version, commit, created_at, stages}] of the released versions, newest first."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    repo = find_root(repo)
    _artifact(repo, name)
    with _gto_errors():
        try:
            rows = gto.api.show(str(repo), name)
        except ArtifactNotFound:  # declared in dvc.yaml but never released
            return []
    return [{"version": r["version"], "commit": r["commit_hexsha"], "created_at": r["created_at"],
             "stages": [s["stage"] for s in r["stages"]]} for r in rows]


def fetch_model(name: str, version: str | None = None, stage: str | None = None, repo: str | None = None,
                cache_dir: Path = CACHE_DIR) -> Path:
    """Download (once) the ONNX file of `name` at `version` or registry `stage`; return its local path."""
    import dvc.api
    from dvc.exceptions import DvcException

    from dvc.exceptions import ArtifactNotFoundError
    from dvc.repo import Repo

    where = repo or "this repository"
    label = version or (f"stage {stage}" if stage else "latest")
    try:
        try:
            info = dvc.api.artifacts_show(name, version=version, stage=stage, repo=repo)
        except ArtifactNotFoundError:  # not in that commit's dvc.yaml: a model released under its own name
            with Repo.open(repo, subrepos=True, uninitialized=True) as dvc_repo:
                info = {"rev": dvc_repo.artifacts.get_rev(name, version=version, stage=stage),
                        "path": f"models/{name}"}
    except DvcException as exc:
        raise StageError(f"no {label} of {name} in {where} ({exc})") from None
    path = Path(info["path"]) / ONNX_FILE if not info["path"].endswith(".onnx") else Path(info["path"])
    # Cached by commit: the same tag always names the same commit, hence the same bytes.
    local = Path(cache_dir) / name / info["rev"] / path.name
    if not local.exists():
        try:
            with dvc.api.open(str(path), repo=repo, rev=info["rev"], mode="rb") as src:
                files.write_bytes(local, src.read())
        except (DvcException, FileNotFoundError) as exc:
            raise StageError(f"cannot fetch {path} of {name} {version or stage or ''} from {where}'s DVC remote: "
                             f"{type(exc).__name__}: {exc}. Was it released (pushed) with `ptpipe release`?") from None
    return local


def load_model(name: str, version: str | None = None, stage: str | None = None, repo: str | None = None,
               cache_dir: Path = CACHE_DIR):
    """An inference-ready onnxruntime session for `name` at `version` (or `stage`, or the latest)."""
    from ptpipe import inference

    return inference.open_session(fetch_model(name, version, stage, repo, cache_dir))


def version_of(name: str, stage: str | None = None, repo: str | None = None) -> str:
    """The version tag that registry `stage` (None: the latest version) names now, as `dvc artifacts` resolves it."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from gto.tag import find

    where = repo or "this repository"
    try:
        with Repo.open(repo, subrepos=True, uninitialized=True) as dvc_repo:
            rev = dvc_repo.artifacts.get_rev(name, stage=stage)
            tags = find(name=name, scm=dvc_repo.scm)
    except DvcException as exc:
        raise StageError(f"no {f'stage {stage}' if stage else 'version'} of {name} in {where} ({exc})") from None
    found = [t.name.split("@", 1)[1] for t in tags if t.target == rev and SEMVER.match(t.name.partition("@")[2])]
    if not found:
        raise StageError(f"{name}{f'#{stage}' if stage else ''} in {where} points at {rev[:8]}, which has no version tag")
    return found[-1]
