"""Soak test of ``fovea serve``: 32 closed-loop clients for 5 minutes; errors, and resident memory over time.

The server runs as a user would run it: predictions logged to the store (a SQLite file in a temporary
FOVEA_HOME), micro-batching at its defaults. Its resident set size (VmRSS) is sampled every ``--every``
seconds; the first sample is taken after a 10 s warm-up under load, so allocator and cache growth of the
first requests does not count as a leak. At the end: requests answered, errors, RSS at start/end/max, and the
rows the store holds (every answered image must be logged).

    python bench/serve_soak.py                       # the pets cnn at /tmp/c5/pets, 32 clients, 300 s
    python bench/serve_soak.py --model runs/pets --seconds 300 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_batching import closed_loop, read_images, stop, wait_ready  # noqa: E402 - the sibling benchmark's client


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(args: argparse.Namespace, home: Path) -> None:
    images = read_images(args.images, 1000)
    log = home / "server.log"
    env = {**os.environ, "FOVEA_HOME": str(home)}
    cmd = [sys.executable, "-m", "fovea.cli", "serve", str(args.model), "--host", "127.0.0.1", "--port",
           str(args.port), "--device", "cpu"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{args.port}"
        await wait_ready(proc, base, log)
        samples: list[tuple[float, float]] = []

        async def sample() -> None:
            start = time.perf_counter()
            await asyncio.sleep(10)
            while time.perf_counter() - start < args.seconds + 10:
                samples.append((time.perf_counter() - start, rss_mib(proc.pid)))
                await asyncio.sleep(args.every)

        sampler = asyncio.create_task(sample())
        load = await closed_loop("soak", proc.pid, base, images, args.clients, args.seconds, warmup=10)
        sampler.cancel()
        samples.append((args.seconds + 10, rss_mib(proc.pid)))
        alive = proc.poll() is None
    finally:
        stop(proc, 30)
    from sqlalchemy import func, select

    from fovea.store import PredictionRecord, Store

    with Store(f"sqlite:///{home / 'fovea.db'}").session() as s:
        logged = s.scalar(select(func.count()).select_from(PredictionRecord))
    rss = [m for _, m in samples]
    print(f"{args.clients} clients for {args.seconds:.0f} s (after 10 s warm-up): {load.ok} answered, "
          f"{load.errors} errors{' (first: ' + load.first_error + ')' if load.errors else ''}; "
          f"{load.ok / args.seconds:.0f} requests/s, p50 {load.p50_ms:.0f} ms, p99 {load.p99_ms:.0f} ms")
    print(f"server resident memory: start {rss[0]:.0f} MiB, end {rss[-1]:.0f} MiB, max {max(rss):.0f} MiB "
          f"({len(rss)} samples every {args.every:.0f} s); server alive at the end: {alive}")
    print("RSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in samples))
    print(f"predictions logged in the store: {logged} (every answered request, warm-up included, is one row)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/c5/pets"))
    ap.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/pets/val")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--every", type=float, default=15)
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fovea-soak-") as home:
        asyncio.run(soak(args, Path(home)))


if __name__ == "__main__":
    main()
