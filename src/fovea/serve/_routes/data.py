"""The data page: GET /v1/data (the served version's training images, filtered, a page at a time), and per image
its file, its Grad-CAM, its similar images, and POST .../review (a suspected label error to the review queue).

Viewer-level, as /v1/reviews: open unless the server has an admin token, then they need it too. The table is
``_dataview``'s: built once per version in the background, so the first GET /v1/data may answer 202 with its
progress, which the page polls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from fovea import review
from fovea.errors import FoveaError
from fovea.runtime import TorchModel
from fovea.serve import _bodies as bodies
from fovea.serve import _dataview as dataview
from fovea.serve import _service as service
from fovea.serve._deps import ServedDep, StateDep, ViewerStoreDep, get_admin_store
from fovea.serve._fleet import Served
from fovea.serve._similar import Building
from fovea.serve._state import HTTPProblem, ServerState, problems
from fovea.similar import normalize

router = APIRouter()
Filter = Literal["suspect", "unknown", "duplicate", "low_confidence", "wrong"]
ImageId = Annotated[int, Path(ge=0, le=2**31 - 1, description="an image's id in GET /v1/data")]


async def viewer(request: Request, state: StateDep) -> None:
    """The admin token when the server has one, as the read-only routes ask; unlike the review routes the data page
    needs no store, so a server without one (409 there) is fine here."""
    if state.config.admin_token:
        try:
            await get_admin_store(request, state)
        except HTTPProblem as e:
            if e.status != 409:
                raise


async def get_views(request: Request) -> dataview.DataViews:
    views: dataview.DataViews | None = getattr(request.app.state, "dataviews", None)
    if views is None:
        views = request.app.state.dataviews = dataview.DataViews()
    return views


ViewsDep = Annotated[dataview.DataViews, Depends(get_views)]
VIEWER = (401, 403, 422, 503)


class Suspect(BaseModel):
    suggested: str | None
    quality: float | None
    issue: bool
    rank: int | None


class DataRow(BaseModel):
    id: int
    path: str  # relative to the data set's folder
    split: str
    label: str
    predicted: str | None  # the model's top class (None: the file cannot be read, see error)
    confidence: float | None
    unknown: bool
    wrong: bool
    low_confidence: bool
    duplicate_of: int | None
    suspect: Suspect | None
    corrected: dict[str, Any] | None
    error: str | None


class DataPage(BaseModel):
    """A page of the table; ``state`` "unavailable" (the data is not here) or "failed" says why in ``reason``."""

    state: Literal["ready", "unavailable", "failed"]
    model: str
    version: int
    reason: str | None = None
    data: str | None = None
    classes: list[str] | None = None
    class_counts: dict[str, int] | None = None
    low_confidence_below: float | None = None
    label_check: dict[str, Any] | None = None
    counts: dict[str, int] | None = None
    total: int | None = None
    offset: int | None = None
    limit: int | None = None
    rows: list[DataRow] | None = None


class ReviewRequest(BaseModel):
    suggested: str | None = Field(None, description="the class the sender thinks it is (default: the label check's "
                                                    "suggestion, else the model's answer where it differs)")


class Computing(BaseModel):
    """The table is being built: ``progress`` {"stage", "done", "total"}; ask again."""

    state: Literal["computing"]
    model: str
    version: int
    progress: dict[str, Any]


async def _table(state: ServerState, s: Served, views: dataview.DataViews) -> dataview.Table:
    """The table, for the per-image routes: 409 while it is built, 404 when there is none."""
    view = views.of(s)
    table = await view.ready(state)
    if table is None:
        if view.reason is None:
            raise HTTPProblem(409, "the data table is still being built: GET /v1/data shows its progress")
        raise HTTPProblem(404, f"no images: {view.reason}")
    await run_in_threadpool(table.refresh)
    return table


def _path(table: dataview.Table, image_id: int) -> FilePath:
    try:
        path = table.path(image_id)
    except FoveaError as e:
        raise HTTPProblem(404, str(e)) from e
    if not path.is_file():
        raise HTTPProblem(404, f"image #{image_id} is gone from {path}")
    return path


@router.get("/v1/data", dependencies=[Depends(viewer)], response_model=None,
            responses={200: {"model": DataPage}, 202: {"model": Computing, "description": "The table is being built"},
                       **problems(*VIEWER)})
async def data(state: StateDep, s: ServedDep, views: ViewsDep,
               cls: Annotated[str | None, Query(alias="class", max_length=200, description="one class only")] = None,
               which: Annotated[Filter | None, Query(alias="filter", description="only the images this flag marks")]
               = None,
               offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
               limit: Annotated[int, Query(ge=1, le=500)] = 60) -> JSONResponse:
    """The served version's training images, each with the model's answer, its flags (suspected label error,
    answered unknown, near-duplicate, low confidence, wrong on validation) and how many images each filter keeps.
    Suspects come by rank (most suspect first)."""
    view = views.of(s)
    head = {"model": s.name, "version": s.version}
    table = await view.ready(state, dataview.FIRST_WAIT_S)
    if table is None:
        if view.reason is None:
            return JSONResponse({"state": "computing", **head, "progress": view.progress.to_dict()}, status_code=202)
        return JSONResponse({"state": "failed" if view.failed else "unavailable", **head, "reason": view.reason})
    if cls and cls not in table.base.classes:
        raise HTTPProblem(422, f"class {cls!r} is not one of {', '.join(table.base.classes)}")
    await run_in_threadpool(table.refresh)
    page = await run_in_threadpool(table.select, cls or None, which, offset, limit)
    return JSONResponse({"state": "ready", **head, **page})


@router.get("/v1/data/{image_id}/image", dependencies=[Depends(viewer)], response_class=Response,
            responses={200: {"content": {"image/*": {}}, "description": "The image file, or a JPEG thumbnail"},
                       **problems(404, 409, *VIEWER)})
async def data_image(image_id: ImageId, state: StateDep, s: ServedDep, views: ViewsDep,
                     size: Annotated[int | None, Query(ge=16, le=2048, description="a JPEG thumbnail at most this "
                                                       "many pixels wide and high")] = None) -> Response:
    """One image of the table (only those: ids, never paths), or with ``size`` a thumbnail of it."""
    from fastapi.responses import FileResponse

    path = _path(await _table(state, s, views), image_id)
    headers = {"cache-control": "private, max-age=3600"}
    if size is None:
        return FileResponse(path, headers=headers)
    try:
        jpeg = await asyncio.get_running_loop().run_in_executor(state.decoders, dataview.thumbnail, path, size,
                                                                state.config.max_pixels)
    except FoveaError as e:  # ImageError: unreadable, a bomb
        raise HTTPProblem(409, f"image #{image_id} cannot be shown: {e}") from e
    return Response(jpeg, media_type="image/jpeg", headers=headers)


@router.get("/v1/data/{image_id}/gradcam", dependencies=[Depends(viewer)], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM of the predicted class, over "
                                                                          "the image"},
                       **problems(404, 409, *VIEWER)})
async def data_gradcam(image_id: ImageId, state: StateDep, s: ServedDep, views: ViewsDep) -> Response:
    """Where the model looks in this image for the class it predicts (Grad-CAM); 409 for a runtime without
    gradients (ONNX Runtime, torch.export, an ensemble)."""
    path = _path(await _table(state, s, views), image_id)
    if not isinstance(s.model, TorchModel):
        raise HTTPProblem(409, f"{s.name}:{s.version} cannot be explained here: Grad-CAM needs one PyTorch network "
                               "(not ONNX Runtime, torch.export or an ensemble)")
    x, kept, bad = await run_in_threadpool(s.model.load_images, [path])
    if not kept:
        raise HTTPProblem(409, f"image #{image_id} cannot be read: {bad[0][1]}")
    try:
        png = await asyncio.get_running_loop().run_in_executor(state.fleet.executor, dataview.gradcam_png, s.model,
                                                               x, path)
    except FoveaError as e:
        raise HTTPProblem(409, str(e)) from e
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


@router.get("/v1/data/{image_id}/similar", dependencies=[Depends(viewer)], response_model=None,
            responses={200: {"description": "The nearest images of the data set"}, **problems(404, 409, *VIEWER)})
async def data_similar(image_id: ImageId, state: StateDep, s: ServedDep, views: ViewsDep,
                       k: Annotated[int, Query(ge=1, le=50, description="how many")] = 8) -> dict[str, Any]:
    """The ``k`` images of the data set nearest to this one by the model's embedding (``fovea.similar``), itself
    left out, nearest first, each a row of GET /v1/data with its cosine ``distance``."""
    table = await _table(state, s, views)
    path = _path(table, image_id)
    x, kept, bad = await run_in_threadpool(s.model.load_images, [path])
    if not kept:
        raise HTTPProblem(409, f"image #{image_id} cannot be read: {bad[0][1]}")
    try:
        gallery = await state.similar.training_gallery(s, state.fleet.executor, state.config.timeout_s)
    except Building:
        raise HTTPProblem(503, "the similar-image index of the data set is being built (its first use); try again "
                               "in a minute") from None
    except FoveaError as e:  # no embedding in this runtime
        raise HTTPProblem(409, str(e)) from e
    _, _, emb = service.split(s, await service.run_model(state, s, x))
    if emb is None:
        raise HTTPProblem(409, f"{s.name}:{s.version}'s runtime exposes no embedding to compare images by")
    hits = (await run_in_threadpool(gallery.search, normalize(emb), k + 1))[0]
    me = str(path.resolve())
    similar = []
    for h in hits:
        i = table.by_path.get(str(FilePath(h.path).resolve()))
        if i is None or i == image_id or str(FilePath(h.path).resolve()) == me:
            continue
        similar.append({**table.rows[i], "distance": round(h.distance, 6)})
    return {"id": image_id, "k": k, "similar": similar[:k]}


@router.post("/v1/data/{image_id}/review", dependencies=[Depends(viewer)], status_code=201, response_model=None,
             openapi_extra=bodies.json_request(ReviewRequest, required=False),
             responses={200: {"description": "Already in the review queue"}, 201: {"description": "Queued"},
                        **problems(404, 408, 409, 413, *VIEWER)})
async def data_review(request: Request, image_id: ImageId, state: StateDep, s: ServedDep, views: ViewsDep,
                      store: ViewerStoreDep) -> JSONResponse:
    """Send the image to the review queue as a suspected label error: reviewers keep its label, give another, or
    drop it, and the verdict goes to the data set's corrections, which the next ``fovea train`` applies. The body
    is optional: {"suggested": "dog"}. 200 with ``already_queued`` when it is waiting there already; 409 when the
    server keeps no store."""
    body = await bodies.json_body(request, state.config.max_body_bytes)
    wanted = body.get("suggested")
    if wanted is not None and (not isinstance(wanted, str) or wanted not in s.model.classes):
        raise HTTPProblem(422, f"suggested must be one of {', '.join(s.model.classes)}, not {wanted!r}")
    table = await _table(state, s, views)
    path = _path(table, image_id)
    row = table.rows[image_id]
    # the label check's out-of-fold probabilities where it judged the image, else the served model's
    probabilities = table.out_of_fold.get(image_id) or table.base.probabilities[image_id]
    if probabilities is None:
        raise HTTPProblem(409, f"image #{image_id} cannot be read: {row['error']}")
    suspect = row["suspect"]
    suggested = wanted or (suspect["suggested"] if suspect else
                           row["predicted"] if row["predicted"] != row["label"] else None)
    try:
        review_id = await run_in_threadpool(
            lambda: review.enqueue_suspect(store, s.name, table.base.root, path, row["label"], probabilities,
                                           suggested=suggested, quality=suspect["quality"] if suspect else None))
    except FoveaError as e:
        raise HTTPProblem(409, str(e)) from e
    if review_id is None:
        return JSONResponse({"review_id": None, "already_queued": True}, status_code=200)
    return JSONResponse({"review_id": review_id, "already_queued": False}, status_code=201)
