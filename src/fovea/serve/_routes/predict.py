"""Predictions: POST /v1/predict (the Open Inference Protocol v2 routes under /v2 are ``oip``'s)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from fovea.serve import _bodies as bodies
from fovea.serve import _service as service
from fovea.serve._deps import StateDep, get_served
from fovea.serve._state import problems

router = APIRouter()


@router.post("/v1/predict", dependencies=[Depends(get_served)], openapi_extra=bodies.IMAGE_REQUEST,
             responses=problems(400, 408, 413, 415, 422, 500, 503, 504))
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
