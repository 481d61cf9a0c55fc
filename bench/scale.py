"""What grows with the data (issue 20): a cost-growth table at 3 000, 30 000 and 100 000 real photos.

The sets are random crops, flips and colour shifts of shared/data/pets and pets-extra, re-encoded as JPEG
(``bench/_scale_data.py`` builds them into bench-work/scale/N; this script builds a missing one first). Per size:

- check: ``fovea check DATA --json`` (every file read and hashed, perceptual-hash near-duplicates through
  multi-index hashing), its time and peak memory (``bench/scale_check.py``);
- decode: every image decoded once at 64 px into the disk store (``load_images(..., store="disk")``: the cache
  entry written chunk by chunk), time and peak memory;
- one training epoch of the ``cnn`` at 64 px (batch 128, ``--augment`` standard, bf16 autocast where the CPU has
  it, as ``fovea train`` on a CPU) over the train split, with the images in memory (``--cache memory``) and read
  from the cache file (``--cache disk``): its time, images/s and the process's peak memory (VmHWM, all of the
  process: torch, the model, the images or the read-ahead ring). Each epoch runs in a fresh process, memory and
  disk alternating, ``--repeats`` times; the table has the median. The cache entry is decoded beforehand, so an
  epoch reads decoded images from the page cache, as every epoch after the first does;
- batch: ``fovea batch RUN DATA`` with a cnn trained on the 3 000 set, rows/s (decode + predict + the database).

    nice -n 10 .venv/bin/python bench/scale.py                 # ~25 min on 2 cores; --sizes 3000 for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench-work" / "scale"
PY = sys.executable
SIZE = 64


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a command, by GNU time."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, int(r.stderr.strip().splitlines()[-1]) * 1024


def worker(args: argparse.Namespace) -> None:
    """In a fresh process: decode (``--decode``) or one epoch (``--epoch memory|disk``); prints a JSON line."""
    import torch
    import torch.nn.functional as F

    from fovea._system import cpu_has_bf16
    from fovea.data import Batches, DiskBatches, discover, load_images
    from fovea.models import create_model, default_config
    from fovea.runtime import autocast
    from fovea.training._loop import make_optimizer

    ds = discover(args.data, 0.2, 0)
    if args.decode:
        t0 = time.perf_counter()  # as fovea train decodes: val, then train, each its own cache entry
        n = sum(len(load_images(ds.splits[k], SIZE, cache=Path(args.cache_dir), store="disk", progress=False))
                for k in ("val", "train"))
        print(json.dumps({"seconds": time.perf_counter() - t0, "images": n, "peak": peak_rss()}))
        return
    store = args.epoch
    s = load_images(ds.splits["train"], SIZE, cache=Path(args.cache_dir), store=store, progress=False)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model("cnn", 2, image_size=SIZE).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = make_optimizer("sgd", model, 0.05, 5e-4)
    native = default_config("cnn")
    g = torch.Generator().manual_seed(0)
    kw = {"device": device, "mean": tuple(native["mean"]), "std": tuple(native["std"]), "augment": "standard",
          "shuffle": True, "drop_last": True, "generator": g, "channels_last": True}
    batches = (DiskBatches(s.images, s.labels, 128, file=s.file, **kw) if s.file is not None
               else Batches(s.images, s.labels, 128, **kw))
    amp = cpu_has_bf16()
    model.train()
    seen, t0 = 0, time.perf_counter()
    for x, y in batches:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    wall = time.perf_counter() - t0
    print(json.dumps({"seconds": wall, "images": seen, "images_per_s": seen / wall, "peak": peak_rss(),
                      "store": "disk" if s.file is not None else "memory"}))


def run_worker(extra: list[str], env: dict[str, str]) -> dict[str, float]:
    r = subprocess.run([PY, __file__, "--worker", *extra], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"worker {extra} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3000,30000,100000")
    ap.add_argument("--repeats", type=int, default=2, help="epochs per store and size (fresh processes, alternating)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: check, decode, epoch, batch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--epoch", choices=("memory", "disk"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(REPO / "bench"))
    from fovea._system import machine

    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(n) for n in args.sizes.split(",")]
    home = WORK / "home"
    env = {**os.environ, "FOVEA_HOME": str(home)}
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    for n in sizes:  # the sets, built if missing (byte-identical prefixes of one another)
        if not (WORK / str(n) / "train").is_dir():
            subprocess.run([PY, str(REPO / "bench/_scale_data.py"), "--n", str(n), "--out", str(WORK / str(n))],
                           check=True)
    rows: dict[int, dict[str, str]] = {n: {} for n in sizes}
    if "check" not in skip:
        from scale_check import check_rows

        for r in check_rows(sizes):
            rows[int(r["n"])].update(check=f"{r['seconds']:.0f} s", check_mem=gb(r["peak_rss"]))
    model = WORK / "cnn-3000"
    if "batch" not in skip and not (model / "model.json").exists():
        subprocess.run([PY, "-m", "fovea", "train", str(WORK / "3000"), "--model", "cnn", "--epochs", "3",
                        "--image-size", str(SIZE), "--out", str(model), "-q"], env=env, check=True)
    for n in sizes:
        data = str(WORK / str(n))
        cache = WORK / "cache" / str(n)
        if "decode" not in skip:
            for f in cache.glob("*"):
                f.unlink() if f.is_file() else None
            d = run_worker(["--data", data, "--cache-dir", str(cache), "--decode"], env)
            rows[n].update(decode=f"{d['seconds']:.0f} s", decode_mem=gb(d["peak"]),
                           decode_rate=f"{d['images'] / d['seconds']:.0f}")
            print(f"{n}: decoded {d['images']} images in {d['seconds']:.0f} s, peak {gb(d['peak'])}", flush=True)
        if "epoch" not in skip:
            runs: dict[str, list[dict[str, float]]] = {"memory": [], "disk": []}
            for _ in range(args.repeats):
                for store in ("memory", "disk"):
                    r = run_worker(["--data", data, "--cache-dir", str(cache), "--epoch", store], env)
                    runs[store].append(r)
                    print(f"{n}: {store} epoch {r['seconds']:.1f} s, {r['images_per_s']:.0f} img/s, "
                          f"peak {gb(r['peak'])}", flush=True)
            for store, rs in runs.items():
                rows[n][f"{store}_s"] = f"{statistics.median(r['seconds'] for r in rs):.1f} s"
                rows[n][f"{store}_ips"] = f"{statistics.median(r['images_per_s'] for r in rs):.0f}"
                rows[n][f"{store}_mem"] = gb(max(r["peak"] for r in rs))
            ratio = (statistics.median(r["images_per_s"] for r in runs["disk"])
                     / statistics.median(r["images_per_s"] for r in runs["memory"]))
            rows[n]["ratio"] = f"{ratio:.1%}"
        if "batch" not in skip:
            job = f"scale-{n}-{time.time():.0f}"
            wall, peak = timed([PY, "-m", "fovea", "batch", str(model), data, "--job", job,
                                "--db", f"sqlite:///{WORK / 'batch.db'}"], env)
            rows[n].update(batch=f"{n / wall:.0f}", batch_mem=gb(peak))
            print(f"{n}: batch {n / wall:.0f} rows/s, peak {gb(peak)}", flush=True)

    cols = [("check", "check"), ("check_mem", "check peak"), ("decode", "decode 64 px"), ("decode_mem", "decode peak"),
            ("memory_s", "epoch, memory"), ("memory_ips", "img/s, memory"), ("memory_mem", "peak, memory"),
            ("disk_s", "epoch, disk"), ("disk_ips", "img/s, disk"), ("disk_mem", "peak, disk"),
            ("ratio", "disk / memory img/s"), ("batch", "batch rows/s"), ("batch_mem", "batch peak")]
    print(f"\nmachine: {machine()}; load average at end {os.getloadavg()[0]:.2f}\n")
    print("| images | " + " | ".join(h for _, h in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for n in sizes:
        print(f"| {n:,} | " + " | ".join(rows[n].get(k, "-") for k, _ in cols) + " |")


if __name__ == "__main__":
    main()
