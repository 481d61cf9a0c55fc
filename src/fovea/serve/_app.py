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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request  # module level: FastAPI reads the routes' annotations from here
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.errors import FoveaError, ImageError
from fovea.serve._fleet import Fleet, Route, Served

log = logging.getLogger("fovea.serve")
CONFIG_ENV = "FOVEA_SERVE_CONFIG"


@dataclass
class ServeConfig:
    model: str  # a registry reference (NAME, NAME:VERSION, NAME:ALIAS) or a model folder
    db: str | None = None
    device: str = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_body_bytes: int = 20 * 2**20  # 20 MiB per request
    max_pixels: int = 64_000_000  # per image, checked from the header before decoding
    max_images: int = 64  # per request
    timeout_s: float = 30.0
    log_predictions: bool = True
    hybrid: bool = False  # answer from precomputed batch predictions (same model version, same bytes) when stored
    poll_s: float = 2.0  # how often the server follows the store (production alias, deployments, canary steps)
    admin_token: str | None = None  # enables /v1/admin/*; sent as "Authorization: Bearer TOKEN"
    drift_every_s: float = 600.0  # the periodic drift check (0: off); needs the store and the model's reference
    drift_window: int = 500  # the newest answers it tests
    drift_webhook: str | None = None  # POSTed the result when drift is found
    review_below: float = 0.0  # answers less confident than this go to the review queue (0: none)
    consensus: int = 1  # reviewers who must agree before a queued image is labelled

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class ModelFailed(Exception):
    """The model raised (or produced non-finite output) on a request's images."""


