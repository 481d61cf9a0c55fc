"""Request bodies: read under the size limit, then parsed into image files or JSON objects (OIP tensors: ``_oip``); and
their declarations in the OpenAPI document (``json_request``, ``IMAGE_REQUEST``).

Every 4xx here is an ``HTTPProblem``: 413 for a body or an image count over its limit, 415 for a content type
that is not an image, 422 (or 400 for broken multipart) for a body that does not parse. A body that does not
arrive in time is the ``BodyTimeout`` (408) raised by the app's body deadline, passed through untouched.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from fovea.serve._config import ServeConfig
from fovea.serve._state import HTTPProblem


def json_request(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """A route's ``openapi_extra`` declaring a JSON body shaped like ``model`` (a flat one: its schema must need no
    ``$defs``). The routes read the body themselves (``json_body``), under the size limit and the body deadline."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__} nests models: the OpenAPI document would not resolve them"
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


_BINARY = {"type": "string", "format": "binary"}
IMAGE_REQUEST: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": _BINARY},
    "application/octet-stream": {"schema": _BINARY},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": _BINARY, "description": "one or more image files"}}}},
    "application/json": {"schema": {
        "type": "object", "description": 'base64 image files: {"image": B64} or {"images": [B64, ...]}',
        "properties": {"image": {"type": "string", "format": "byte"},
                       "images": {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1}}}},
}}}


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


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed, or 422: json's decoder recurses once per level, so a body nested past the interpreter's
    recursion limit (~1000 levels; one of 100 000 is 200 kB) raises RecursionError, not ValueError."""
    try:
        return json.loads(raw)
    except RecursionError as e:
        raise HTTPProblem(422, "the JSON body is nested too deeply") from e
    except ValueError as e:  # also UnicodeDecodeError
        raise HTTPProblem(422, f"the body is not valid JSON: {e}") from e


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """A JSON object (an empty body is ``{}``)."""
    obj = parse_json(await read_body(request, limit) or b"{}")
    if not isinstance(obj, dict):
        raise HTTPProblem(422, "the body must be a JSON object")
    return obj


def check_count(n: int, limit: int) -> None:
    if n > limit:
        raise HTTPProblem(413, f"{n} images in one request; the limit is {limit}")


async def _multipart_files(request: Request, config: ServeConfig) -> list[bytes]:
    # Read under the size limit first, then parse: Starlette's parser would spool a chunked body (no
    # Content-Length) of any size to temporary files before a limit could be checked.
    body = await read_body(request, config.max_body_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=config.max_images, max_fields=config.max_images)
    except (HTTPProblem, ClientDisconnect):  # the body deadline (408), or the client gone: not the body's fault
        raise
    except Exception as e:  # noqa: BLE001 - malformed multipart in any of several ways
        if "Too many" in str(e):  # Starlette's words for a part count over max_files / max_fields
            raise HTTPProblem(413, f"over {config.max_images} parts in one multipart body; the limit is "
                                   f"{config.max_images} images per request") from e
        raise HTTPProblem(400, f"malformed multipart body: {e}") from e
    try:
        blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
    finally:
        await form.close()  # the parts spooled to temporary files
    if not blobs:
        raise HTTPProblem(422, "the multipart body has no file parts")
    return blobs


async def image_files(request: Request, config: ServeConfig) -> list[bytes]:
    """The image files of a /v1/predict body: raw bytes, multipart file parts, or JSON with base64."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("multipart/form-data"):
        blobs = await _multipart_files(request, config)
    else:
        body = await read_body(request, config.max_body_bytes)
        if ctype == "application/json":
            usage = 'JSON must be {"image": BASE64} or {"images": [BASE64, ...]}'
            try:
                obj = parse_json(body)
            except HTTPProblem as e:
                raise HTTPProblem(422, f"{e.message}: {usage}") from e
            try:
                items = obj.get("images") or ([obj["image"]] if "image" in obj else None)
                if not isinstance(items, list) or not items:
                    raise ValueError
                blobs = [base64.b64decode(x, validate=True) for x in items]
            except (ValueError, TypeError, AttributeError, KeyError, binascii.Error) as e:
                raise HTTPProblem(422, usage) from e
        elif ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
            if not body:
                raise HTTPProblem(422, "empty body: send the image's bytes")
            blobs = [body]
        else:
            raise HTTPProblem(415, f"content type {ctype!r} is not an image; send image/*, application/octet-stream, "
                                   "multipart/form-data or application/json with base64")
    check_count(len(blobs), config.max_images)
    return blobs
