"""Fovea against LitServe on the same CPU, model, decoder and load: the table of issue 18.

Issue 18: "at 32 clients Fovea with logging on is ahead of LitServe: >= 1.1x its throughput at <= 0.9x its p99,
and at 1 client keeps p50 <= 10 ms."

One server at a time, each started fresh ``--repeats`` times (the order reversed every other round, so that drift in
the machine's speed favours neither side):
- Fovea defaults: ``python -m fovea.cli serve MODEL --host 127.0.0.1 --port P --device cpu`` with FOVEA_HOME in a
  temporary folder (prediction logging on: every answer goes to a SQLite store there); 1 client, then
  ``--clients`` clients, on the same server;
- Fovea ``--no-log``: the same, predictions not stored; ``--clients`` clients;
- LitServe (``max_batch_size`` 32, ``batch_timeout`` 5 ms, its other settings at their defaults: one inference worker
  process, one API server process) with Fovea's own model and decoder inside: ``fovea.load(MODEL, "cpu")``'s
  ``predict_proba`` on images decoded by ``fovea.data.load_square`` at the model's image size, as ``fovea serve``'s
  ``decode_files`` does. The server is the script ``LITSERVE_SERVER`` below, written to a temporary folder.

The load generator is bench/serve_batching.py's ``closed_loop``: each client sends its next request as soon as its
previous one is answered, a POST /v1/predict whose body is the raw bytes of a held-out photo (``--images``, read
once, sent round-robin); ``--warmup`` seconds not counted, then ``--seconds`` measured. Memory is the peak resident
set size of the server's whole process tree (LitServe runs several processes), summed, sampled every 0.5 s from the
start of the warm-up; "server CPU" is the tree's CPU time over the measured window (100 % = one core busy).

LitServe is not a Fovea dependency; install it into the environment for this benchmark only:

    .venv/bin/pip install litserve
    python bench/serve_peers.py                                   # 5 s warm-up + 30 s per run, 2 repeats
    python bench/serve_peers.py --seconds 5 --warmup 2 --repeats 1   # a quick look

Run it on a quiet machine: the load generator shares the server's cores, and another process on them moves every
figure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_batching import Images, Load, closed_loop, machine, port_free, read_images, run_load, stop, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# The LitServe side. Three things make it answer the load generator's requests, none of which touches the model path:
# - LitServe reads a request body as JSON or a form before it crosses to the inference worker (``request.json()``
#   in its request handler); a raw image body is neither, so a middleware wraps the bytes as {"image": base64,
#   "arrival": time} (wrapping, parsing and unwrapping the 7 KiB pets photos: ~0.07 ms of CPU each, measured here);
# - api_path /v1/predict and healthcheck_path /v2/health/ready are Fovea's, which the load generator and
#   ``wait_ready`` use; the answer carries ``latency_ms`` (arrival in the API process to answer encoded), which the
#   load generator reads;
# - a /metrics route with the two lines of Fovea's batch-size histogram the load generator reads (the inference
#   worker writes its counts to a file after every batch), so the mean batch of both servers is measured alike.
LITSERVE_SERVER = '''\
"""LitServe serving a Fovea model; written and started by bench/serve_peers.py (not part of Fovea).

    python litserve_server.py MODEL PORT COUNTS_DIR
