"""``fovea check`` at 3 000, 30 000 and 100 000 images (issue 20): time and peak memory of the CLI, and the
near-duplicate groups it finds, on the sets of real photos that ``bench/_scale_data.py`` builds (crops, flips
and colour shifts of the 6000 pets and pets-extra photos, 128 px JPEGs; a set missing under ``--root`` is built
first, the smaller ones hard-linked from the largest).

Each size runs ``fovea check DATA --json`` once in a fresh process (the CLI as a user runs it: start-up, the
per-file inspection, duplicates, the JSON). Time is wall-clock. Peak RSS is the main process's maximum resident
set (GNU time's %M); from 256 files on the check inspects files in forked processes, so the table also has the
peak of their summed PSS (proportional set size: a page shared by n processes counts 1/n in each), sampled
every 0.1 s. Every file is read once beforehand, so the page cache is warm for every size.
The near-duplicate groups are perceptual hashes within 4 bits (the default): crops of one photo, so they grow
with n (each photo is the source of about n / 6000 images).

    flock /tmp/fovea-bench.lock .venv/bin/python bench/scale_check.py | tee bench-work/scale/check.txt

``check_rows(sizes)`` returns the rows for another bench (``bench/scale.py``) to print.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _scale_data import build  # noqa: E402 - sibling bench

SIZES = (3000, 30_000, 100_000)
ROOT = REPO / "bench-work" / "scale"
FOVEA = REPO / ".venv" / "bin" / "fovea"
TIME = "/usr/bin/time"  # GNU time: the child's peak resident memory


def ensure_sets(sizes: list[int] | tuple[int, ...], root: Path = ROOT) -> dict[int, Path]:
    """The folder of each size's set, built where missing (smaller ones hard-linked from the largest)."""
    largest = root / str(max(sizes))
    out = {}
    for n in sorted(sizes, reverse=True):
        out[n] = build(n, root / str(n), link_from=largest if n != max(sizes) else None, progress=False)
    return out


def _warm(data: Path) -> None:
    for p in data.rglob("*.jpg"):
        p.read_bytes()


def _tree_memory(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Sample the summed PSS of ``pid``'s descendants every 0.1 s (the forked workers share the parent's pages:
    PSS counts a shared page once in all, RSS once per process); the largest sum goes into ``peak[0]``."""
    import psutil

    root = psutil.Process(pid)
    while not stop.wait(0.1):
        total = 0
        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().pss
        peak[0] = max(peak[0], total)


def run_check(data: Path, *args: str) -> dict[str, Any]:
    """One ``fovea check DATA --json`` in a fresh process: seconds, peak RSS of the main process and peak PSS of
    all of its processes (bytes), and the report.

    The RSS comes from GNU time, not from ``os.wait4`` here: Linux carries a process's high-water mark across
    fork and exec, so a child started by this Python (torch imported: ~480 MB) would report at least that. It is
    the largest single process's peak; the forked workers are in the PSS sum."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as peak:
        cmd = [TIME, "-f", "%M", "-o", peak.name, str(FOVEA), "check", str(data), "--json", *args]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        stop, pss = threading.Event(), [0]
        sampler = threading.Thread(target=_tree_memory, args=(child.pid, stop, pss), daemon=True)
        sampler.start()
        returncode = child.wait()
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if returncode:
            err.seek(0)
            raise RuntimeError(f"fovea check {data} failed ({returncode}):\n{err.read().decode()[-3000:]}")
        out.seek(0)
        report = json.load(out)
        kib = int(peak.read().split()[-1])
    return {"seconds": seconds, "peak_rss": kib * 1024, "peak_pss_all": pss[0], "report": report}


def check_rows(sizes: list[int] | tuple[int, ...] = SIZES, root: Path = ROOT) -> list[dict[str, Any]]:
    """One row per size: n, files, seconds, peak_rss (bytes: the main process), peak_pss_all (bytes: all of its
    processes, sampled), near_groups, near_files (images in them), near_cross_split,
    exact_groups, load (the 1-minute load average before and after)."""
    sets = ensure_sets(sizes, root)
    rows = []
    for n in sorted(sizes):
        _warm(sets[n])
        before = os.getloadavg()[0]
        run = run_check(sets[n])
        r = run["report"]
        rows.append({
            "n": n, "files": r["files"], "seconds": round(run["seconds"], 2), "peak_rss": run["peak_rss"], "peak_pss_all": run["peak_pss_all"],
            "near_groups": len(r["near_duplicates"]),
            "near_files": sum(len(g["files"]) for g in r["near_duplicates"]),
            "near_cross_split": r["leakage"]["near"], "exact_groups": len(r["exact_duplicates"]),
            "load": (round(before, 2), round(os.getloadavg()[0], 2)),
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n | fovea check | files/s | peak RSS (main process) | peak PSS (all processes) "
             "| near-duplicate groups (images; across splits) | load before, after |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['seconds']:.1f} s | {r['files'] / r['seconds']:,.0f} | {r['peak_rss'] / 2**20:,.0f} MB | {r['peak_pss_all'] / 2**20:,.0f} MB "
                     f"| {r['near_groups']:,} ({r['near_files']:,}; {r['near_cross_split']:,}) "
                     f"| {r['load'][0]:.2f}, {r['load'][1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--root", type=Path, default=ROOT, help="where the sets are (built there when missing)")
    a = ap.parse_args()
    from fovea._system import machine

    print(f"Machine: {machine()}")
    print(f"Load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    rows = check_rows(a.sizes, a.root)
    print(table(rows))
    print(f"\nLoad average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
