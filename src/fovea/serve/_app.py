"""``fovea serve``: the online prediction server (FastAPI + uvicorn).

Routes:
    POST /v1/predict[?explain=gradcam]  raw image bytes, multipart upload (one or many files) or JSON base64
    POST /v1/feedback                   {"request_id", "label"}: the true label of an answer
    GET  /v1/reviews, /v1/reviews/{id}/image; POST /v1/reviews/{id}    the review queue (labelling on the fly)
    GET  /v1/info, /v1/models, /v1/deployments, /v1/drift; POST /v1/drift/check    read-only, for the web app
    GET  /v1/admin/models, /v1/admin/deployments; POST /v1/admin/deploy, /v1/admin/rollback (bearer token)
    GET  /                              the web app (static files in ./static)
    GET  /v2/health/live, /v2/health/ready          Open Inference Protocol v2 (KServe, Triton clients)
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer        UINT8 tensors (N, 3, S, S) or BYTES (encoded image files), routed as
                                        /v1/predict is during a roll-out
    POST /v2/models/{name}/versions/{v}/infer   one loaded version (production, candidate or previous)
    GET  /metrics                       Prometheus: requests, latency, batch sizes, errors, per model version

Every answer that is not a prediction is a JSON ``{"error": ...}`` with a 4xx status: a non-image is 415 or
422, a body over the limit 413, a decompression bomb 422, a timeout 504. Decoding runs on worker threads,
inference on one thread fed by the micro-batcher, logging to the store on another; the event loop only
routes. Which version answers (production, a canary, a shadow behind it) is the ``Fleet``'s business
(``_fleet.py``), following the deployments in the store. The model is loaded and warmed up (a batch of 1 and
a full batch) before /v2/health/ready says yes.

Where things are: the routes in ``_routes/`` (predict: /v1/predict and /v2; labels: feedback and reviews;
web: the web app and its read-only routes; admin; metrics) only validate and delegate, through the
dependencies in ``_deps.py``, to ``_service.py`` (the answer path) and ``_drift.py``; request bodies are read
and parsed in ``_bodies.py``; ``ServerState`` (``_state.py``) is what the lifespan below opens and closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.errors import FoveaError
from fovea.serve import _drift
from fovea.serve._config import CONFIG_ENV, ServeConfig
from fovea.serve._fleet import Fleet
from fovea.serve._log import PredictionLog
from fovea.serve._routes import ROUTERS
from fovea.serve._state import HTTPProblem, Metrics, ModelFailed, ServerState
from fovea.store import Store

log = logging.getLogger("fovea.serve")
MAX_ID_CHARS = 200  # X-Client-Id, X-Request-Id


@asynccontextmanager
async def _serving(app: FastAPI, config: ServeConfig, metrics: Metrics) -> AsyncIterator[ServerState]:
    """Load and warm the model, open the store and the prediction log, start the controller and the drift
    watcher; on the way out stop them in turn, flushing the log."""
    from fovea.artifact import META

    decoders = concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="fovea-decode")
    fleet = Fleet(config, on_batch=lambda version, n: metrics.batch.labels(version).observe(n))
    state = ServerState(config, metrics, fleet, decoders)
    app.state.server = state
    is_folder = (Path(config.model) / META).exists()
    if config.log_predictions or config.hybrid or not is_folder:
        state.store = await run_in_threadpool(Store, config.db)
    await fleet.open(state.store)
    if config.log_predictions:
        assert state.store is not None
        state.log = PredictionLog(state.store)
    loop = asyncio.get_running_loop()
    controller = loop.create_task(fleet.run(config.poll_s)) if fleet.follows else None
    watcher = loop.create_task(_drift.watch(state)) if config.drift_every_s > 0 and state.log is not None else None
    state.ready = True
    s = fleet.current
    assert s is not None
    log.info("serving %s version %s (%d classes, %d px)%s", s.name, s.version, len(s.model.classes),
             s.model.image_size, "; following its production alias and deployments" if fleet.follows else "")
    try:
        yield state
    finally:
        state.ready = False
        for task in (controller, watcher, *state.tasks):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(state.checks.shutdown, wait=True)  # a drift check under way finishes first
        await fleet.close()
        decoders.shutdown(wait=False, cancel_futures=True)
        if state.log is not None:
            await run_in_threadpool(state.log.close)


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``config.model``; its ``ServerState`` is ``app.state.server`` while it runs."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _serving(app, config, metrics):
            yield

    app = FastAPI(title="Fovea", lifespan=lifespan,
                  description="Image classification: POST an image to /v1/predict; Open Inference Protocol v2 "
                              "under /v2; Prometheus metrics at /metrics.")
    app.state.metrics = metrics

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, e: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(ModelFailed)
    async def model_failed(request: Request, e: ModelFailed) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid request", "detail": json.loads(json.dumps(e.errors(), default=str))},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:  # a bug: still JSON, and logged
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        long = [h for h in ("x-client-id", "x-request-id") if len(request.headers.get(h, "")) > MAX_ID_CHARS]
        if long:  # they are stored with every answer and echoed back: ids, not payloads
            response: Any = JSONResponse({"error": f"{long[0]} is over {MAX_ID_CHARS} characters"}, status_code=422)
        else:
            response = await call_next(request)
        path = getattr(request.scope.get("route"), "path", "unmatched")
        version = getattr(request.state, "model_version", None)  # set by the route that answered
        if version is None:
            state: ServerState | None = getattr(app.state, "server", None)
            version = str(state.fleet.current.version) if state and state.fleet.current else "none"
        if path not in ("/metrics",):
            metrics.requests.labels(path, str(response.status_code), version).inc()
            metrics.latency.labels(path, version).observe(time.perf_counter() - start)
            if response.status_code >= 400:
                metrics.errors.labels(str(response.status_code), version).inc()
        return response

    for router in ROUTERS:
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: its configuration in $FOVEA_SERVE_CONFIG (set by ``run``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with `fovea serve`")
    return create_app(ServeConfig(**json.loads(raw)))


def check_servable(model: str, db: str | None = None) -> None:
    """FoveaError unless MODEL is a model folder or a registered version whose files are intact: call it before
    ``run`` for a one-line error rather than a failed start-up inside uvicorn."""
    from fovea import model_registry
    from fovea.artifact import META, read_meta

    if (Path(model) / META).exists():
        read_meta(model)
        return
    if ":" not in model and ("/" in model or Path(model).exists()):
        raise FoveaError(f"{model} is not a model folder (no {META}) and not a registry name")
    model_registry.verify(model_registry.resolve(model, store=Store(db)))


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve until interrupted: ``workers`` uvicorn processes, each building the app from ``config`` (passed to
    them as JSON in $FOVEA_SERVE_CONFIG) and loading the model itself."""
    import uvicorn

    os.environ[CONFIG_ENV] = config.to_json()
    uvicorn.run("fovea.serve._app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info", timeout_graceful_shutdown=10)