"""

import base64
import json
import os
import signal
import sys
import time
from pathlib import Path

import litserve as ls
from fastapi.responses import PlainTextResponse


class FoveaAPI(ls.LitAPI):
    """Fovea's predictor and decoder in LitServe's batching loop (decode, batch, predict, unbatch, encode)."""

    def __init__(self, model_dir, counts_dir):
        super().__init__(max_batch_size=32, batch_timeout=0.005, api_path="/v1/predict")
        self.model_dir, self.counts_dir = model_dir, counts_dir

    def setup(self, device):
        import fovea  # here, in the inference worker: the API processes never load torch

        self.model = fovea.load(self.model_dir, "cpu")
        self.counts = Path(self.counts_dir) / f"batches-{os.getpid()}.txt"
        self.batches = self.images = 0

    def decode_request(self, request):
        from fovea.data import load_square

        # (S, S, 3) uint8 at the model's image size, as `fovea serve`'s decode_files
        return request["arrival"], load_square(base64.b64decode(request["image"]), self.model.image_size)

    def batch(self, inputs):
        import numpy as np
        import torch

        arrivals, arrays = zip(*inputs)
        return arrivals, torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (B, 3, S, S) uint8

    def predict(self, x):
        arrivals, images = x
        probs = self.model.predict_proba(images)  # (B, C)
        self.batches, self.images = self.batches + 1, self.images + len(probs)
        part = self.counts.with_suffix(".part")
        part.write_text(f"{self.batches} {self.images}")
        part.replace(self.counts)  # atomic: /metrics never reads half a file
        return list(zip(arrivals, probs))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        arrival, probs = output
        classes = self.model.classes
        k = int(probs.argmax())
        return {"label": classes[k], "probability": float(probs[k]),
                "probabilities": {c: float(p) for c, p in zip(classes, probs)},
                "latency_ms": (time.monotonic() - arrival) * 1000}


class RawImageAsJSON:
    """POST /v1/predict with a raw image body -> the JSON LitServe's handler can read: {"image": base64, "arrival"}."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/predict":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        wrapped = json.dumps({"image": base64.b64encode(body).decode(), "arrival": time.monotonic()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(wrapped)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, if any
            sent = True
            return {"type": "http.request", "body": wrapped, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


def main():
    model_dir, port, counts_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # LitServe stops on KeyboardInterrupt; Python raises none where SIGINT was ignored when it started (a parent
    # in the background), so the server would not stop on the bench's SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def metrics():
        count = total = 0
        for f in Path(counts_dir).glob("batches-*.txt"):
            b, n = f.read_text().split()
            count, total = count + int(b), total + int(n)
        return PlainTextResponse(f"fovea_batch_size_count {count}\\nfovea_batch_size_sum {total}\\n")

    server = ls.LitServer(FoveaAPI(model_dir, counts_dir), accelerator="cpu", healthcheck_path="/v2/health/ready",
                          middlewares=[RawImageAsJSON])
    server.app.add_api_route("/metrics", metrics, methods=["GET"])
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class Server:
    """One row group of the table: how to start the server, and the client counts it is measured at."""

    label: str
    kind: str  # fovea | litserve
    clients: tuple[int, ...]
    no_log: bool = False


@dataclass
class Run:
    """One measured phase: what the load generator saw, and the server's process tree over the same time."""

    load: Load
    round: int
    tree_cpu: float  # CPU seconds of the server's whole process tree / measured seconds: 1.0 is one core busy
    peak_gib: float  # peak summed resident memory of the tree, warm-up included


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in /proc/*/stat (~4 ms for ~130 processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])  # field 4, after "pid (comm) state"
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the processes ``pids``, summed; those gone since count nothing."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        f = text[text.rindex(")") + 2:].split()  # from field 3 (state) on: utime is field 14, stime 15, rss 24
        cpu, rss = cpu + (int(f[11]) + int(f[12])) / tick, rss + int(f[21]) * page
    return cpu, rss


async def measure(label: str, proc: subprocess.Popen, base: str, images: Images, clients: int,
                  args: argparse.Namespace, round_: int) -> Run:
    """``closed_loop`` with the server tree's peak memory and its CPU time over the same window."""
    start = time.perf_counter()
    t0, t1 = start + args.warmup, start + args.warmup + args.seconds  # closed_loop's window, microseconds apart
    peak = 0

    async def sample_memory() -> None:
        nonlocal peak
        for i in itertools.count():
            if i % 10 == 0:  # the whole of /proc blocks the clients' event loop ~4 ms: every 5 s, not every sample
                pids = tree(proc.pid)
            peak = max(peak, usage(pids)[1])
            await asyncio.sleep(0.5)

    async def cpu_at(t: float) -> float:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        return usage(tree(proc.pid))[0]

    sampler = asyncio.create_task(sample_memory())
    try:
        load, a, b = await asyncio.gather(
            closed_loop(label, proc.pid, base, images, clients, args.seconds, args.warmup, args.client == "raw"),
            cpu_at(t0), cpu_at(t1))
    finally:
        sampler.cancel()
    run = Run(load, round_, (b - a) / args.seconds, peak / 2**30)
    print(f"    {clients} client(s): {load.rps:,.1f} requests/s, p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, "
          f"mean batch {load.mean_batch:.1f}, server CPU {run.tree_cpu * 100:.0f} %, peak {run.peak_gib:.2f} GiB, "
          f"errors {load.errors}{' (first: ' + load.first_error + ')' if load.errors else ''}", flush=True)
    return run


@contextmanager
def started(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A server in its own session, stopped however the block ends: SIGINT (both servers shut down gracefully on
    it), then after 20 s SIGKILL to whatever of its process group is left (LitServe's workers included)."""
    with log.open("wb") as out:
        # Its own session: a Ctrl-C in the terminal reaches this script, which then stops the server itself.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, 20)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            for _ in range(50):  # until the last of them has let go of the port the next server binds
                time.sleep(0.1)
                os.killpg(proc.pid, 0)
        except ProcessLookupError:  # the whole group is gone
            pass


async def measure_server(s: Server, args: argparse.Namespace, images: Images, work: Path, round_: int) -> list[Run]:
    if not port_free(args.port):
        sys.exit(f"port {args.port} is in use on 127.0.0.1: give another with --port")
    folder = work / f"{s.kind}{'-no-log' if s.no_log else ''}-{round_}"
    folder.mkdir()
    env = dict(os.environ)
    if s.kind == "fovea":
        env["FOVEA_HOME"] = str(folder)  # the prediction log's SQLite store goes here
        cmd = [sys.executable, "-m", "fovea.cli", "serve", str(args.model), "--host", "127.0.0.1", "--port",
               str(args.port), "--device", "cpu"] + (["--no-log"] if s.no_log else [])
    else:
        cmd = [sys.executable, str(work / "litserve_server.py"), str(args.model), str(args.port), str(folder)]
    base, log = f"http://127.0.0.1:{args.port}", folder / "server.log"
    with started(cmd, env, folder, log) as proc:
        ready_s = await wait_ready(proc, base, log)
        print(f"  {s.label}: ready in {ready_s:.1f} s", flush=True)
        return [await measure(s.label, proc, base, images, n, args, round_) for n in s.clients]


def spread(values: list[float], fmt: str) -> str:
    """'a–b' over the repeats (one figure when they print alike), as issue 18's table gives them."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def print_tables(groups: dict[tuple[str, int], list[Run]]) -> None:
    print("| server | clients | req/s | p50 ms | p99 ms | memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (label, clients), runs in groups.items():
        cells = [label, str(clients), spread([r.load.rps for r in runs], ",.0f"),
                 spread([r.load.p50_ms for r in runs], ".1f"), spread([r.load.p99_ms for r in runs], ".1f"),
                 spread([r.peak_gib for r in runs], ".2f") + " GiB"]
        print("| " + " | ".join(cells) + " |")
    print("\nevery run (server CPU: the whole process tree, 100 % = one core; client CPU: the load generator; "
          "server p50: the server's own latency_ms):\n")
    header = ["server", "clients", "round", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch",
              "server p50 ms", "server CPU", "client CPU", "peak memory"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for (label, clients), runs in groups.items():
        for r in runs:
            x = r.load
            cells = [label, str(clients), str(r.round + 1), f"{x.rps:,.1f}", f"{x.p50_ms:.1f}", f"{x.p95_ms:.1f}",
                     f"{x.p99_ms:.1f}", str(x.errors), f"{x.mean_batch:.1f}", f"{x.server_p50_ms:.1f}",
                     f"{r.tree_cpu * 100:.0f} %", f"{x.client_cpu * 100:.0f} %", f"{r.peak_gib:.2f} GiB"]
            print("| " + " | ".join(cells) + " |")


def print_checks(groups: dict[tuple[str, int], list[Run]], servers: list[Server], clients: int) -> None:
    fovea, _, lit = servers
    ours, theirs, single = groups[fovea.label, clients], groups[lit.label, clients], groups[fovea.label, 1]

    def median(runs: list[Run], key: str) -> float:
        return statistics.median(getattr(r.load, key) for r in runs)

    rps = median(ours, "rps") / median(theirs, "rps")
    p99 = median(ours, "p99_ms") / median(theirs, "p99_ms")
    p50 = median(single, "p50_ms")
    by_round = ", ".join(f"round {a.round + 1}: {a.load.rps / b.load.rps:.2f}x, {a.load.p99_ms / b.load.p99_ms:.2f}x"
                         for a, b in zip(ours, theirs))
    print(f"\nchecks (issue 18), medians over the repeats; Fovea defaults (prediction logging on) vs LitServe at "
          f"{clients} clients ({by_round}):")

    def check(name: str, ok: bool, figure: str) -> None:
        print(f"  [{'met' if ok else 'NOT MET'}] {name}: {figure}")

    check(f"throughput >= 1.1x LitServe's at {clients} clients", rps >= 1.1,
          f"{rps:.2f}x ({median(ours, 'rps'):,.1f} vs {median(theirs, 'rps'):,.1f} requests/s)")
    check(f"p99 <= 0.9x LitServe's at {clients} clients", p99 <= 0.9,
          f"{p99:.2f}x ({median(ours, 'p99_ms'):.1f} vs {median(theirs, 'p99_ms'):.1f} ms)")
    check("p50 <= 10 ms at 1 client", p50 <= 10, f"{p50:.1f} ms")


async def run(args: argparse.Namespace) -> None:
    # Ctrl-C and SIGTERM cancel this task, so every `with started(...)` on the way out stops its server.
    this, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert this is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, this.cancel)
    print(f"machine: {machine()}; litserve {importlib.metadata.version('litserve')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    images = read_images(args.images, args.max_images)
    print(f"{len(images.blobs)} images from {images.folder} (mean {images.mean_bytes / 1024:.1f} KiB), model "
          f"{args.model}; {args.warmup:g} s warm-up + {args.seconds:g} s per run, {args.repeats} repeat(s)", flush=True)
    servers = [
        Server("Fovea `fovea serve` defaults (prediction logging on)", "fovea", (1, args.clients)),
        Server("Fovea `--no-log`", "fovea", (args.clients,), no_log=True),
        Server("LitServe (max_batch_size 32, batch_timeout 5 ms, Fovea's own model and decoder inside)", "litserve",
               (args.clients,)),
    ]
    groups: dict[tuple[str, int], list[Run]] = {(s.label, n): [] for s in servers for n in s.clients}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fovea-peers-") as tmp:
        work = Path(tmp)
        (work / "litserve_server.py").write_text(LITSERVE_SERVER)
        for r in range(args.repeats):
            print(f"round {r + 1}/{args.repeats}", flush=True)
            for s in servers if r % 2 == 0 else servers[::-1]:  # alternate the order so drift favours neither side
                for x in await measure_server(s, args, images, work, r):
                    groups[s.label, x.load.clients].append(x)
    print(f"\n{args.clients} clients (and 1), closed loop, raw JPEG bodies, {args.warmup:g} s warm-up + "
          f"{args.seconds:g} s, {args.repeats} fresh start(s) of each server within "
          f"{(time.perf_counter() - t_start) / 60:.1f} min; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print_tables(groups)
    print_checks(groups, servers, args.clients)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "bench-work" / "pets-cnn", help="a Fovea model (run) folder")
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "pets" / "val",
                    help="a folder of held-out images (searched recursively), read into memory once")
    ap.add_argument("--max-images", type=int, default=1000, help="at most this many images, spread over the folder")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window of each run")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before each window, not counted")
    ap.add_argument("--repeats", type=int, default=2, help="fresh starts of each server")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="the load generator's HTTP client (see bench/serve_batching.py)")
    ap.add_argument("--port", type=int, default=8767)
    args = ap.parse_args()
    if importlib.util.find_spec("litserve") is None:
        sys.exit("litserve is not installed: .venv/bin/pip install litserve (for this benchmark only)")
    if not (args.model / "model.json").exists():
        sys.exit(f"{args.model} is not a Fovea model folder (no model.json)")
    run_load(run(args))


if __name__ == "__main__":
    main()
