"""Micro-batching in ``fovea serve``: throughput and latency under concurrent clients, and the checks of issue 6.

Issue 6: "Under 32 concurrent clients on this CPU, micro-batching gives >= 3x the throughput of batch size 1 at
p99 <= 2x the single-request latency, measured side by side by a script in bench/."

In one run, each server in turn (``--repeat`` rounds, the order reversed every other round so that drift in the
machine's speed favours neither; the unbatched server, then one batched server per ``--max-wait-ms`` value):
1. start ``fovea serve MODEL --host 127.0.0.1 --no-log`` with ``--max-batch-size 1`` (no batching) or
   ``--max-batch-size 32 --max-wait-ms W``, and wait for /v2/health/ready;
2. single-request latency: one client, each request sent when the previous one is answered (``--single-seconds``);
3. ``--clients`` concurrent clients in a closed loop (each sends its next request as soon as its previous one is
   answered) for ``--seconds``, after ``--warmup`` seconds not counted: requests/s, p50/p95/p99 latency, errors,
   the mean batch size (from the server's /metrics) and the CPU time of the server and of the client;
4. stop the server (also on Ctrl-C or an error).
Before the servers, the model alone is timed in this process at batch 1 and at the largest batch (no HTTP, no
decoding): how much more images/s a bigger batch gives on this CPU. Every request is POST /v1/predict with the
raw bytes of an image from ``--images`` (read into memory once, sent round-robin).

    python bench/serve_batching.py
    python bench/serve_batching.py --model runs/pets --images ../shared/data/pets/val --max-wait-ms 0,2,5,10
    python bench/serve_batching.py --client raw --server-threads 1 --repeat 2

The load generator (one asyncio process, one keep-alive connection per client) runs on the same machine as the
server and shares its cores; the table says how much it took (client CPU). httpx costs ~2 ms of CPU per request
here (46 % of a core at 215 requests/s on 2 cores); ``--client raw`` (HTTP/1.1 written by hand) ~0.1 ms.
Run it on a quiet machine: another process on the same cores moves every figure, and even alone this 2-core VM's
speed drifts by tens of percent from minute to minute (hence ``--repeat``).

Measured on the 2-core AMD EPYC dev VM (no GPU), pets cnn 64 px with TTA, httpx, two runs of 2 rounds: batch
size 1 97-101 requests/s at 32 clients; batch 32 (wait 0/2/5/10 ms) 202-217 requests/s, 2.1-2.2x, mean batch 16,
p99 233-268 ms against 12-23 ms for one request alone. The model alone gives 1.8-2.8x images/s at batch 32 vs 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CONTENT_TYPES = {".png": "image/png", ".bmp": "image/bmp", ".webp": "image/webp", ".gif": "image/gif",
                 ".tif": "image/tiff", ".tiff": "image/tiff"}


@dataclass
class Load:
    """What one load phase measured (latencies of the requests answered inside the window)."""

    server: str
    clients: int
    seconds: float
    ok: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    server_p50_ms: float  # the server's own latency_ms (route start to answer), the rest is HTTP and the client
    batches: int  # forward passes in the window, from /metrics
    mean_batch: float
    server_cpu: float  # CPU seconds / window seconds: 1.0 is one core busy
    loop_cpu: float  # of which the server's main thread (the event loop: HTTP, routing, answers, access log)
    client_cpu: float  # this process
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


@dataclass
class Images:
    blobs: list[bytes]
    types: list[str]
    folder: str
    mean_bytes: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean_bytes = sum(map(len, self.blobs)) / len(self.blobs)


def read_images(folder: Path, limit: int) -> Images:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        sys.exit(f"no images under {folder}")
    # Every k-th file of the sorted list: spread over the class folders, not the first `limit` files of the first.
    step = max(1, len(files) // limit)
    files = files[::step][:limit]
    return Images([p.read_bytes() for p in files], [CONTENT_TYPES.get(p.suffix.lower(), "image/jpeg") for p in files],
                  str(folder))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(whole process, main thread) CPU seconds from /proc; (nan, nan) where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        text = Path(path).read_text()
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, utime 14, stime 15
        return (int(fields[11]) + int(fields[12])) / tick

    try:
        return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


def batch_totals(metrics_text: str) -> tuple[float, float]:
    """(forward passes, images) so far, from the fovea_batch_size histogram of /metrics."""
    count = total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("fovea_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("fovea_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def time_model(model_dir: str, batch: int, seconds: float, threads: int | None, rounds: int = 3) -> dict[str, float]:
    """The model alone in this process, ``predict_proba`` on decoded images: ms per call at batch 1 and ``batch``.

    Batch 1 and ``batch`` alternate for ``rounds`` rounds of ``seconds`` each and the medians are kept: the
    speed of this machine drifts by tens of percent from one minute to the next.
    """
    import torch

    from fovea.runtime import load

    if threads:
        torch.set_num_threads(threads)
    model = load(model_dir, "cpu")
    size = model.image_size
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8) for n in (1, batch)}
    for x in xs.values():
        for _ in range(5):  # allocators and oneDNN kernel selection, as the server's warm-up
            model.predict_proba(x)
    ms: dict[int, list[float]] = {n: [] for n in xs}
    for _ in range(rounds):
        for n, x in xs.items():
            runs, start = 0, time.perf_counter()
            while runs < 5 or time.perf_counter() - start < seconds:
                model.predict_proba(x)
                runs += 1
            ms[n].append((time.perf_counter() - start) / runs * 1000)
    out = {"tta": float(bool(getattr(model, "tta", False))), "threads": float(torch.get_num_threads()),
           "ms_batch_1": statistics.median(ms[1]), f"ms_batch_{batch}": statistics.median(ms[batch])}
    out["per_image_speedup"] = out["ms_batch_1"] * batch / out[f"ms_batch_{batch}"]
    return out


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT connections are no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def server(model: str, port: int, batch: int, wait_ms: float, log: Path, threads: int | None) -> Iterator[subprocess.Popen]:
    """``fovea serve`` in a subprocess, stopped (SIGINT, then SIGKILL after 15 s) however the block ends."""
    if not port_free(port):
        sys.exit(f"port {port} is in use on 127.0.0.1: give another with --port")
    cmd = [sys.executable, "-m", "fovea.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", f"{wait_ms:g}", "--no-log", "--device", "cpu"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        # Its own session: a Ctrl-C in the terminal reaches this script, which then stops the server itself.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc, 15)


def run_load(main: Coroutine[Any, Any, None]) -> None:
    """Run a bench's ``main`` on uvloop where installed (uvicorn[standard] brings it: a lighter event loop for the
    load generator), else asyncio's; Ctrl-C is one line, the servers being stopped by their own ``finally``."""
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted (the servers were stopped)")


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT (uvicorn's graceful shutdown: the lifespan stops the batcher and flushes the log), then SIGKILL
    after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 180.0) -> float:
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                sys.exit(f"the server exited with status {proc.returncode} before it was ready:\n{tail}")
            try:
                if (await c.get("/v2/health/ready")).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    sys.exit(f"the server was not ready within {timeout:.0f} s; see {log}")


