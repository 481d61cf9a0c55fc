"""The Open Inference Protocol v2 routes under /v2 (NVIDIA's ``tritonclient``, KServe's ``InferenceRESTClient``).

Server metadata, health, model metadata and readiness (of the version answering now, or of one version the fleet
holds: production, a candidate, the previous production) and inference, JSON or with the binary tensor data
extension (the framing and the checks are ``_oip``'s; the answer path is ``_service.infer``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from fovea import __version__
from fovea.serve import _oip as oip
from fovea.serve import _service as service
from fovea.serve._deps import MaybeStateDep, ServedDep, StateDep
from fovea.serve._fleet import Route, Served
from fovea.serve._state import HTTPProblem, ServerState, problems

router = APIRouter()


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None  # absent when the output comes binary (parameters.binary_data_size)
    parameters: dict[str, Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


_BINARY = {"type": "string", "format": "binary",
           "description": f"binary tensor data extension: the JSON request ({oip.HEADER_LENGTH} bytes), then each "
                          "binary input's bytes"}
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "enum": list(oip.INPUTS)},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": sorted(set(oip.INPUTS.values()))},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
    "data": {"type": "array", "description": "UINT8: whole numbers 0..255, row-major (may nest); BYTES: base64 "
                                             "strings, one encoded image file each"}}}
_OUTPUT = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"},
    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}
INFER_REQUEST: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": _OUTPUT},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}}}}},
    "application/octet-stream": {"schema": _BINARY}}}}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": InferenceResponse, "description": "JSON; or, where an output is asked for binary, "
          f"application/octet-stream: the JSON answer ({oip.HEADER_LENGTH} bytes), then the binary outputs' bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **problems(400, 404, 408, 413, 415, 422, 500, 503, 504),
}
INFER_RESPONSES[400] = {**INFER_RESPONSES[400], "description": "A body that does not frame: the "
                        f"{oip.HEADER_LENGTH} header or a binary_data_size that does not match the bytes sent"}


def _named(s: Served, name: str) -> Served:
    if name != s.name:
        raise HTTPProblem(404, f"no model {name!r} here; this server serves {s.name!r}")
    return s


def _version(state: ServerState, name: str, version: str) -> Served:
    """One version the fleet holds (production, a candidate, the previous production), by its number."""
    held = state.fleet.held()
    for v in held:
        if str(v.version) == version:
            return v
    raise HTTPProblem(404, f"version {version!r} of {name!r} is not loaded here; loaded: "
                           f"{', '.join(str(v.version) for v in held if v.ready)}")


def _metadata(s: Served, versions: list[str]) -> ModelMetadata:
    m = s.model
    return ModelMetadata(**oip.model_metadata(s.name, versions, m.image_size, m.classes, m.answers_unknown))


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="fovea", version=__version__, extensions=oip.EXTENSIONS)


@router.get("/v2/health/live", response_model=Live)
async def live() -> Live:
    return Live(live=True)


@router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready, "description": "Loading"}})
async def ready(state: MaybeStateDep) -> JSONResponse:
    ok = state is not None and state.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=problems(404, 503))
async def model_metadata(name: str, state: StateDep, served: ServedDep) -> ModelMetadata:
    """The version answering now; ``versions`` lists every version loaded here."""
    return _metadata(_named(served, name), [str(v.version) for v in state.fleet.loaded()])


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=problems(404, 503))
async def model_ready(name: str, served: ServedDep) -> ModelReady:
    return ModelReady(name=_named(served, name).name, ready=True)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=problems(404, 503))
async def version_metadata(name: str, version: str, state: StateDep, served: ServedDep) -> ModelMetadata:
    """One version's own inputs and outputs (a candidate may differ in input size or classes)."""
    _named(served, name)
    s = _version(state, name, version)
    return _metadata(s, [str(s.version)])


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady,
            responses={**problems(404), 503: {"model": ModelReady, "description": "Held, still warming up"}})
async def version_ready(name: str, version: str, state: StateDep, served: ServedDep) -> JSONResponse:
    _named(served, name)
    s = _version(state, name, version)
    return JSONResponse({"name": s.name, "ready": s.ready}, status_code=200 if s.ready else 503)


@router.post("/v2/models/{name}/infer", response_model=None, openapi_extra=INFER_REQUEST, responses=INFER_RESPONSES)
async def infer(name: str, request: Request, state: StateDep, served: ServedDep) -> Response:
    """As /v1/predict routes: during a roll-out these answers follow it (canary share, shadow, fallback)."""
    _named(served, name)
    return await _infer(state, state.fleet.route(request.headers.get("x-client-id")), request)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=None, openapi_extra=INFER_REQUEST,
             responses=INFER_RESPONSES)
async def infer_version(name: str, version: str, request: Request, state: StateDep, served: ServedDep) -> Response:
    """One loaded version (production, a candidate, or the previous one), whatever the roll-out says."""
    _named(served, name)
    s = _version(state, name, version)
    if not s.ready:
        raise HTTPProblem(503, f"version {version} of {name!r} is still warming up")
    return await _infer(state, Route(s), request)


async def _infer(state: ServerState, route: Route, request: Request) -> Response:
    start = time.perf_counter()
    req = await oip.read_request(request, state.config.max_body_bytes)
    s, outputs = await service.infer(state, route, req, client=request.headers.get("x-client-id"), start=start)
    request.state.model_version = str(s.version)
    return oip.encode(req, s.name, str(s.version), outputs)
