"""The web app (GET / and its static files) and the read-only routes it uses: /v1/info, /v1/models,
/v1/deployments, /v1/drift. Open unless the server has an admin token; then they need it too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from fovea import deploy, model_registry
from fovea.errors import FoveaError
from fovea.runtime import TorchModel
from fovea.serve import _drift as drift
from fovea.serve._deps import DbIdPath, ServedDep, StateDep, ViewerStoreDep, get_viewer_store
from fovea.serve._state import HTTPProblem, problems

router = APIRouter()
VIEWER = problems(401, 403, 409, 422, 503)  # the token (when the server has one), the store (when it keeps none)
STATIC = Path(__file__).parent.parent / "static"


@router.get("/", include_in_schema=False)
async def web_app() -> Response:
    return FileResponse(STATIC / "index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    if name not in {p.name for p in STATIC.iterdir()}:  # only the app's own files, no path tricks
        raise HTTPProblem(404, f"no {name}")
    return FileResponse(STATIC / name)


@router.get("/v1/info", responses=problems(422, 503))
async def about(state: StateDep, s: ServedDep) -> dict[str, Any]:
    config = state.config
    return {"model": s.name, "version": s.version, "classes": s.model.classes,
            "explainable": isinstance(s.model, TorchModel), "review_below": config.review_below,
            "consensus": config.consensus, "token_required": bool(config.admin_token),
            "follows_deployments": bool(state.fleet.follows)}


@router.get("/v1/models", responses=VIEWER)
async def models(store: ViewerStoreDep, served: ServedDep) -> dict[str, Any]:
    try:
        versions = await run_in_threadpool(model_registry.versions, served.name, store=store)
    except FoveaError:  # a model folder served outside the registry
        versions = []
    rows = []
    for v in versions:
        d = v.to_dict()
        d["ref"] = v.ref
        d["report"] = f"/v1/models/{v.version}/report" if (Path(v.path) / "report.html").exists() else None
        rows.append(d)
    return {"name": served.name, "versions": rows}


@router.get("/v1/models/{version}/report", include_in_schema=False)
async def model_report(version: DbIdPath, store: ViewerStoreDep, served: ServedDep) -> Response:
    try:
        v = await run_in_threadpool(model_registry.resolve, f"{served.name}:{version}", store=store)
    except FoveaError as e:
        raise HTTPProblem(404, str(e)) from e
    path = Path(v.path) / "report.html"
    if not path.exists():
        raise HTTPProblem(404, f"{v.ref} was registered without its report")
    return FileResponse(path)


@router.get("/v1/deployments", responses=VIEWER)
async def list_deployments(store: ViewerStoreDep, served: ServedDep) -> dict[str, Any]:
    return {"deployments": await run_in_threadpool(deploy.overview, served.name, store=store)}


@router.get("/v1/drift", responses=VIEWER, dependencies=[Depends(get_viewer_store)])
async def drift_history(served: ServedDep, last: int = 200) -> dict[str, Any]:
    path = drift.folder(served) / "history.jsonl"
    lines = path.read_text().splitlines()[-max(1, min(last, 5000)):] if path.exists() else []
    return {"history": [json.loads(line) for line in lines if line.strip()]}


@router.get("/v1/drift/report", include_in_schema=False, dependencies=[Depends(get_viewer_store)])
async def drift_report(served: ServedDep) -> Response:
    path = drift.folder(served) / "latest.html"
    if not path.exists():
        raise HTTPProblem(404, "no drift check has run yet")
    return FileResponse(path)


@router.post("/v1/drift/check", responses=VIEWER, dependencies=[Depends(get_viewer_store)])
async def drift_now(state: StateDep) -> dict[str, Any]:
    if state.log is None:
        raise HTTPProblem(409, "predictions are not logged (--no-log): there is no traffic to test")
    try:
        result = await state.check(drift.check_once, state, state.served())
    except (FoveaError, ValueError) as e:  # a broken reference, too few answers: say so
        raise HTTPProblem(409, str(e)) from e
    if result is None:
        raise HTTPProblem(409, "not enough answers logged yet, or the model has no drift reference")
    return {"summary": result.summary(), **result.to_dict()}
