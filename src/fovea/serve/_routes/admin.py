"""The roll-out commands over HTTP, for a holder of the admin token (``Authorization: Bearer TOKEN``):
GET /v1/admin/models, /v1/admin/deployments; POST /v1/admin/deploy, /v1/admin/rollback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from fovea import deploy, model_registry
from fovea.errors import FoveaError
from fovea.serve import _bodies as bodies
from fovea.serve._deps import AdminStoreDep, StateDep
from fovea.serve._state import HTTPProblem, ServerState, problems

router = APIRouter()
T = TypeVar("T")
ADMIN = (401, 403, 409, 422, 503)  # the token, the store (a model folder has no registry), a FoveaError (409)
BODY = (408, 413)


class DeployRequest(BaseModel):
    model: str = Field(description="the candidate, NAME:VERSION")
    strategy: str = Field(json_schema_extra={"enum": list(deploy.STRATEGIES)})
    percent: float | None = Field(None, description="canary: the share of requests it starts with")
    steps: list[float] | None = Field(None, description="canary: the shares it moves through")
    interval: str | float = Field(600, description="canary: time per step, as seconds or a duration (10m)")
    thresholds: dict[str, float] | None = Field(None, description='the gates, e.g. {"min_agreement": 0.9}')


class RollbackRequest(BaseModel):
    name: str | None = Field(None, description="the model (default: the one this server serves)")
    reason: str | None = None


async def _call(state: ServerState, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn`` on a worker thread; a FoveaError (a deployment already running, an unknown version) is 409."""
    try:
        result = await run_in_threadpool(fn, *args, **kw)
    except FoveaError as e:
        raise HTTPProblem(409, str(e)) from e
    state.fleet.wake.set()  # follow the change now, not at the next poll
    return result


@router.get("/v1/admin/deployments", responses=problems(*ADMIN))
async def admin_deployments(store: AdminStoreDep, state: StateDep, name: str | None = None) -> dict[str, Any]:
    return {"deployments": await _call(state, deploy.overview, name, store=store)}


@router.post("/v1/admin/deploy", status_code=201, openapi_extra=bodies.json_request(DeployRequest),
             responses=problems(*ADMIN, *BODY))
async def admin_deploy(request: Request, store: AdminStoreDep, state: StateDep) -> JSONResponse:
    """{"model": "pets:2", "strategy": "canary", "percent": 10, "steps": [10, 50, 100], "interval": "10m",
    "thresholds": {"min_agreement": 0.9}}"""
    body = await bodies.json_body(request, state.config.max_body_bytes)
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
    if strategy not in deploy.STRATEGIES:  # a malformed request (422), not a conflict with the deployments (409)
        raise HTTPProblem(422, f"unknown strategy {strategy!r}; choose from {', '.join(deploy.STRATEGIES)}")
    d = await _call(state, deploy.start, ref, strategy, store=store, **kw)
    return JSONResponse(d.to_dict(), status_code=201)


@router.post("/v1/admin/rollback", openapi_extra=bodies.json_request(RollbackRequest, required=False),
             responses=problems(*ADMIN, *BODY))
async def admin_rollback(request: Request, store: AdminStoreDep, state: StateDep) -> dict[str, Any]:
    """{"name": "pets", "reason": "..."}; the name defaults to the model this server serves."""
    body = await bodies.json_body(request, state.config.max_body_bytes)
    name = str(body.get("name") or state.served().name)
    d = await _call(state, deploy.rollback, name, reason=str(body.get("reason") or "rolled back over HTTP"), store=store)
    return d.to_dict()


@router.get("/v1/admin/models", responses=problems(*ADMIN))
async def admin_models(store: AdminStoreDep, state: StateDep) -> dict[str, Any]:
    versions = await _call(state, model_registry.versions, store=store)
    return {"versions": [v.to_dict() for v in versions]}