class RawConnection:
    """One keep-alive HTTP/1.1 connection written by hand: ``--client raw``, a load generator lighter than httpx.

    Enough for uvicorn's answers (a Content-Length on every one); any error closes it and the next request
    opens a new one.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: {content_type}\r\n"
                         f"content-length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
            return int(head[9:12]), await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, StopIteration, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def closed_loop(label: str, pid: int, base: str, images: Images, clients: int, seconds: float,
                      warmup: float, raw: bool = False) -> Load:
    """``clients`` clients, each sending its next request as soon as its previous one is answered.

    Counted: the requests answered between ``warmup`` and ``warmup + seconds`` after the start; throughput is
    their number over ``seconds``. The batch sizes and CPU times are read at the same two instants.
    """
    headers = [{"content-type": t} for t in images.types]
    n = len(images.blobs)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    url = httpx.URL(base)
    conns = [RawConnection(url.host, url.port or 80) for _ in range(clients)] if raw else []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as c, \
            httpx.AsyncClient(base_url=base, timeout=10) as control:  # /metrics must not queue behind the load
        start = time.perf_counter()
        t0, t1 = start + warmup, start + warmup + seconds

        async def post(k: int, j: int) -> tuple[int, bytes]:
            if raw:
                return await conns[k].post("/v1/predict", images.blobs[j], images.types[j])
            r = await c.post("/v1/predict", content=images.blobs[j], headers=headers[j])
            return r.status_code, r.content

        async def client(k: int) -> None:
            i = k * (n // clients or 1)  # each client starts at a different image
            while True:
                sent = time.perf_counter()
                if sent >= t1:
                    return
                j = i % n
                i += 1
                status, content, error = 0, b"", ""
                try:
                    status, content = await post(k, j)
                    if status != 200:
                        error = f"HTTP {status}: {content[:200]!r}"
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as e:
                    error = f"{type(e).__name__}: {e}"
                done = time.perf_counter()
                if t0 <= done < t1:
                    if error:
                        errors.append(error)
                    else:
                        latencies.append((done - sent) * 1000)
                        server_ms.append(json.loads(content)["latency_ms"])

        async def snapshot(at: float) -> tuple[float, float, float, float, float]:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            cpu, loop_cpu = cpu_seconds(pid)
            mine = time.process_time()
            count, total = batch_totals((await control.get("/metrics")).text)
            return cpu, loop_cpu, mine, count, total

        tasks = [asyncio.create_task(client(k)) for k in range(clients)]
        try:
            a, b = await asyncio.gather(snapshot(t0), snapshot(t1))
            await asyncio.gather(*tasks)
        finally:  # cancelled (Ctrl-C): no client may outlive its connections
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for conn in conns:
                conn.close()
    ms = np.array(latencies) if latencies else np.array([float("nan")])
    batches = b[3] - a[3]
    return Load(
        server=label, clients=clients, seconds=seconds, ok=len(latencies), errors=len(errors),
        p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)), p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()), server_p50_ms=float(np.median(server_ms)) if server_ms else float("nan"),
        batches=int(batches), mean_batch=(b[4] - a[4]) / batches if batches else float("nan"),
        server_cpu=(b[0] - a[0]) / seconds, loop_cpu=(b[1] - a[1]) / seconds, client_cpu=(b[2] - a[2]) / seconds,
        first_error=errors[0] if errors else "",
    )


async def measure_server(args: argparse.Namespace, images: Images, label: str, batch: int, wait_ms: float,
                         round_: int) -> list[Load]:
    base, raw = f"http://127.0.0.1:{args.port}", args.client == "raw"
    log = args.work / f"server-{label.replace(' ', '_').replace('=', '')}-{round_}.log"
    with server(str(args.model), args.port, batch, wait_ms, log, args.server_threads) as proc:
        ready_s = await wait_ready(proc, base, log)
        print(f"  {label}: ready in {ready_s:.1f} s", flush=True)
        single = await closed_loop(label, proc.pid, base, images, 1, args.single_seconds, min(args.warmup, 1.0), raw)
        print(f"    1 client: {single.rps:,.0f} requests/s, p50 {single.p50_ms:.1f} ms, p99 {single.p99_ms:.1f} ms",
              flush=True)
        many = await closed_loop(label, proc.pid, base, images, args.clients, args.seconds, args.warmup, raw)
        print(f"    {many.clients} clients: {many.rps:,.0f} requests/s, p50 {many.p50_ms:.1f} ms, "
              f"p99 {many.p99_ms:.1f} ms, mean batch {many.mean_batch:.1f}, errors {many.errors}", flush=True)
        if many.first_error or single.first_error:
            print(f"    first error: {many.first_error or single.first_error}", flush=True)
    return [single, many]


def machine() -> str:
    from fovea._system import machine as hardware  # the CPU (and GPU) line every Fovea benchmark prints

    return f"{hardware()}, Python {sys.version.split()[0]}, httpx {httpx.__version__}"


def median_load(loads: list[Load]) -> Load:
    """The per-figure median over repeats (one Load when there is one round)."""
    if len(loads) == 1:
        return loads[0]
    fields = {k: statistics.median(getattr(x, k) for x in loads)
              for k, v in asdict(loads[0]).items() if isinstance(v, float) and k != "seconds"}
    return Load(server=loads[0].server, clients=loads[0].clients, seconds=loads[0].seconds,
                ok=int(statistics.median(x.ok for x in loads)), errors=sum(x.errors for x in loads),
                batches=int(statistics.median(x.batches for x in loads)), **fields)


def print_table(loads: list[Load]) -> None:
    header = ["server", "clients", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch",
              "server p50 ms", "server CPU (loop)", "client CPU"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for x in loads:
        cells = [x.server, str(x.clients), f"{x.rps:,.1f}", f"{x.p50_ms:.1f}", f"{x.p95_ms:.1f}", f"{x.p99_ms:.1f}",
                 str(x.errors), f"{x.mean_batch:.2f}", f"{x.server_p50_ms:.1f}",
                 f"{x.server_cpu * 100:.0f} % ({x.loop_cpu * 100:.0f} %)", f"{x.client_cpu * 100:.0f} %"]
        print("| " + " | ".join(cells) + " |")


async def run(args: argparse.Namespace) -> None:
    # Ctrl-C and SIGTERM cancel this task, so every `with server(...)` on the way out stops its server; left to
    # Python's default handler, the KeyboardInterrupt lands in whichever client task runs and the others go on.
    this, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert this is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, this.cancel)
    images = read_images(args.images, args.max_images)
    waits = [float(w) for w in str(args.max_wait_ms).split(",") if w.strip()]
    configs = [("batch=1", 1, 0.0)] + [(f"batch={args.max_batch_size} wait={w:g}ms", args.max_batch_size, w)
                                       for w in waits]
    print(f"{len(images.blobs)} images from {images.folder} (mean {images.mean_bytes / 1024:.1f} KiB), "
          f"model {args.model}; load average {os.getloadavg()[0]:.2f}")
    model = time_model(str(args.model), args.max_batch_size, args.model_seconds, args.server_threads)
    print(f"model alone in this process ({model['threads']:.0f} torch threads, TTA {'on' if model['tta'] else 'off'}): "
          f"{model['ms_batch_1']:.2f} ms at batch 1, {model[f'ms_batch_{args.max_batch_size}']:.2f} ms at batch "
          f"{args.max_batch_size}: {model['per_image_speedup']:.2f}x the images/s", flush=True)
    t_start = time.perf_counter()
    by_config: list[list[list[Load]]] = [[] for _ in configs]  # [config][round] -> [one client, --clients]
    for r in range(args.repeat):
        print(f"round {r + 1}/{args.repeat}", flush=True)
        order = list(range(len(configs)))
        for i in order if r % 2 == 0 else order[::-1]:  # alternate the order so drift does not favour one server
            by_config[i].append(await measure_server(args, images, *configs[i], r))
    rounds = [[x for c in by_config for x in c[r]] for r in range(args.repeat)]
    wall = time.perf_counter() - t_start
    merged = [median_load([rnd[i] for rnd in rounds]) for i in range(len(rounds[0]))]

    print(f"\n{args.clients} concurrent clients vs one client, {args.seconds:g} s each "
          f"({args.single_seconds:g} s for one client), {args.repeat} round(s)"
          f"{', medians over rounds' if args.repeat > 1 else ''}; all servers measured within {wall / 60:.1f} min\n")
    print_table(merged)
    if args.repeat > 1:
        print("\nevery round:\n")
        print_table([x for rnd in rounds for x in rnd])
    print(f"\nmachine: {machine()}; load average before the run {args.load_before:.2f}, after "
          f"{os.getloadavg()[0]:.2f}")
    print("the load generator runs on the same CPU as the server: 'client CPU' is the share of a core it used "
          "(100 % = one core), 'server CPU' the server's, of which '(loop)' its event-loop thread. "
          "p50/p95/p99: round trip seen by the client; 'server p50': the route's own latency_ms.")

    base_single, base_many = merged[0], merged[1]
    print(f"\nchecks (issue 6), {args.clients} clients; reference for latency: single-request latency = one client, "
          "one request at a time, on the same batched server (p50):")

    def check(name: str, ok: bool, figure: str) -> None:
        print(f"  [{'met' if ok else 'NOT MET'}] {name}: {figure}")

    for i in range(2, len(merged), 2):
        single, many = merged[i], merged[i + 1]
        ratio = many.rps / base_many.rps
        check(f"{many.server}: >= 3x the throughput of batch size 1", ratio >= 3,
              f"{ratio:.2f}x ({many.rps:,.0f} vs {base_many.rps:,.0f} requests/s, mean batch {many.mean_batch:.1f})")
        check(f"{many.server}: p99 <= 2x single-request latency", many.p99_ms <= 2 * single.p50_ms,
              f"p99 {many.p99_ms:.1f} ms = {many.p99_ms / single.p50_ms:.2f}x its single-request p50 "
              f"{single.p50_ms:.1f} ms ({many.p99_ms / single.p99_ms:.2f}x its single p99 {single.p99_ms:.1f} ms; "
              f"{many.p99_ms / base_single.p50_ms:.2f}x the unbatched server's single p50 {base_single.p50_ms:.1f} ms, "
              f"{many.p99_ms / base_single.p99_ms:.2f}x its p99 {base_single.p99_ms:.1f} ms)")
        if many.errors:
            print(f"    {many.errors} errors, e.g. {many.first_error}")
        # Closed loop: by Little's law the mean latency is clients / throughput, so the p99 target needs at least
        # clients / (2 x single p50) requests/s whatever the server does.
        need = args.clients / (2 * single.p50_ms / 1000)
        print(f"    closed loop: mean latency = clients / throughput, so p99 <= 2x {single.p50_ms:.1f} ms needs >= "
              f"{need:,.0f} requests/s ({need / base_many.rps:.1f}x batch size 1); the model alone gives at most "
              f"{1000 * args.max_batch_size / model[f'ms_batch_{args.max_batch_size}']:,.0f} images/s at batch "
              f"{args.max_batch_size}")

    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / f"result-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
                               "model_alone": model, "medians": [asdict(x) | {"rps": x.rps} for x in merged],
                               "rounds": [[asdict(x) | {"rps": x.rps} for x in rnd] for rnd in rounds]}, indent=2))
    print(f"\nfull result: {out}; server logs: {args.work}/server-*.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/c5/pets"), help="a Fovea model folder")
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "pets" / "val",
                    help="a folder of images (searched recursively), read into memory once")
    ap.add_argument("--max-images", type=int, default=1000, help="at most this many images, spread over the folder")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window with --clients clients")
    ap.add_argument("--single-seconds", type=float, default=10.0, help="measured window with one client")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window, not counted")
    ap.add_argument("--max-batch-size", type=int, default=32, help="of the batched servers")
    ap.add_argument("--max-wait-ms", default="5", help="of the batched servers; comma-separated for several, e.g. 0,2,5,10")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="httpx.AsyncClient, or HTTP/1.1 written by hand on asyncio streams (less CPU per request)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the servers (default: unset, PyTorch's own choice)")
    ap.add_argument("--model-seconds", type=float, default=1.0,
                    help="timing of the model alone: per batch size and round (3 rounds)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the table shows the median of each figure")
    ap.add_argument("--work", type=Path, default=Path("bench-work/serve_batching"), help="server logs and result JSON")
    args = ap.parse_args()
    if not (args.model / "model.json").exists():
        sys.exit(f"{args.model} is not a Fovea model folder (no model.json)")
    args.load_before = os.getloadavg()[0]
    run_load(run(args))


if __name__ == "__main__":
    main()
