"""Preparing a user's images at scale: `ptpipe.images.read_image_folder` on 60,000 32 x 32 PNG files and
10,000 ~500 x 375 JPEGs (seconds, peak memory), and what DVC costs when such a folder is tracked, vs the
same data as one .tar file. Side by side in one run; a table and benchmarks/results/prepare_images.json.

    python benchmarks/prepare_images.py                      # synthetic CIFAR-like pixels, ~4 min + DVC ~3 min
    python benchmarks/prepare_images.py --cifar-jpeg ../shared/data/cifar10-jpeg.tar.gz   # real CIFAR-10 pixels
    python benchmarks/prepare_images.py --pngs 6000 --jpegs 1000 --no-dvc                 # a quick look

Data (built once under --work, reused when it is there):
  pngs/{train,test}/<class>/*.png  60,000 32 x 32 RGB PNGs, 10 classes (CIFAR-10's own train/test layout)
  pngs.tar, pngs.zip               the same files as one archive (read in place by the reader; the tar tracked by DVC)
  jpegs/<class>/*.jpg              10,000 JPEGs, 500 x 375 (every 5th 375 x 500), quality 85: a CIFAR image
                                   upscaled plus fine grain, so the files have photo-like detail (mean size printed)
Cases, each in its own process (so peaks do not mix): read + np.save of every split, `--workers` 1 and 2,
and the JPEGs once more with JPEG draft off (full-size decode). Files are in the page cache (just built).
Peak memory = the largest sum over the process tree (the case and its workers) of RSS, and of PSS (shared
pages counted once), sampled every 20 ms. Target (issue 21): <= 30 s for the PNGs, <= 90 s for the JPEGs, peak <= 2 x the prepared arrays.
Draft quality: mean |draft - full decode| over 300 JPEGs, beside |bicubic - Lanczos| of the full decode.
DVC (the real `dvc` CLI in a temporary git + dvc repo): `dvc add` of the PNG folder and of pngs.tar, first
run (hash + copy into the cache) and second run (nothing changed), and `dvc status` after each.
Every figure carries the 1-minute load average before it and the CPU steal during it (/proc/stat): on a
shared 2-core VM a figure taken under load is not the idle machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- the machine --------------------------------------------------------------------------------------

def cpu_times() -> list[int]:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (jiffies); [] off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return []


def steal_pct(before: list[int], after: list[int]) -> float | None:
    if not before:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return round(100 * delta[7] / (sum(delta) or 1), 1)


def tree_memory(root_pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over root_pid and its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(frontier)
    rss = pss = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if line.count(":") == 1)
            rss += int(fields["Rss"].split()[0]) * 1024
            pss += int(fields["Pss"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass  # a worker that just exited
    return rss, pss


def measured(cmd: list[str]) -> dict:
    """Run cmd; wall seconds, peak tree RSS/PSS, load average before, steal during, its JSON stdout."""
    load, cpu, start = os.getloadavg()[0], cpu_times(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {**result, "wall_s": round(wall, 2), "peak_rss_mb": round(peak[0] / 2**20, 1),
            "peak_pss_mb": round(peak[1] / 2**20, 1), "load_1min_before": round(load, 2),
            "steal_pct": steal_pct(cpu, cpu_times())}


# -- the data -----------------------------------------------------------------------------------------

def source_images(cifar_jpeg: Path | None, count: int, seed: int = 0):
    """(split, class, 32 x 32 x 3 uint8) x count: real CIFAR-10 from the shared JPEG tarball (train/ and
    test/ class folders) when given, else synthetic CIFAR-like pixels (a smooth field plus detail)."""
    if cifar_jpeg:
        with tarfile.open(cifar_jpeg) as archive:
            done = 0
            for member in archive:
                if member.isfile() and member.name.endswith(".jpg") and done < count:
                    split, cls = member.name.split("/")[-3:-1]
                    yield split, cls, np.asarray(Image.open(archive.extractfile(member)).convert("RGB"))
                    done += 1
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)
        detail = rng.normal(0, 18, (32, 32, 3))
        pixels = np.clip(np.asarray(base) + detail, 0, 255).astype(np.uint8)
        yield ("train" if (i // 10) % 6 else "test"), CLASSES[i % 10], pixels


def build_pngs(folder: Path, cifar_jpeg: Path | None, count: int) -> None:
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for i, (split, cls, pixels) in enumerate(source_images(cifar_jpeg, count)):
        path = staging / split / cls / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    staging.rename(folder)


def build_jpegs(folder: Path, cifar_jpeg: Path | None, count: int) -> None:
    """Upscaled CIFAR images plus grain: the grain gives the files a photo's detail and decode cost."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(1)
    for i, (_, cls, pixels) in enumerate(source_images(cifar_jpeg, count, seed=1)):
        size = (375, 500) if i % 5 == 0 else (500, 375)
        big = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC), np.float32)
        grain = np.asarray(Image.fromarray(rng.integers(0, 256, (size[1] // 2, size[0] // 2, 3), dtype=np.uint8))
                           .resize(size, Image.BILINEAR), np.float32) - 128
        path = staging / cls / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(big + 0.25 * grain, 0, 255).astype(np.uint8)).save(path, quality=85)
    staging.rename(folder)


def build(work: Path, cifar_jpeg: Path | None, pngs: int, jpegs: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "built.json"
    wanted = {"pngs": pngs, "jpegs": jpegs, "cifar_jpeg": str(cifar_jpeg) if cifar_jpeg else None}
    products = ("pngs", "jpegs", "pngs.tar", "pngs.zip")
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted and all((work / p).exists() for p in products)):
        for name in products:
            target = work / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        started = time.perf_counter()
        build_pngs(work / "pngs", cifar_jpeg, pngs)
        build_jpegs(work / "jpegs", cifar_jpeg, jpegs)
        with tarfile.open(work / "pngs.tar.partial", "w") as archive:
            archive.add(work / "pngs", arcname="pngs")
        (work / "pngs.tar.partial").rename(work / "pngs.tar")
        with zipfile.ZipFile(work / "pngs.zip.partial", "w") as archive:  # stored: PNGs do not compress
            for path in sorted((work / "pngs").rglob("*.png")):
                archive.write(path, f"pngs/{path.relative_to(work / 'pngs').as_posix()}")
        (work / "pngs.zip.partial").rename(work / "pngs.zip")
        stamp.write_text(json.dumps(wanted))
        print(f"built the data in {time.perf_counter() - started:.0f} s under {work}")
    sizes = [p.stat().st_size for p in (work / "jpegs").rglob("*.jpg")]
    return {**wanted, "jpeg_mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "png_folder_mb": round(sum(p.stat().st_size for p in (work / "pngs").rglob("*.png")) / 2**20, 1),
            "pngs_tar_mb": round((work / "pngs.tar").stat().st_size / 2**20, 1)}


# -- one case (a child process) -----------------------------------------------------------------------

def run_case(source: Path, size: int, workers: int, draft: bool) -> None:
    """What the prepare stage will do: read, then np.save every split; prints one JSON line."""
    from ptpipe import images

    if not draft:
        images.JPEG_DRAFT_GAP = 10**9  # never large enough: every JPEG decoded at full size (workers=1 only)
    started = time.perf_counter()
    got = images.read_image_folder(source, size, val_fraction=0.1, test_fraction=0.1, seed=0, workers=workers)
    read_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as out:
        for split, x in got.images.items():
            np.save(Path(out) / f"{split}_images.npy", x)
            np.save(Path(out) / f"{split}_labels.npy", got.labels[split])
    print(json.dumps({"images": sum(len(x) for x in got.images.values()), "own_split": list(got.own_split),
                      "array_mb": round(sum(x.nbytes for x in got.images.values()) / 2**20, 1),
                      "read_s": round(read_s, 2), "save_s": round(time.perf_counter() - started - read_s, 2),
                      "skipped": got.skipped}))


def draft_quality(folder: Path, size: int, count: int = 300) -> dict:
    """Mean |draft - full decode| and |bicubic - Lanczos| (full decode), levels of 255, over `count` JPEGs."""
    from ptpipe import images

    def square(img, resample):
        w, h = img.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return np.asarray(img.crop(box).resize((size, size), resample), np.int16)

    draft_diff, filter_diff = [], []
    for path in sorted(folder.rglob("*.jpg"))[:count]:
        full = Image.open(path).convert("RGB")
        bicubic = square(full, Image.BICUBIC)
        draft_diff.append(np.abs(images.decode(path, size).astype(np.int16) - bicubic).mean())
        filter_diff.append(np.abs(square(full, Image.LANCZOS) - bicubic).mean())
    return {"size": size, "jpegs": len(draft_diff), "draft_vs_full": round(float(np.mean(draft_diff)), 3),
            "bicubic_vs_lanczos": round(float(np.mean(filter_diff)), 3)}


# -- DVC ----------------------------------------------------------------------------------------------

def dvc_costs(work: Path, repo: Path) -> list[dict]:
    """`dvc add` (first: hash + copy into the cache; second: unchanged) and `dvc status`, for the PNG
    folder and for pngs.tar, in a new git + dvc repo at `repo` (the venv's real dvc CLI)."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    rows = []
    in_repo = {"cwd": repo, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **in_repo)
    subprocess.run([dvc, "init", "-q"], **in_repo)
    shutil.copytree(work / "pngs", Path(repo) / "pngs")  # untimed: the user's data, already there
    shutil.copy(work / "pngs.tar", repo)
    os.chdir(repo)
    for target, files in (("pngs", sum(1 for _ in (work / "pngs").rglob("*.png"))), ("pngs.tar", 1)):
        status = [dvc, "status", "-q", f"{target}.dvc"]  # this target only: both are tracked in one repo
        for step, cmd in (("dvc add (1st)", [dvc, "add", "-q", target]), ("dvc status", status),
                          ("dvc add (2nd)", [dvc, "add", "-q", target]), ("dvc status (2nd)", status)):
            row = {"target": target, "files": files, "step": step, **measured(cmd)}
            rows.append(row)
            print(f"{target:9} {step:17} {row['wall_s']:7.2f} s  peak RSS {row['peak_rss_mb']:6.0f} MB  "
                  f"(load {row['load_1min_before']:.2f}, steal {row['steal_pct']}%)", flush=True)
    os.chdir(ROOT)
    return rows


# -- the run ------------------------------------------------------------------------------------------

def read_cases(work: Path, workers: list[int], size: int, pngs: int, jpegs: int, interpreter_mb: float) -> list[dict]:
    cases = ([(f"{pngs:,} PNG folder", work / "pngs", w, True) for w in workers]
             + [(f"{pngs:,} PNG .tar", work / "pngs.tar", w, True) for w in workers]
             + [(f"{pngs:,} PNG .zip", work / "pngs.zip", w, True) for w in workers]
             + [(f"{jpegs:,} JPEG folder", work / "jpegs", w, True) for w in workers]
             + [(f"{jpegs:,} JPEG, no draft", work / "jpegs", 1, False)])
    rows = []
    for name, source, w, draft in cases:
        cmd = [sys.executable, __file__, "--case", str(source), "--size", str(size), "--workers", str(w)]
        row = {"case": name, "workers": w, "draft": draft, **measured(cmd + ([] if draft else ["--no-draft"]))}
        # the least it could take: the arrays plus one interpreter (numpy, Pillow, ptpipe.images) per process
        row["floor_mb"] = round(row["array_mb"] + interpreter_mb * (w + 1 if w > 1 else 1), 1)
        target_s = 30 if "PNG" in name else 90
        row["targets_met"] = {f"<= {target_s} s": row["wall_s"] <= target_s,
                              "peak RSS <= 2x arrays": row["peak_rss_mb"] <= 2 * row["array_mb"]}
        rows.append(row)
        print(f"{name:24} workers {w}: {row['wall_s']:6.2f} s (read {row['read_s']:.2f}, save {row['save_s']:.2f}), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB / PSS {row['peak_pss_mb']:.0f} MB for {row['array_mb']:.0f} MB "
              f"of arrays (load {row['load_1min_before']:.2f}, steal {row['steal_pct']}%)", flush=True)
    return rows


def table(rows: list[dict], dvc_rows: list[dict]) -> str:
    lines = ["| case | workers | s (read + save) | peak RSS MB | peak PSS MB | arrays MB | RSS / arrays | floor MB "
             "| load 1 min | steal % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['workers']} | {r['wall_s']:.1f} ({r['read_s']:.1f} + {r['save_s']:.1f}) | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['array_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / r['array_mb']:.2f}x | {r['floor_mb']:.0f} | {r['load_1min_before']:.2f} | "
                     f"{r['steal_pct']} |")
    if dvc_rows:
        lines += ["", "| DVC | files | step | s | peak RSS MB | load 1 min | steal % |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['target']} | {r['files']} | {r['step']} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['load_1min_before']:.2f} | {r['steal_pct']} |" for r in dvc_rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ptpipe-prepare-images",
                    help="where the data are built and kept between runs (default: %(default)s)")
    ap.add_argument("--cifar-jpeg", type=Path, help="CIFAR-10 as JPEG class folders (.tar.gz): real pixels")
    ap.add_argument("--pngs", type=int, default=60_000, help="32 x 32 PNG files (default: %(default)s)")
    ap.add_argument("--jpegs", type=int, default=10_000, help="~500 x 375 JPEG files (default: %(default)s)")
    ap.add_argument("--size", type=int, default=32, help="image size to prepare (default: %(default)s)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to compare")
    ap.add_argument("--no-dvc", action="store_true", help="skip the DVC part")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare_images.json")
    ap.add_argument("--case", type=Path, help=argparse.SUPPRESS)  # internal: one case, in its own process
    ap.add_argument("--no-draft", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return run_case(args.case, args.size, args.workers[0], not args.no_draft)

    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
    data = build(args.work, args.cifar_jpeg, args.pngs, args.jpegs)
    print(f"data: {data}", flush=True)
    interpreter_mb = measured([sys.executable, "-c", "import numpy, PIL.Image, ptpipe.images, time; time.sleep(0.3)"]
                              )["peak_rss_mb"]
    print(f"an idle interpreter with numpy, Pillow and ptpipe.images: {interpreter_mb} MB RSS")
    rows = read_cases(args.work, args.workers, args.size, args.pngs, args.jpegs, interpreter_mb)
    quality = draft_quality(args.work / "jpegs", args.size)
    print(f"JPEG draft: mean |draft - full| {quality['draft_vs_full']} vs |bicubic - Lanczos| "
          f"{quality['bicubic_vs_lanczos']} (levels of 255, {quality['jpegs']} JPEGs)")
    repo = Path(tempfile.mkdtemp(dir=args.work, prefix="dvc-repo-"))
    dvc_rows = [] if args.no_dvc else dvc_costs(args.work, repo)
    print("\n" + table(rows, dvc_rows))
    result = {"started": started, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "pillow": Image.__version__, "numpy": np.__version__,
              "data": data, "interpreter_rss_mb": interpreter_mb, "reads": rows, "jpeg_draft_quality": quality,
              "dvc": dvc_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average before {load_before}, after {result['loadavg_after']}; wrote {args.out}", flush=True)
    shutil.rmtree(repo)


if __name__ == "__main__":
    main()
