"""``fovea serve``: the online prediction server (FastAPI + uvicorn).

Routes:
    POST /v1/predict[?explain=gradcam]  raw image bytes, multipart upload (one or many files) or JSON base64
    POST /v1/similar?k=10&in=training   the nearest training (in=seen: already answered) images by the embedding
    GET  /v1/similar/images/{index}     one training image of a /v1/similar answer
    POST /v1/feedback                   {"request_id", "label"}: the true label of an answer
    GET  /v1/reviews, /v1/reviews/{id}/image; POST /v1/reviews/{id}    the review queue (labelling on the fly)
    GET  /v1/data?class=&filter=        the served version's training images and their flags (the data page);
    GET  /v1/data/{id}/image|gradcam|similar; POST /v1/data/{id}/review    one of them; to the review queue
    GET  /v1/info, /v1/models, /v1/deployments, /v1/drift; POST /v1/drift/check    read-only, for the web app
    GET  /v1/admin/models, /v1/admin/deployments; POST /v1/admin/deploy, /v1/admin/rollback (bearer token)
    GET  /                              the web app (static files in ./static)
    GET  /v2, /v2/health/live, /v2/health/ready     Open Inference Protocol v2 (KServe, Triton clients)
    GET  /v2/models/{name}[/versions/{v}], /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}/infer        UINT8 tensors (N, 3, S, S) or BYTES (encoded image files), JSON or binary
                                        tensor data; routed as /v1/predict is during a roll-out
    POST /v2/models/{name}/versions/{v}/infer   one loaded version (production, candidate or previous)
    GET  /metrics                       Prometheus: requests, latency, batch sizes, errors, per model version

Every answer that is not a prediction is a JSON ``{"error": ...}`` with a 4xx status: a non-image is 415 or
422, a body over the limit 413, a decompression bomb 422, a timeout 504, a body that does not arrive within
``body_timeout_s`` 408. A 500 is a model that failed or a bug (logged with its traceback); it is counted on
/metrics like every other answer. A client that hangs up mid-body is one INFO line (counted as 499). Decoding
runs on worker threads, inference on one thread fed by the micro-batcher, logging to the store on another; the
event loop only routes. Which version answers (production, a canary, a shadow behind it) is the ``Fleet``'s
business (``_fleet.py``), following the deployments in the store. The model is loaded and warmed up (a batch of 1
and a full batch) before /v2/health/ready says yes.

Where things are: the routes in ``_routes/`` (predict: /v1/predict; similar: /v1/similar; oip: /v2; labels:
feedback and reviews; data: the data page; web: the web app and its read-only routes; admin; metrics) only
validate and delegate, through the dependencies in ``_deps.py``, to ``_service.py`` (the answer path),
``_similar.py`` (the galleries), ``_dataview.py`` (the data page's table) and ``_drift.py``; request bodies are read and parsed in ``_bodies.py``, OIP tensors (JSON or binary) in
``_oip.py``; ``ServerState`` (``_state.py``) is what the lifespan below opens and closes; ``Guard`` below counts
every answer and enforces the body deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
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
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fovea.errors import FoveaError
from fovea.serve import _drift
from fovea.serve._config import CONFIG_ENV, ServeConfig
from fovea.serve._fleet import Fleet
from fovea.serve._log import PredictionLog
from fovea.serve._routes import ROUTERS
from fovea.serve._state import BodyTimeout, HTTPProblem, Metrics, ModelFailed, ServerState
from fovea.store import Store

log = logging.getLogger("fovea.serve")
MAX_ID_CHARS = 200  # X-Client-Id, X-Request-Id
CLIENT_GONE = 499  # nginx's "client closed request": counted on /metrics, never seen by the client


class Guard:
    """ASGI middleware every HTTP request passes first: X-Client-Id / X-Request-Id over ``MAX_ID_CHARS`` refused
    (422), the body deadline, a bug answered as a JSON 500, and every answer counted on /metrics, 5xx included.

    Plain ASGI rather than ``@app.middleware("http")``: a bug there escaped to Starlette's outermost handler, past
    the counting, so no 500 ever reached /metrics; and BaseHTTPMiddleware reads the body in a task of its own, which
    turns an error raised by ``receive`` (the deadline's 408) into an ExceptionGroup the routes cannot catch.

    The deadline: a body must arrive whole within ``body_timeout_s`` of its first read, or the read raises
    ``BodyTimeout`` (408) in whichever route is reading it (raw, JSON, multipart, OIP alike). Once the body is in,
    ``receive`` is passed through untouched: it then only waits for the client to hang up.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, body_timeout_s: float, app_state: Any) -> None:
        self.app, self.metrics, self.body_timeout_s, self.app_state = app, metrics, body_timeout_s, app_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        headers = Headers(scope=scope)
        long = [h for h in ("x-client-id", "x-request-id") if len(headers.get(h, "")) > MAX_ID_CHARS]
        try:
            if long:  # they are stored with every answer and echoed back: ids, not payloads
                answer = JSONResponse({"error": f"{long[0]} is over {MAX_ID_CHARS} characters"}, status_code=422)
                await answer(scope, receive, sending)
            else:
                await self.app(scope, self._timed(receive), sending)
        except Exception as e:
            log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=e)
            if status is not None:  # the answer is under way: nothing to do but drop the connection
                raise
            answer = JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)
            await answer(scope, receive, sending)
        finally:
            if status is not None:  # not a request cancelled before it was answered (the server shutting down)
                self._count(scope, status, time.perf_counter() - start)

    def _timed(self, receive: Receive) -> Receive:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        done = False

        async def timed_receive() -> Message:
            nonlocal deadline, done
            if done:
                return await receive()
            deadline = deadline or loop.time() + self.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed_receive

    def _count(self, scope: Scope, status: int, seconds: float) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        if path == "/metrics":
            return
        version = scope.get("state", {}).get("model_version")  # set by the route that answered
        if version is None:
            state: ServerState | None = getattr(self.app_state, "server", None)
            version = str(state.fleet.current.version) if state and state.fleet.current else "none"
        self.metrics.requests.labels(path, str(status), version).inc()
        self.metrics.latency.labels(path, version).observe(seconds)
        if status >= 400:
            self.metrics.errors.labels(str(status), version).inc()


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
    # What start-up made (PyTorch, FastAPI, the model: ~225 000 objects) lives as long as the server: freeze it out
    # of the garbage collector, whose every full collection walked it all, a 120 ms pause for whichever requests
    # were under way (issue 18's p99, at 1.75x p95 with 32 clients).
    gc.collect()
    gc.freeze()
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
        gc.unfreeze()  # what start-up froze may be collected again (tests start many servers in one process)
        await fleet.close()
        decoders.shutdown(wait=False, cancel_futures=True)
        state.large_decoders.shutdown(wait=False, cancel_futures=True)
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
        errors = json.loads(json.dumps(e.errors(), default=str))
        first = errors[0] if errors else {}
        where = " ".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', '')}".rstrip(": "),
                             "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)  # 405: Allow

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect) -> Response:
        # Not a fault of the server's: one line, no traceback. Nobody reads the answer; /metrics counts it.
        log.info("client disconnected before sending all of its body: %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_GONE)

    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(Guard, metrics=metrics, body_timeout_s=config.body_timeout_s, app_state=app.state)
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
