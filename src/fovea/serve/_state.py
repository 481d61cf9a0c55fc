"""What one server process holds while it runs (``ServerState``), its Prometheus metrics, its errors and the
schema of their answers (``Problem``, declared on every route with ``problems``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from fovea.serve._config import ServeConfig
from fovea.serve._fleet import Fleet, Served
from fovea.serve._log import PredictionLog
from fovea.serve._similar import Galleries
from fovea.store import Store


class HTTPProblem(Exception):
    """A request Fovea cannot serve: answered as {"error": message} with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyTimeout(HTTPProblem):
    """The client did not send its whole body in time (a slow or stalled upload): 408."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s; send it faster or in "
                              "smaller pieces")


class ModelFailed(Exception):
    """The model raised (or produced non-finite output) on a request's images."""


class Problem(BaseModel):
    """An answer that is not a success. ``detail`` is there only for a request that failed FastAPI's validation
    (a path or query parameter of the wrong type or out of range)."""

    error: str
    detail: list[dict[str, Any]] | None = None


_MEANING = {
    400: "Malformed multipart body",
    401: "Wrong or missing admin token (the server has one: 'Authorization: Bearer TOKEN')",
    403: "Admin routes are off (the server was started without --admin-token)",
    404: "No such model, version, review or file",
    408: "The request body did not arrive within the body timeout (--body-timeout)",
    409: "Not possible in this server's state (no store, a deployment already running, nothing to test)",
    413: "A body or an image count over its limit",
    415: "A content type that is not an image",
    422: "A body or parameter that does not parse or is out of range, a non-image, a decompression bomb, or an "
         "X-Client-Id / X-Request-Id over 200 characters",
    500: "The model failed on these images",
    503: "The model is still loading (or the server is shutting down)",
    504: "No answer within the inference timeout (--timeout)",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each of ``statuses`` answered as a ``Problem``, with what it means."""
    return {status: {"model": Problem, "description": _MEANING[status]} for status in statuses}


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
    # Requests holding more than _service.LARGE_REQUEST_PIXELS decode here, one at a time, so that huge uploads
    # queue behind each other instead of taking every decoder from everyone else.
    large_decoders: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-decode-large"))
    store: Store | None = None  # None: a model folder served with --no-log and without --hybrid
    log: PredictionLog | None = None  # None: --no-log
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # shadow, reference and review work still running
    # Drift checks run here, one at a time, and shutting down waits for the one running: a check abandoned at
    # exit died inside matplotlib's FreeType code drawing its report, and took the process with it (rc 134).
    checks: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-drift"))
    similar: Galleries = field(default_factory=Galleries)  # /v1/similar: training and seen galleries
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
