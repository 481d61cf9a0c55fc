"""True labels: POST /v1/feedback for an answered request, and the review queue people label on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from fovea import review
from fovea.errors import FoveaError
from fovea.serve import _bodies as bodies
from fovea.serve._deps import DbIdPath, ServedDep, StateDep, ViewerStoreDep
from fovea.serve._state import HTTPProblem, problems
from fovea.store import add_feedback

router = APIRouter()
VIEWER = (401, 403, 409, 422, 503)  # the token (when the server has one), the store (when it keeps none)
BODY = (408, 413, 422)


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, description="the request_id of an answer from /v1/predict")
    label: str = Field(description="its true class: one of the model's classes")


class VoteRequest(BaseModel):
    label: str = Field(description='a class; "" for none of them; a new one with new_class')
    reviewer: str = "anonymous"
    new_class: bool = False


@router.post("/v1/feedback", status_code=201, openapi_extra=bodies.json_request(FeedbackRequest),
             responses=problems(*BODY, 409, 503))
async def feedback(request: Request, state: StateDep, served: ServedDep) -> JSONResponse:
    """{"request_id": "...", "label": "dog"}: the true label of an answered request (concept drift, retraining)."""
    body = await bodies.json_body(request, state.config.max_body_bytes)
    request_id, label = body.get("request_id"), body.get("label")
    if not isinstance(request_id, str) or not request_id or not isinstance(label, str):
        raise HTTPProblem(422, 'send {"request_id": "...", "label": "CLASS"}')
    if label not in served.model.classes:
        raise HTTPProblem(422, f"label {label!r} is not one of {served.model.classes}")
    if state.store is None:
        raise HTTPProblem(409, "this server keeps no store (started with --no-log): feedback has nowhere to go")
    matched = await run_in_threadpool(add_feedback, state.store, request_id=request_id, label=label)
    state.metrics.feedback.labels(str(served.version)).inc()
    return JSONResponse({"request_id": request_id, "label": label, "matched": matched}, status_code=201)


@router.get("/v1/reviews", responses=problems(*VIEWER))
async def list_reviews(state: StateDep, store: ViewerStoreDep, served: ServedDep,
                       which: str = Query("pending", alias="state"), limit: int = 100) -> dict[str, Any]:
    rows = await run_in_threadpool(review.reviews, store, served.name, which, min(max(limit, 1), 500))
    for r in rows:
        r["image_url"] = f"/v1/reviews/{r['id']}/image"
    return {"classes": served.model.classes, "consensus": state.config.consensus, "reviews": rows}


@router.get("/v1/reviews/{review_id}/image", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}, "description": "The queued image"}, **problems(404, *VIEWER)})
async def review_image(review_id: DbIdPath, store: ViewerStoreDep) -> Response:
    try:
        row = await run_in_threadpool(review.get, store, review_id)
    except FoveaError as e:
        raise HTTPProblem(404, str(e)) from e
    if not Path(row.path).exists():
        raise HTTPProblem(404, f"the image of review #{review_id} is gone from {row.path}")
    return FileResponse(row.path)


@router.post("/v1/reviews/{review_id}", openapi_extra=bodies.json_request(VoteRequest),
             responses=problems(*BODY, 404, *VIEWER))
async def review_vote(request: Request, review_id: DbIdPath, state: StateDep, store: ViewerStoreDep) -> dict[str, Any]:
    """{"label": "dog", "reviewer": "ana"}; "label": "" means none of the classes; with "new_class": true, a class
    the model does not have yet."""
    body = await bodies.json_body(request, state.config.max_body_bytes)
    label, reviewer = body.get("label"), body.get("reviewer") or "anonymous"
    new_class = body.get("new_class", False)
    if not isinstance(label, str) or not isinstance(reviewer, str) or not isinstance(new_class, bool):
        raise HTTPProblem(422, 'send {"label": "CLASS", "reviewer": "NAME"} (and "new_class": true for a new class)')
    classes = state.served().model.classes  # 503 only for a vote that is well formed
    try:
        return await run_in_threadpool(lambda: review.vote(store, review_id, label, reviewer, classes,
                                                           state.config.consensus, new_class=new_class))
    except FoveaError as e:
        raise HTTPProblem(404 if "no review" in str(e) else 409 if "already" in str(e) else 422, str(e)) from e
