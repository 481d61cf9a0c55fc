"""Similar images: POST /v1/similar (the nearest images of the model's training data, or of what this server has
answered), GET /v1/similar/images/{index} (one training image)."""

from __future__ import annotations

import hmac
import time
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fovea.errors import FoveaError
from fovea.serve import _bodies as bodies
from fovea.serve import _service as service
from fovea.serve._deps import StateDep, get_served
from fovea.serve._similar import Building
from fovea.serve._state import HTTPProblem, ServerState, problems
from fovea.similar import Gallery, NoEmbedding, normalize

router = APIRouter()
Where = Literal["training", "seen"]


@router.post("/v1/similar", dependencies=[Depends(get_served)], openapi_extra=bodies.IMAGE_REQUEST,
             responses=problems(400, 408, 409, 413, 415, 422, 500, 503, 504))
async def similar(request: Request, state: StateDep,
                  k: Annotated[int, Query(ge=1, le=100, description="neighbours per image")] = 10,
                  where: Annotated[Where, Query(alias="in", description="training: the model's training data; seen: "
                                                "the images this server has answered")] = "training") -> JSONResponse:
    """The ``k`` nearest images to each uploaded image by the model's embedding, nearest first, with their labels and
    cosine distances (0: the same direction); an image sent as /v1/predict takes it."""
    start = time.perf_counter()
    s = state.served()
    blobs = await bodies.image_files(request, state.config)
    x, kept, bad, _ = await service.decode(state, s.model, blobs)
    if not kept:
        raise HTTPProblem(422, "not a usable image: " + "; ".join(f"#{i}: {r}" for i, r in bad))
    _, _, emb = service.split(s, await service.run_model(state, s, x))
    if emb is None:
        raise HTTPProblem(409, str(NoEmbedding(s.model)))
    try:
        gallery = (await state.similar.training_gallery(s, state.fleet.executor, state.config.timeout_s)
                   if where == "training" else await state.similar.seen_gallery(s))
    except Building:
        raise HTTPProblem(503, "the gallery of the model's training data is being built (its first use); try again "
                               "in a minute") from None
    except FoveaError as e:  # no training data on this machine, or no embedding in this runtime
        raise HTTPProblem(409, str(e)) from e
    hits = await run_in_threadpool(gallery.search, normalize(emb), k)
    answers: list[dict[str, Any]] = [{} for _ in blobs]
    for i, row in zip(kept, hits):
        answers[i] = {"neighbours": [{"path": gallery.shown(h.path), "label": h.label, "distance": round(h.distance, 6),
                                      "image_url": _image_url(h.index, s.version) if where == "training" else None}
                                     for h in row]}
    for i, reason in bad:
        answers[i] = {"error": reason}
    body: dict[str, Any] = {"k": k, "in": where, "model": s.name, "model_version": s.version,
                            "gallery_size": len(gallery), "queries": answers,
                            "latency_ms": round((time.perf_counter() - start) * 1000, 3)}
    if len(blobs) == 1:
        body.update(answers[0])
    request.state.model_version = str(s.version)
    return JSONResponse(body)


def _image_url(index: int, version: int) -> str:
    return f"/v1/similar/images/{index}?version={version}"


@router.get("/v1/similar/images/{index}", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}, "description": "A training image"}, **problems(401, 404, 422, 503)})
async def similar_image(request: Request, state: StateDep,
                        index: Annotated[int, Path(ge=0, le=2**31, description="the image's row in the gallery")],
                        version: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="the model version "
                                                             "whose gallery (default: the one answering now)")] = None,
                        ) -> Response:
    """One image of a training gallery, by the index a /v1/similar answer gave (its ``image_url``). Only the
    gallery's own files are served; with an admin token the server asks for it here, as on its read-only routes."""
    _check_token(request, state)
    s = state.served()
    key = (s.name, s.version if version is None else version)
    gallery: Gallery | None = state.similar.training.get(key)
    if gallery is None:
        raise HTTPProblem(404, f"no training gallery of {key[0]}:{key[1]} yet (POST /v1/similar builds it)")
    if index >= len(gallery):
        raise HTTPProblem(404, f"no image #{index}: the gallery holds {len(gallery)}")
    path = FilePath(gallery.paths[index])
    if not path.is_file():
        raise HTTPProblem(404, f"image #{index} is gone from {gallery.shown(str(path))}")
    return FileResponse(path)


def _check_token(request: Request, state: ServerState) -> None:
    token = state.config.admin_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPProblem(401, "this server has an admin token: the training images need the header "
                               "'Authorization: Bearer TOKEN'")
