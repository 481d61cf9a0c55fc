"""Request bodies: read under the size limit, then parsed into image files, JSON objects or OIP tensors.

Every 4xx here is an ``HTTPProblem``: 413 for a body or an image count over its limit, 415 for a content type
that is not an image, 422 (or 400 for broken multipart) for a body that does not parse.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Request

from fovea.serve._config import ServeConfig
from fovea.serve._state import HTTPProblem


def _refuse_declared_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise HTTPProblem(413, f"request body of {int(length):,} bytes is over the limit of {limit:,}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit`` bytes: declared, or streamed so far."""
    _refuse_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"request body over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """A JSON object (an empty body is ``{}``)."""
    try:
        obj = json.loads(await read_body(request, limit) or b"{}")
    except ValueError as e:
        raise HTTPProblem(422, "the body must be a JSON object") from e
    if not isinstance(obj, dict):
        raise HTTPProblem(422, "the body must be a JSON object")
    return obj


def check_count(n: int, limit: int) -> None:
    if n > limit:
        raise HTTPProblem(413, f"{n} images in one request; the limit is {limit}")


async def image_files(request: Request, config: ServeConfig) -> list[bytes]:
    """The image files of a /v1/predict body: raw bytes, multipart file parts, or JSON with base64."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("multipart/form-data"):
        _refuse_declared_length(request, config.max_body_bytes)
        try:
            form = await request.form(max_files=config.max_images, max_fields=config.max_images)
        except Exception as e:  # noqa: BLE001 - malformed multipart in any of several ways
            raise HTTPProblem(400, f"malformed multipart body: {e}") from e
        blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
        if not blobs:
            raise HTTPProblem(422, "the multipart body has no file parts")
    else:
        body = await read_body(request, config.max_body_bytes)
        if ctype == "application/json":
            try:
                obj = json.loads(body)
                items = obj.get("images") or ([obj["image"]] if "image" in obj else None)
                if not isinstance(items, list) or not items:
                    raise ValueError
                blobs = [base64.b64decode(x, validate=True) for x in items]
            except (ValueError, TypeError, AttributeError, KeyError, binascii.Error) as e:
                raise HTTPProblem(422, 'JSON must be {"image": BASE64} or {"images": [BASE64, ...]}') from e
        elif ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
            if not body:
                raise HTTPProblem(422, "empty body: send the image's bytes")
            blobs = [body]
        else:
            raise HTTPProblem(415, f"content type {ctype!r} is not an image; send image/*, application/octet-stream, "
                                   "multipart/form-data or application/json with base64")
    check_count(len(blobs), config.max_images)
    return blobs


@dataclass
class InferInput:
    """The one input of an Open Inference Protocol request."""

    id: str  # the request's id, echoed back (a new one when it has none)
    datatype: str  # UINT8 (decoded images) or BYTES (image files)
    shape: list[int]
    data: list[Any]  # non-empty


async def infer_input(request: Request, limit: int) -> InferInput:
    try:
        req = json.loads(await read_body(request, limit))
        if len(req["inputs"]) != 1:
            raise ValueError("one input")
        inp = req["inputs"][0]
        dtype, shape, data = inp["datatype"], [int(d) for d in inp["shape"]], inp["data"]
        if not isinstance(data, list) or not data:
            raise ValueError("data")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise HTTPProblem(422, 'expected {"inputs": [{"name", "shape", "datatype", "data"}]}: one input, '
                               "with its data as a non-empty list") from e
    return InferInput(str(req.get("id") or uuid.uuid4().hex), dtype, shape, data)


def pixels(inp: InferInput, size: int, max_images: int) -> torch.Tensor:
    """A UINT8 input as images, uint8 (N, 3, size, size)."""
    shape = inp.shape
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise HTTPProblem(422, f"UINT8 input must have shape [N, 3, {size}, {size}], got {shape}")
    try:
        arr = np.asarray(inp.data).ravel()
    except ValueError:  # ragged nesting
        arr = np.asarray([], dtype=np.float64)
    if (arr.dtype.kind not in "iu" or arr.size != int(np.prod(shape)) or arr.min(initial=0) < 0
            or arr.max(initial=0) > 255):
        raise HTTPProblem(422, f"UINT8 data must hold {int(np.prod(shape))} whole numbers in 0..255")
    check_count(shape[0], max_images)
    return torch.from_numpy(arr.astype(np.uint8).reshape(shape))


def files(inp: InferInput, max_images: int) -> list[bytes]:
    """A BYTES input as image files (each base64-encoded in the request)."""
    try:
        blobs = [base64.b64decode(d, validate=True) for d in inp.data]
    except (binascii.Error, TypeError, ValueError) as e:
        raise HTTPProblem(422, "BYTES data must be base64-encoded image files") from e
    check_count(len(blobs), max_images)
    return blobs