class HTTPProblem(Exception):
    """A request Fovea cannot serve: answered as {"error": message} with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Metrics:
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
        self.canary_percent = Gauge("fovea_canary_percent", "Share of requests the canary candidate answers",
                                    ["model_version"], registry=self.registry)


MAX_ID_CHARS = 200  # X-Client-Id, X-Request-Id


def _precomputed(store: Any, s: Served, blobs: list[bytes]) -> dict[int, dict[str, float]]:
    """{index: probabilities} for the images a batch job already predicted with this model version."""
    import hashlib

    from sqlalchemy import select

    from fovea.store import Prediction

    prints = [hashlib.sha256(b).hexdigest() for b in blobs]
    with store.session() as db:
        rows = db.execute(select(Prediction.fingerprint, Prediction.probabilities).where(
            Prediction.source == "batch", Prediction.model_name == s.name, Prediction.model_version == s.version,
            Prediction.fingerprint.in_(set(prints)))).all()
    found = {f: p for f, p in rows}
    return {i: {k: float(v) for k, v in found[f].items()} for i, f in enumerate(prints) if f in found}


def _decode(model: Any, blobs: list[bytes], max_pixels: int,
            stats: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[int, str]], np.ndarray | None]:
    """Decode and resize with the model's preprocessing; (images, kept indexes, (index, reason), image statistics
    of the kept images for drift monitoring, when ``stats``)."""
    from fovea.data import load_square
    from fovea.monitor import header_size, image_stats

    arrays, kept, bad = [], [], []
    for i, blob in enumerate(blobs):
        if not blob:
            bad.append((i, "empty file"))
            continue
        try:
            arrays.append(load_square(blob, model.image_size, max_pixels=max_pixels))
            kept.append(i)
        except ImageError as e:
            bad.append((i, e.reason))
    if not arrays:
        return torch.zeros(0, 3, model.image_size, model.image_size, dtype=torch.uint8), kept, bad, np.zeros((0, 9))
    x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    return x, kept, bad, image_stats(x, [header_size(blobs[i]) for i in kept]) if stats else None


def create_app(config: ServeConfig) -> Any:
    """The FastAPI application serving ``config.model``."""
    metrics = _metrics = _Metrics()
    state: dict[str, Any] = {"tasks": set()}  # tasks: shadow and reference predictions still running

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import concurrent.futures

        from fovea.artifact import META
        from fovea.store import Store

        state["decoders"] = concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                                                  thread_name_prefix="fovea-decode")
        fleet = Fleet(config, on_batch=lambda version, n: metrics.batch.labels(version).observe(n))
        state["fleet"] = fleet
        is_folder = (Path(config.model) / META).exists()
        if config.log_predictions or config.hybrid or not is_folder:
            state["store"] = await run_in_threadpool(Store, config.db)
        await fleet.open(state.get("store"))
        if config.log_predictions:
            from fovea.serve._log import PredictionLog

            state["log"] = PredictionLog(state["store"])
        controller = asyncio.get_running_loop().create_task(fleet.run(config.poll_s)) if fleet.follows else None
        watcher = (asyncio.get_running_loop().create_task(watch_drift())
                   if config.drift_every_s > 0 and "log" in state else None)
        state["ready"] = True
        s = fleet.current
        assert s is not None
        log.info("serving %s version %s (%d classes, %d px)%s", s.name, s.version, len(s.model.classes),
                 s.model.image_size, "; following its production alias and deployments" if fleet.follows else "")
        try:
            yield
        finally:
            state["ready"] = False
            for task in (controller, watcher):
                if task is not None:
                    task.cancel()
            for task in list(state["tasks"]):
                task.cancel()
            await fleet.close()
            state["decoders"].shutdown(wait=False, cancel_futures=True)
            if "log" in state:
                await run_in_threadpool(state["log"].close)

    app = FastAPI(title="Fovea", lifespan=lifespan,
                  description="Image classification: POST an image to /v1/predict; Open Inference Protocol v2 "
                              "under /v2; Prometheus metrics at /metrics.")

    def served() -> Served:
        fleet = state.get("fleet")
        if not state.get("ready") or fleet is None or fleet.current is None:
            raise HTTPProblem(503, "the model is still loading")
        return fleet.current  # type: ignore[no-any-return]

    def drift_once(s: Served) -> Any:
        """One drift check of the model answering now, over its newest answers; None when it cannot run yet."""
        from fovea._home import home
        from fovea.monitor import REFERENCE, alert, check, load_reference, window_from_store, write_drift_report

        folder = Path(getattr(s.model, "path", ""))
        if not (folder / REFERENCE).exists():
            return None
        try:
            window = window_from_store(state["store"], s.name, s.version, list(s.model.classes), last=config.drift_window)
        except FoveaError:  # nothing logged yet
            return None
        if len(window.sample) < min(50, config.drift_window):
            return None
        reference = load_reference(folder)
        result = check(s.model, folder, s.name, s.version, window, reference=reference)
        alert(result, config.drift_webhook)
        out = home() / "drift" / s.name / str(s.version)
        write_drift_report(out / "latest.html", result, reference)
        with (out / "history.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.to_dict()},
                               default=float) + "\n")
        return result

    async def watch_drift() -> None:
        while True:
            await asyncio.sleep(config.drift_every_s)
            fleet = state.get("fleet")
            if fleet is None or fleet.current is None:
                continue
            s = fleet.current
            try:
                result = await run_in_threadpool(drift_once, s)
            except Exception as e:  # noqa: BLE001 - monitoring must never take the server down
                log.warning("drift check failed: %s", e)
                continue
            if result is not None:
                label = str(s.version)
                metrics.drift_p.labels(label, "all").set(result.drift.p_value)
                for t in result.drift.tests:
                    metrics.drift_p.labels(label, t.family).set(t.p_value)
                metrics.drift_alert.labels(label).set(1.0 if result.alert else 0.0)

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
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        version = getattr(request.state, "model_version", None)
        if version is None:
            fleet = state.get("fleet")
            version = str(fleet.current.version) if fleet and fleet.current else "none"
        if path not in ("/metrics",):
            metrics.requests.labels(path, str(response.status_code), version).inc()
            metrics.latency.labels(path, version).observe(time.perf_counter() - start)
            if response.status_code >= 400:
                metrics.errors.labels(str(response.status_code), version).inc()
        return response

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_body_bytes:
            raise HTTPProblem(413, f"request body of {int(length):,} bytes is over the limit of "
                                   f"{config.max_body_bytes:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise HTTPProblem(413, f"request body over the limit of {config.max_body_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def images_of(request: Request) -> list[bytes]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("multipart/form-data"):
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > config.max_body_bytes:
                raise HTTPProblem(413, f"request body of {int(length):,} bytes is over the limit of "
                                       f"{config.max_body_bytes:,}")
            try:
                form = await request.form(max_files=config.max_images, max_fields=config.max_images)
            except Exception as e:  # noqa: BLE001 - malformed multipart in any of several ways
                raise HTTPProblem(400, f"malformed multipart body: {e}") from e
            blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
            if not blobs:
                raise HTTPProblem(422, "the multipart body has no file parts")
            return blobs
        body = await read_body(request)
        if ctype == "application/json":
            try:
                obj = json.loads(body)
                items = obj.get("images") or ([obj["image"]] if "image" in obj else None)
                if not isinstance(items, list) or not items:
                    raise ValueError
                return [base64.b64decode(x, validate=True) for x in items]
            except (ValueError, TypeError, AttributeError, KeyError, binascii.Error) as e:
                raise HTTPProblem(422, 'JSON must be {"image": BASE64} or {"images": [BASE64, ...]}') from e
        if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
            if not body:
                raise HTTPProblem(422, "empty body: send the image's bytes")
            return [body]
        raise HTTPProblem(415, f"content type {ctype!r} is not an image; send image/*, application/octet-stream, "
                               "multipart/form-data or application/json with base64")

    async def decode(model: Any, blobs: list[bytes]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]],
                                                              np.ndarray | None]:
        # A pool of its own, one thread per core: decoding on the 40 threads of the default pool gave glibc a
        # malloc arena per thread, each keeping freed image buffers (resident memory grew through a soak).
        return await asyncio.get_running_loop().run_in_executor(state["decoders"], _decode, model, blobs,
                                                                config.max_pixels, config.log_predictions)

    async def predict_blobs(s: Served, blobs: list[bytes]) -> tuple[torch.Tensor, np.ndarray, list[int],
                                                                    list[tuple[int, str]], dict[str, Any]]:
        """(decoded images, probabilities, indexes decoded, (index, reason) for the rest, what drift monitoring
        keeps: embeddings and image statistics); ModelFailed if the model itself fails."""
        if len(blobs) > config.max_images:
            raise HTTPProblem(413, f"{len(blobs)} images in one request; the limit is {config.max_images}")
        x, kept, bad, stats = await decode(s.model, blobs)
        if not kept:
            reasons = "; ".join(f"#{i}: {r}" for i, r in bad)
            raise HTTPProblem(422, f"not a usable image: {reasons}" if len(blobs) > 1 else f"not a usable image: {bad[0][1]}")
        probs, emb = split(s, await run_model(s, x))
        metrics.images.labels(str(s.version)).inc(len(kept))
        return x, probs, kept, bad, {"embeddings": emb, "stats": stats}

    def split(s: Served, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The forward pass returns probabilities and, where the model exposes it, the embedding, side by side."""
        c = len(s.model.classes)
        return out[:, :c], (out[:, c:] if out.shape[1] > c else None)

    async def run_model(s: Served, x: torch.Tensor) -> np.ndarray:
        try:
            return await asyncio.wait_for(s.batcher.submit(x), config.timeout_s)
        except asyncio.TimeoutError as e:
            raise HTTPProblem(504, f"no answer within {config.timeout_s:g} s") from e
        except Exception as e:  # noqa: BLE001 - the model's own failure (a canary may fall back)
            raise ModelFailed(f"{s.name}:{s.version} failed: {e}") from e

    def record(s: Served, request_id: str, blobs: list[bytes], kept: list[int], probs: np.ndarray | None,
               latency_ms: float, client: str | None, role: str = "served", deployment_id: int | None = None,
               error: str | None = None, seen: dict[str, Any] | None = None) -> None:
        """Queue one row per image for the store (``probs`` None: the model failed on them, ``error`` says how;
        ``seen``: embeddings and image statistics, row for row with ``kept``)."""
        pl = state.get("log")
        if pl is None:
            return
        import hashlib

        classes = s.model.classes
        for k, i in enumerate(kept):
            row: dict[str, Any] = {"request_id": request_id, "model_name": s.name, "model_version": s.version,
                                   "role": role, "deployment_id": deployment_id, "latency_ms": latency_ms,
                                   "fingerprint": hashlib.sha256(blobs[i]).hexdigest(), "client_id": client}
            if probs is None:
                row.update(label="", confidence=0.0, probabilities={}, error=error)
            else:
                p = probs[k]
                j = int(p.argmax())
                row.update(label=classes[j], confidence=float(p[j]),
                           probabilities={c: float(v) for c, v in zip(classes, p)})
            if seen is not None:
                if seen.get("embeddings") is not None:
                    row["embedding"] = np.asarray(seen["embeddings"][k], "<f4").tobytes()
                if seen.get("stats") is not None and k < len(seen["stats"]):
                    row["image_stats"] = [round(float(v), 5) for v in seen["stats"][k]]
            pl.put(row)
        metrics.log_dropped.set(pl.dropped)

    def in_background(route: Route, blobs: list[bytes], x: torch.Tensor, kept: list[int], request_id: str,
                      client: str | None) -> None:
        """The shadow (or a canary's production reference) sees the same images; nobody waits for it."""
        b = route.background
        assert b is not None

        async def work() -> None:
            start = time.perf_counter()
            xb, kept_b = x, kept
            try:
                if b.model.image_size != route.answer.model.image_size:
                    xb, kept_b, _, _ = await decode(b.model, blobs)
                probs, _ = split(b, await run_model(b, xb))
                record(b, request_id, blobs, kept_b, probs, (time.perf_counter() - start) * 1000, client,
                       route.background_role, route.deployment_id)
                outcome = "ok"
            except (ModelFailed, HTTPProblem) as e:
                record(b, request_id, blobs, kept_b, None, (time.perf_counter() - start) * 1000, client,
                       route.background_role, route.deployment_id, error=str(e))
                outcome = "error"
            metrics.background.labels(route.background_role, str(b.version), outcome).inc()

        task = asyncio.get_running_loop().create_task(work())
        state["tasks"].add(task)
        task.add_done_callback(state["tasks"].discard)

    def to_review(s: Served, request_id: str, unsure: list[tuple[bytes, np.ndarray]]) -> None:
        """Queue unsure answers for people to label, in the background."""
        from fovea import review

        def save() -> None:
            for blob, p in unsure:
                review.enqueue(state["store"], s.name, s.version, request_id, blob,
                               {c: float(v) for c, v in zip(s.model.classes, p)})

        task = asyncio.get_running_loop().create_task(run_in_threadpool(save))
        state["tasks"].add(task)
        task.add_done_callback(state["tasks"].discard)

    def overlays(s: Served, x: torch.Tensor, method: str) -> list[str]:
        """Grad-CAM (or another method) over each image, as PNG data URLs; runs on the inference thread."""
        import io

        from PIL import Image

        from fovea.explain import explain, overlay

        e = explain(s.model, x, method=method)
        urls = []
        for img, heat in zip(x.permute(0, 2, 3, 1).numpy(), e.maps):
            buf = io.BytesIO()
            Image.fromarray(overlay(img, heat)).save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        return urls

    async def answer(route: Route, blobs: list[bytes], request_id: str, client: str | None, start: float,
                     all_or_nothing: bool = False) -> tuple[Route, torch.Tensor, np.ndarray, list[int],
                                                             list[tuple[int, str]]]:
        """Image files answered as the roll-out routes them: a failing canary falls back to production, the
        shadow or reference sees the same images in the background, every answer is logged, unsure ones go to
        review. Returns the route that answered, the images, probabilities, indexes decoded and the rest
        (``all_or_nothing``: one unusable file fails the request, and nothing is logged)."""
        s = route.answer
        try:
            x, probs, kept, bad, seen = await predict_blobs(s, blobs)
        except ModelFailed as e:
            if route.fallback is None:
                raise HTTPProblem(500, str(e)) from e
            log.warning("%s; answered by %s:%s instead", e, route.fallback.name, route.fallback.version)
            _, kept_e, _, _ = await decode(s.model, blobs)
            record(s, request_id, blobs, kept_e, None, (time.perf_counter() - start) * 1000, client,
                   deployment_id=route.deployment_id, error=str(e))
            route = Route(route.fallback, route.deployment_id)
            s = route.answer
            x, probs, kept, bad, seen = await predict_blobs(s, blobs)
        if bad and all_or_nothing:
            raise HTTPProblem(422, "; ".join(f"#{i}: {r}" for i, r in bad))
        if route.background is not None:
            in_background(route, blobs, x, kept, request_id, client)
        record(s, request_id, blobs, kept, probs, (time.perf_counter() - start) * 1000, client,
               deployment_id=route.deployment_id, seen=seen)
        unsure = [(blobs[k], p) for k, p in zip(kept, probs) if float(p.max()) < config.review_below]
        if unsure and state.get("store") is not None:
            to_review(s, request_id, unsure)
        return route, x, probs, kept, bad

    @app.post("/v1/predict")
    async def predict(request: Request, explain: str | None = None) -> JSONResponse:
        start = time.perf_counter()
        served()
        fleet: Fleet = state["fleet"]
        client = request.headers.get("x-client-id")
        route = fleet.route(client)
        s = route.answer
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if explain is not None:
            from fovea.explain import METHODS

            if explain not in METHODS:
                raise HTTPProblem(422, f"explain={explain!r}: choose one of {', '.join(METHODS)}")
            if not hasattr(s.model, "net"):
                raise HTTPProblem(422, f"{s.name}:{s.version} cannot be explained here: overlays need one PyTorch "
                                       "network (not ONNX Runtime, torch.export or an ensemble)")
        blobs = await images_of(request)
        if len(blobs) > config.max_images:
            raise HTTPProblem(413, f"{len(blobs)} images in one request; the limit is {config.max_images}")
        results: list[dict[str, Any]] = [{} for _ in blobs]
        online = list(range(len(blobs)))
        if config.hybrid and explain is None:  # precomputed by `fovea batch` with this very version: no inference
            stored = await run_in_threadpool(_precomputed, state["store"], s, blobs)
            for i, probabilities in stored.items():
                label = max(probabilities, key=lambda c: probabilities[c])
                results[i] = {"label": label, "probability": probabilities[label], "probabilities": probabilities,
                              "source": "batch"}
            online = [i for i in online if i not in stored]
            metrics.hybrid_hits.labels(str(s.version)).inc(len(stored))
        probs, kept, bad, x = np.zeros((0, len(s.model.classes))), [], [], None
        if online:
            route, x, probs, kept_o, bad_o = await answer(route, [blobs[i] for i in online], request_id, client, start)
            s = route.answer
            kept, bad = [online[k] for k in kept_o], [(online[k], r) for k, r in bad_o]
        latency_ms = (time.perf_counter() - start) * 1000
        for i, p in zip(kept, probs):
            j = int(p.argmax())
            results[i] = {"label": s.model.classes[j], "probability": float(p[j]),
                          "probabilities": {c: float(v) for c, v in zip(s.model.classes, p)}}
            if config.hybrid:
                results[i]["source"] = "online"
        if explain is not None and x is not None:
            urls = await asyncio.get_running_loop().run_in_executor(fleet.executor, overlays, s, x, explain)
            for i, url in zip(kept, urls):
                results[i]["overlay"] = url
        for i, reason in bad:
            results[i] = {"error": reason}
        request.state.model_version = str(s.version)
        body: dict[str, Any] = {"request_id": request_id, "model": s.name, "model_version": s.version,
                                "predictions": results, "latency_ms": round(latency_ms, 3)}
        if route.deployment_id is not None:
            body["deployment_id"] = route.deployment_id
        if len(blobs) == 1:
            body.update(results[0])
        return JSONResponse(body, headers={"x-request-id": request_id})

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = bool(state.get("ready"))
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def model_named(name: str) -> Served:
        s = served()
        if name != s.name:
            raise HTTPProblem(404, f"no model {name!r} here; this server serves {s.name!r}")
        return s

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        s = model_named(name)
        size = s.model.image_size
        fleet: Fleet = state["fleet"]
        return {"name": s.name, "versions": [str(v.version) for v in fleet.loaded()], "platform": "fovea",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, size, size]},
                           {"name": "image_files", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(s.model.classes)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"classes": s.model.classes}}

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict[str, bool]:
        model_named(name)
        return {"ready": True}

    def loaded_version(name: str, version: str) -> Served:
        model_named(name)
        fleet: Fleet = state["fleet"]
        held = fleet.loaded()
        for v in held:
            if str(v.version) == version:
                return v
        raise HTTPProblem(404, f"version {version!r} of {name!r} is not loaded here; loaded: "
                               f"{', '.join(str(v.version) for v in held)}")

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> JSONResponse:
        """As /v1/predict routes: during a roll-out these answers follow it (canary share, shadow, fallback)."""
        model_named(name)
        fleet: Fleet = state["fleet"]
        return await infer_with(fleet.route(request.headers.get("x-client-id")), request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> JSONResponse:
        """One loaded version (production, a candidate, or the previous one), whatever the roll-out says."""
        return await infer_with(Route(loaded_version(name, version)), request)

    async def infer_with(route: Route, request: Request) -> JSONResponse:
        start = time.perf_counter()
        s = route.answer
        try:
            req = json.loads(await read_body(request))
            if len(req["inputs"]) != 1:
                raise ValueError("one input")
            inp = req["inputs"][0]
            dtype, shape, data = inp["datatype"], [int(d) for d in inp["shape"]], inp["data"]
            if not isinstance(data, list) or not data:
                raise ValueError("data")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise HTTPProblem(422, 'expected {"inputs": [{"name", "shape", "datatype", "data"}]}: one input, '
                                   "with its data as a non-empty list") from e
        request_id = str(req.get("id") or uuid.uuid4().hex)
        size = s.model.image_size
        if dtype == "UINT8":  # decoded pixels: answered, not logged (no file to fingerprint) nor shadowed
            if len(shape) != 4 or shape[1:] != [3, size, size]:
                raise HTTPProblem(422, f"UINT8 input must have shape [N, 3, {size}, {size}], got {shape}")
            try:
                arr = np.asarray(data).ravel()
            except ValueError:  # ragged nesting
                arr = np.asarray([], dtype=np.float64)
            if (arr.dtype.kind not in "iu" or arr.size != int(np.prod(shape)) or arr.min(initial=0) < 0
                    or arr.max(initial=0) > 255):
                raise HTTPProblem(422, f"UINT8 data must hold {int(np.prod(shape))} whole numbers in 0..255")
            if shape[0] > config.max_images:
                raise HTTPProblem(413, f"{shape[0]} images in one request; the limit is {config.max_images}")
            x = torch.from_numpy(arr.astype(np.uint8).reshape(shape))
            try:
                probs, _ = split(s, await run_model(s, x))
            except ModelFailed as e:
                if route.fallback is None or route.fallback.model.image_size != size:
                    raise HTTPProblem(500, str(e)) from e
                s = route.fallback
                probs, _ = split(s, await run_model(s, x))
        elif dtype == "BYTES":
            try:
                blobs = [base64.b64decode(d, validate=True) for d in data]
            except (binascii.Error, TypeError, ValueError) as e:
                raise HTTPProblem(422, "BYTES data must be base64-encoded image files") from e
            if len(blobs) > config.max_images:
                raise HTTPProblem(413, f"{len(blobs)} images in one request; the limit is {config.max_images}")
            # OIP answers one tensor: every input has a row, or the request fails
            route, _, probs, _, _ = await answer(route, blobs, request_id, request.headers.get("x-client-id"), start,
                                                 all_or_nothing=True)
            s = route.answer
        else:
            raise HTTPProblem(422, f"datatype {dtype!r} not supported: UINT8 (decoded images) or BYTES (image files)")
        request.state.model_version = str(s.version)
        labels = [s.model.classes[int(p.argmax())] for p in probs]
        return JSONResponse({"model_name": s.name, "model_version": str(s.version), "id": request_id,
                             "outputs": [{"name": "probabilities", "datatype": "FP32",
                                          "shape": [len(probs), len(s.model.classes)],
                                          "data": [float(v) for v in np.asarray(probs).ravel()]},
                                         {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels}]})

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """{"request_id": "...", "label": "dog"}: the true label of an answered request (concept drift, retraining)."""
        from sqlalchemy import select

        from fovea.store import Feedback, Prediction

        s = served()
        body = await json_body(request)
        request_id, label = body.get("request_id"), body.get("label")
        if not isinstance(request_id, str) or not request_id or not isinstance(label, str):
            raise HTTPProblem(422, 'send {"request_id": "...", "label": "CLASS"}')
        if label not in s.model.classes:
            raise HTTPProblem(422, f"label {label!r} is not one of {s.model.classes}")
        store = state.get("store")
        if store is None:
            raise HTTPProblem(409, "this server keeps no store (started with --no-log): feedback has nowhere to go")

        def save() -> bool:
            with store.session() as db:
                matched = db.scalar(select(Prediction.id).where(Prediction.request_id == request_id).limit(1))
                db.add(Feedback(request_id=request_id, label=label))
            return matched is not None

        matched = await run_in_threadpool(save)
        metrics.feedback.labels(str(s.version)).inc()
        return JSONResponse({"request_id": request_id, "label": label, "matched": matched}, status_code=201)

    def reviewer_store(request: Request) -> Any:
        """Review routes: open unless the server has an admin token, then they need it too."""
        if config.admin_token:
            admin(request)
        store = state.get("store")
        if store is None:
            raise HTTPProblem(409, "this server keeps no store: there is no review queue")
        return store

    @app.get("/v1/reviews")
    async def list_reviews(request: Request, state_: str = Query("pending", alias="state"), limit: int = 100) -> dict[str, Any]:
        from fovea import review

        store = reviewer_store(request)
        rows = await run_in_threadpool(review.reviews, store, served().name, state_, min(max(limit, 1), 500))
        for r in rows:
            r["image_url"] = f"/v1/reviews/{r['id']}/image"
        return {"classes": served().model.classes, "consensus": config.consensus, "reviews": rows}

    @app.get("/v1/reviews/{review_id}/image")
    async def review_image(request: Request, review_id: int) -> Response:
        from fastapi.responses import FileResponse

        from fovea import review
        from fovea.errors import FoveaError

        store = reviewer_store(request)
        try:
            row = await run_in_threadpool(review.get, store, review_id)
        except FoveaError as e:
            raise HTTPProblem(404, str(e)) from e
        if not Path(row.path).exists():
            raise HTTPProblem(404, f"the image of review #{review_id} is gone from {row.path}")
        return FileResponse(row.path)

    @app.post("/v1/reviews/{review_id}")
    async def review_vote(request: Request, review_id: int) -> dict[str, Any]:
        """{"label": "dog", "reviewer": "ana"}; "label": "" means none of the classes."""
        from fovea import review
        from fovea.errors import FoveaError

        store = reviewer_store(request)
        body = await json_body(request)
        label, reviewer = body.get("label"), body.get("reviewer") or "anonymous"
        if not isinstance(label, str) or not isinstance(reviewer, str):
            raise HTTPProblem(422, 'send {"label": "CLASS", "reviewer": "NAME"}')
        try:
            return await run_in_threadpool(review.vote, store, review_id, label, reviewer, served().model.classes,
                                           config.consensus)  # type: ignore[no-any-return]
        except FoveaError as e:
            raise HTTPProblem(404 if "no review" in str(e) else 409 if "already" in str(e) else 422, str(e)) from e

    # the web app and the read-only routes it uses ------------------------------------------------------------

    static = Path(__file__).parent / "static"

    @app.get("/", include_in_schema=False)
    async def web_app() -> Response:
        from fastapi.responses import FileResponse

        return FileResponse(static / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        from fastapi.responses import FileResponse

        path = static / name
        if name not in {p.name for p in static.iterdir()}:  # only the app's own files, no path tricks
            raise HTTPProblem(404, f"no {name}")
        return FileResponse(path)

    def viewer(request: Request) -> Any:
        """Read-only routes: open unless the server has an admin token, then they need it too."""
        return reviewer_store(request)

    @app.get("/v1/info")
    async def about() -> dict[str, Any]:
        s = served()
        return {"model": s.name, "version": s.version, "classes": s.model.classes,
                "explainable": hasattr(s.model, "net"), "review_below": config.review_below,
                "consensus": config.consensus, "token_required": bool(config.admin_token),
                "follows_deployments": bool(state["fleet"].follows)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        from fovea import registry

        store = viewer(request)
        name = served().name
        try:
            versions = await run_in_threadpool(registry.versions, name, store=store)
        except FoveaError:  # a model folder served outside the registry
            versions = []
        rows = []
        for v in versions:
            d = v.to_dict()
            d["ref"] = v.ref
            d["report"] = f"/v1/models/{v.version}/report" if (Path(v.path) / "report.html").exists() else None
            rows.append(d)
        return {"name": name, "versions": rows}

    @app.get("/v1/models/{version}/report", include_in_schema=False)
    async def model_report(request: Request, version: int) -> Response:
        from fastapi.responses import FileResponse

        from fovea import registry
        from fovea.errors import FoveaError

        store = viewer(request)
        try:
            v = await run_in_threadpool(registry.resolve, f"{served().name}:{version}", store=store)
        except FoveaError as e:
            raise HTTPProblem(404, str(e)) from e
        path = Path(v.path) / "report.html"
        if not path.exists():
            raise HTTPProblem(404, f"{v.ref} was registered without its report")
        return FileResponse(path)

    @app.get("/v1/deployments")
    async def list_deployments(request: Request) -> dict[str, Any]:
        from fovea import deploy

        store = viewer(request)
        views = await run_in_threadpool(deploy.deployments, served().name, store=store)
        return {"deployments": [await run_in_threadpool(with_figures, d, store) for d in views]}

    def drift_folder() -> Path:
        from fovea._home import home

        s = served()
        return home() / "drift" / s.name / str(s.version)

    @app.get("/v1/drift")
    async def drift_history(request: Request, last: int = 200) -> dict[str, Any]:
        viewer(request)
        path = drift_folder() / "history.jsonl"
        lines = path.read_text().splitlines()[-max(1, min(last, 5000)):] if path.exists() else []
        return {"history": [json.loads(line) for line in lines if line.strip()]}

    @app.get("/v1/drift/report", include_in_schema=False)
    async def drift_report(request: Request) -> Response:
        from fastapi.responses import FileResponse

        viewer(request)
        path = drift_folder() / "latest.html"
        if not path.exists():
            raise HTTPProblem(404, "no drift check has run yet")
        return FileResponse(path)

    @app.post("/v1/drift/check")
    async def drift_now(request: Request) -> dict[str, Any]:
        viewer(request)
        if "log" not in state:
            raise HTTPProblem(409, "predictions are not logged (--no-log): there is no traffic to test")
        try:
            result = await run_in_threadpool(drift_once, served())
        except (FoveaError, ValueError) as e:  # a broken reference, too few answers: say so
            raise HTTPProblem(409, str(e)) from e
        if result is None:
            raise HTTPProblem(409, "not enough answers logged yet, or the model has no drift reference")
        return {"summary": result.summary(), **result.to_dict()}

    # admin: the roll-out commands over HTTP, for a token holder --------------------------------------------------

    def admin(request: Request) -> Any:
        import hmac

        if not config.admin_token:
            raise HTTPProblem(403, "admin routes are off: start the server with --admin-token (or FOVEA_ADMIN_TOKEN)")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), config.admin_token.encode()):
            raise HTTPProblem(401, "admin routes need the header 'Authorization: Bearer TOKEN'")
        store = state.get("store")
        if store is None:
            raise HTTPProblem(409, "this server serves a model folder, not the registry: nothing to deploy")
        return store

    async def admin_call(fn: Any, *args: Any, **kw: Any) -> Any:
        from fovea.errors import FoveaError

        try:
            result = await run_in_threadpool(fn, *args, **kw)
        except FoveaError as e:
            raise HTTPProblem(409, str(e)) from e
        state["fleet"].wake.set()  # follow the change now, not at the next poll
        return result

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            obj = json.loads(await read_body(request) or b"{}")
        except ValueError as e:
            raise HTTPProblem(422, "the body must be a JSON object") from e
        if not isinstance(obj, dict):
            raise HTTPProblem(422, "the body must be a JSON object")
        return obj

    def with_figures(d: Any, store: Any) -> dict[str, Any]:
        from fovea import deploy

        out: dict[str, Any] = d.to_dict()
        if d.state == "running":
            out["figures"] = deploy.figures_now(d, store)
        return out

    @app.get("/v1/admin/deployments")
    async def admin_deployments(request: Request, name: str | None = None) -> dict[str, Any]:
        from fovea import deploy

        store = admin(request)
        views = await admin_call(deploy.deployments, name, store=store)
        return {"deployments": [await run_in_threadpool(with_figures, d, store) for d in views]}

    @app.post("/v1/admin/deploy")
    async def admin_deploy(request: Request) -> JSONResponse:
        """{"model": "pets:2", "strategy": "canary", "percent": 10, "steps": [10, 50, 100], "interval": "10m",
        "thresholds": {"min_agreement": 0.9}}"""
        from fovea import deploy

        store = admin(request)
        body = await json_body(request)
        try:
            percent, steps = body.get("percent"), body.get("steps")
            kw = {"percent": None if percent is None else float(percent),
                  "steps": None if steps is None else [float(x) for x in steps],
                  "interval_s": deploy.parse_duration(body.get("interval", 600)), "thresholds": body.get("thresholds")}
            ref, strategy = str(body["model"]), str(body["strategy"])
        except KeyError as e:
            raise HTTPProblem(422, f"missing {e.args[0]!r}: send {{\"model\": \"NAME:VERSION\", \"strategy\": ...}}") from e
        except (FoveaError, TypeError, ValueError) as e:  # a bad duration, a percent or step that is no number
            raise HTTPProblem(422, str(e)) from e
        d = await admin_call(deploy.start, ref, strategy, store=store, **kw)
        return JSONResponse(d.to_dict(), status_code=201)

    @app.post("/v1/admin/rollback")
    async def admin_rollback(request: Request) -> dict[str, Any]:
        """{"name": "pets", "reason": "..."}; the name defaults to the model this server serves."""
        from fovea import deploy

        store = admin(request)
        body = await json_body(request)
        name = str(body.get("name") or served().name)
        d = await admin_call(deploy.rollback, name, reason=str(body.get("reason") or "rolled back over HTTP"),
                             store=store)
        return d.to_dict()  # type: ignore[no-any-return]

    @app.get("/v1/admin/models")
    async def admin_models(request: Request) -> dict[str, Any]:
        from fovea import registry

        store = admin(request)
        versions = await admin_call(registry.versions, store=store)
        return {"versions": [v.to_dict() for v in versions]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        fleet = state.get("fleet")
        d = fleet.deployment if fleet else None
        metrics.canary_percent.clear()
        if d is not None and d.strategy == "canary" and d.candidate is not None:
            metrics.canary_percent.labels(str(d.candidate.version)).set(d.percent)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.fovea = state
    app.state.metrics = _metrics
    return app


def app_from_env() -> Any:
    """The app for ``uvicorn --factory``: its configuration in $FOVEA_SERVE_CONFIG (set by ``fovea serve``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with `fovea serve`")
    return create_app(ServeConfig(**json.loads(raw)))
