"""Huge uploads against everyone else: other clients' latency while two clients keep uploading near-bombs.

Issue 18 measured two concurrent uploads of 64 PNGs just under the pixel guard (7990 x 7990 each) holding every
other request for ~48 s. Here ``fovea serve`` (logging off, the CPU) answers ``--clients`` closed-loop clients
sending real photos, first alone, then while two more clients upload such a request again and again. The server
runs twice: as shipped (requests over ``LARGE_REQUEST_PIXELS`` decode one at a time on a thread of their own,
within ``--timeout``) and with that threshold out of reach (every request on the shared decoders, as before).

    python bench/serve_fairness.py --model bench-work/pets-cnn --images ../shared/data/pets/val
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_batching import closed_loop, machine, port_free, read_images, stop, wait_ready  # noqa: E402 - sibling bench

SIDE = 7990  # just under the default pixel guard of 64 million


def near_bomb(side: int) -> bytes:
    """A PNG of one colour, ``side`` x ``side``: small on the wire (deflate), ``side``^2 pixels to decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 60)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def start(model: str, port: int, log: Path, shared: bool) -> subprocess.Popen:
    # As `fovea serve MODEL --no-log` does it, in one process, with the threshold moved out of reach for the
    # "shared decoders" run (uvicorn with one worker imports the app here, so the module attribute holds).
    code = ("import sys; from fovea.serve import _service\n"
            f"if {shared}: _service.LARGE_REQUEST_PIXELS = 10**18\n"
            "from fovea.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", code, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--no-log",
           "--device", "cpu"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def phase(base: str, pid: int, images: object, clients: int, seconds: float, bomb: bytes | None) -> dict:
    """The clients' latencies over ``seconds`` (after 3 s of warm-up); with ``bomb``, two more clients upload
    64 copies of it as one multipart request, again and again, from the start."""
    outcomes: list[tuple[int, float]] = []

    async def bomber() -> None:
        files = [("file", (f"{i}.png", bomb, "image/png")) for i in range(64)]
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            while True:
                sent = time.perf_counter()
                try:
                    r = await c.post("/v1/predict", files=files)
                    outcomes.append((r.status_code, time.perf_counter() - sent))
                except httpx.HTTPError:
                    outcomes.append((0, time.perf_counter() - sent))

    bombers = [asyncio.create_task(bomber()) for _ in range(2)] if bomb else []
    load = await closed_loop("fair", pid, base, images, clients, seconds, warmup=3)  # type: ignore[arg-type]
    for t in bombers:
        t.cancel()
    return {"load": load, "outcomes": outcomes}


async def run(args: argparse.Namespace) -> None:
    images = read_images(args.images, 500)
    bomb = near_bomb(SIDE)
    print(f"machine: {machine()}")
    print(f"near-bomb: {SIDE} x {SIDE} PNG, {len(bomb) / 1e3:.0f} kB; an upload is 64 of them "
          f"({64 * len(bomb) / 2**20:.1f} MiB, {64 * SIDE * SIDE / 1e9:.1f} billion pixels)")
    print("| decoding | huge uploads | clients' p50 ms | p99 ms | answered | huge uploads answered (status: n) |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (True, False):
            if not port_free(args.port):
                sys.exit(f"port {args.port} is in use")
            log = Path(tmp) / f"server-{shared}.log"
            proc = start(str(args.model), args.port, log, shared)
            try:
                base = f"http://127.0.0.1:{args.port}"
                await wait_ready(proc, base, log)
                for bomb_on in (False, True):
                    r = await phase(base, proc.pid, images, args.clients, args.seconds, bomb if bomb_on else None)
                    load, outs = r["load"], r["outcomes"]
                    codes = ", ".join(f"{c}: {sum(1 for s, _ in outs if s == c)}" for c in sorted({s for s, _ in outs}))
                    print(f"| {'shared (before)' if shared else 'large requests apart'} | {'2' if bomb_on else 'none'} "
                          f"| {load.p50_ms:.1f} | {load.p99_ms:.1f} | {load.ok} ({load.errors} errors) | {codes or '-'} |", flush=True)
            finally:
                stop(proc, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a run folder")
    ap.add_argument("--images", type=Path, default=Path("../shared/data/pets/val"), help="the clients' photos")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    os.environ.setdefault("FOVEA_HOME", tempfile.mkdtemp())
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
