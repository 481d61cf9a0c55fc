"""Predictions: POST /v1/predict, and the Open Inference Protocol v2 routes under /v2 (KServe, Triton clients)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from fovea.serve import _bodies as bodies
from fovea.serve import _service as service
from fovea.serve._deps import MaybeStateDep, ServedDep, StateDep, get_served
from fovea.serve._fleet import Route, Served
from fovea.serve._state import HTTPProblem, ServerState

router = APIRouter()


@router.post("/v1/predict", dependencies=[Depends(get_served)])
async def predict(request: Request, state: StateDep, explain: str | None = None) -> JSONResponse:
    start = time.perf_counter()
    client = request.headers.get("x-client-id")
    route = state.fleet.route(client)
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    if explain is not None:
        service.check_explainable(route.answer, explain)
    blobs = await bodies.image_files(request, state.config)
    body = await service.predict(state, route, blobs, request_id=request_id, client=client, start=start,
                                 explain=explain)
    request.state.model_version = str(body["model_version"])
    return JSONResponse(body, headers={"x-request-id": request_id})


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(state: MaybeStateDep) -> JSONResponse:
    ok = state is not None and state.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _named(s: Served, name: str) -> Served:
    if name != s.name:
        raise HTTPProblem(404, f"no model {name!r} here; this server serves {s.name!r}")
    return s


@router.get("/v2/models/{name}")
async def model_metadata(name: str, state: StateDep, served: ServedDep) -> dict[str, Any]:
    s = _named(served, name)
    size = s.model.image_size
    return {"name": s.name, "versions": [str(v.version) for v in state.fleet.loaded()], "platform": "fovea",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, size, size]},
                       {"name": "image_files", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(s.model.classes)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"classes": s.model.classes}}


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, served: ServedDep) -> dict[str, bool]:
    _named(served, name)
    return {"ready": True}


@router.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request, state: StateDep, served: ServedDep) -> JSONResponse:
    """As /v1/predict routes: during a roll-out these answers follow it (canary share, shadow, fallback)."""
    _named(served, name)
    return await _infer(state, state.fleet.route(request.headers.get("x-client-id")), request)


@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, request: Request, state: StateDep, served: ServedDep) -> JSONResponse:
    """One loaded version (production, a candidate, or the previous one), whatever the roll-out says."""
    _named(served, name)
    held = state.fleet.loaded()
    for v in held:
        if str(v.version) == version:
            return await _infer(state, Route(v), request)
    raise HTTPProblem(404, f"version {version!r} of {name!r} is not loaded here; loaded: "
                           f"{', '.join(str(v.version) for v in held)}")


async def _infer(state: ServerState, route: Route, request: Request) -> JSONResponse:
    start = time.perf_counter()
    inp = await bodies.infer_input(request, state.config.max_body_bytes)
    body = await service.infer(state, route, inp, client=request.headers.get("x-client-id"), start=start)
    request.state.model_version = body["model_version"]
    return JSONResponse(body)
