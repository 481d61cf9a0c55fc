"""What one server process holds while it runs (``ServerState``), its Prometheus metrics, and its two errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fovea.serve._config import ServeConfig
from fovea.serve._fleet import Fleet, Served
from fovea.serve._log import PredictionLog
from fovea.store import Store


class HTTPProblem(Exception):
    """A request Fovea cannot serve: answered as {"error": message} with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ModelFailed(Exception):
    """The model raised (or produced non-finite output) on a request's images."""


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app: tests build several)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("fovea_requests", "HTTP requests answered", ["route", "status", "model_version"],
                                registry=self.registry)
        self.latency = Histogram("fovea_request_latency_seconds", "Time from request to answer", ["route", "model_version"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch = Histogram("fovea_batch_size", "Images per forward pass", ["model_version"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.errors = Counter("fovea_errors", "Requests answered with an error", ["status", "model_version"],
                              registry=self.registry)
        self.images = Counter("fovea_images", "Images predicted", ["model_version"], registry=self.registry)
        self.hybrid_hits = Counter("fovea_hybrid_hits", "Images answered from precomputed batch predictions",
                                   ["model_version"], registry=self.registry)
        self.log_dropped = Gauge("fovea_prediction_log_dropped", "Predictions not written to the store",
                                 registry=self.registry)
        self.background = Counter("fovea_background_predictions", "Shadow and reference predictions (not answered)",
                                  ["role", "model_version", "outcome"], registry=self.registry)
        self.drift_p = Gauge("fovea_drift_p_value", "The latest drift check's p-value per test family ('all': "
                             "the corrected overall one)", ["model_version", "family"], registry=self.registry)
        self.drift_alert = Gauge("fovea_drift_alert", "1 when the latest drift check found drift",
                                 ["model_version"], registry=self.registry)
        self.feedback = Counter("fovea_feedback", "True labels received", ["model_version"], registry=self.registry)
        self.unknown = Counter("fovea_unknown_answers", "Images answered 'unknown' (none of the model's classes)",
                               ["model_version"], registry=self.registry)
        self.canary_percent = Gauge("fovea_canary_percent", "Share of requests the canary candidate answers",
                                    ["model_version"], registry=self.registry)


@dataclass
class ServerState:
    """Made in the app's lifespan and kept on ``app.state.server``; the routes get it through ``StateDep``."""

    config: ServeConfig
    metrics: Metrics
    fleet: Fleet  # the versions held, and which one answers each request
    decoders: concurrent.futures.ThreadPoolExecutor  # image decoding (see _service.decode for why a pool of its own)
    store: Store | None = None  # None: a model folder served with --no-log and without --hybrid
    log: PredictionLog | None = None  # None: --no-log
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # shadow, reference and review work still running
    # Drift checks run here, one at a time, and shutting down waits for the one running: a check abandoned at
    # exit died inside matplotlib's FreeType code drawing its report, and took the process with it (rc 134).
    checks: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-drift"))
    ready: bool = False  # the model is loaded and warmed up (/v2/health/ready)

    def served(self) -> Served:
        """The version answering now; 503 while the model is loading (or the server is shutting down)."""
        if not self.ready or self.fleet.current is None:
            raise HTTPProblem(503, "the model is still loading")
        return self.fleet.current

    async def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the drift-check thread."""
        return await asyncio.get_running_loop().run_in_executor(self.checks, fn, *args)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background; nobody waits for it, shutting down cancels it."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
