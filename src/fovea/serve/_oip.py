"""The Open Inference Protocol (v2, KServe and Triton) on the wire: infer requests in, answers out.

A request is JSON, or (the binary tensor data extension, the default of NVIDIA's ``tritonclient`` and KServe's
``InferenceRESTClient``) a JSON header of ``Inference-Header-Content-Length`` bytes followed by each binary input's
raw bytes, in input order, ``parameters.binary_data_size`` bytes each. Fovea takes one input:

    images       UINT8 [N, 3, S, S]   decoded pixels at the model's input size (raw bytes when binary)
    image_files  BYTES [N]            encoded image files: base64 strings in JSON; when binary, each element is a
                                      4-byte little-endian length followed by the file's own bytes

and answers ``probabilities`` (FP32 [N, C]), ``label`` (BYTES [N]) and, for a model that answers "unknown",
``unknown_score`` (FP32 [N]). An output asked for with ``binary_data`` (or every output, with the request's
``binary_data_output``) comes back as raw bytes after the JSON header, in an ``application/octet-stream``
answer carrying ``Inference-Header-Content-Length``; otherwise the answer is plain JSON.

Validation is strict: an unknown input or output name, a datatype that is not the input's, a shape that is not
the model's, or data whose element count is not the shape's is refused with ``{"error": ...}`` saying which.
A body that does not frame (header length, binary sizes, compression) is 400; a request that frames but does
not describe what the model takes is 422, as everywhere else in the server (see the module ``_bodies``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fovea.serve._bodies import parse_json, read_body
from fovea.serve._state import HTTPProblem

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUTS = {"images": "UINT8", "image_files": "BYTES"}  # name -> datatype
EXTENSIONS = ["binary_tensor_data"]


def output_names(answers_unknown: bool) -> list[str]:
    return ["probabilities", "label"] + (["unknown_score"] if answers_unknown else [])


def model_metadata(name: str, versions: list[str], image_size: int, classes: list[str],
                   answers_unknown: bool) -> dict[str, Any]:
    """The model metadata answer (``GET /v2/models/{name}[/versions/{version}]``)."""
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
               {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    if answers_unknown:
        outputs.append({"name": "unknown_score", "datatype": "FP32", "shape": [-1]})
    return {"name": name, "versions": versions, "platform": "fovea",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, image_size, image_size]},
                       {"name": "image_files", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs, "parameters": {"classes": classes}}


# requests ------------------------------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """An Open Inference Protocol request, framed and checked against the inputs Fovea takes; its data are
    checked against the model that answers by ``pixels`` or ``files``."""

    id: str  # the request's id, echoed back (a new one when it has none)
    input: str  # images | image_files
    datatype: str  # UINT8 | BYTES
    shape: list[int]
    data: list[Any] | None  # from JSON, or None when the tensor came binary
    raw: bytes | None  # the binary tensor data extension: the input's bytes
    outputs: list[tuple[str, bool | None]] | None = None  # (name, binary_data) asked for; None: all of them
    binary_output: bool = False  # the request's binary_data_output: every output binary unless it says otherwise


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """tritonclient's ``request_compression_algorithm``: gzip or deflate (zlib), inflated to at most ``limit``."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPProblem(415, f"content encoding {encoding!r} is not supported: send gzip, deflate or none")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise HTTPProblem(400, f"the body is not valid {encoding} data: {e}") from e
    if len(out) > limit:
        raise HTTPProblem(413, f"request body inflates past the limit of {limit:,} bytes")
    if not inflate.eof:
        raise HTTPProblem(400, f"the {encoding} body is truncated")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, the binary data after it)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length) if header_length.isascii() else -1  # int() also reads other scripts' digits
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise HTTPProblem(400, f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's "
                               f"{len(body):,}; got {header_length[:40]!r}")
    return body[:n], body[n:]


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPProblem(422, f"{what} must be a JSON object")
    return value


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise HTTPProblem(422, f"input {name!r}: shape must be a list of whole numbers >= 0, got {value!r:.80}")
    return value


def _input(inp: Any, rest: bytes) -> tuple[str, str, list[int], list[Any] | None, bytes | None]:
    """(name, datatype, shape, JSON data, binary data) of the one input, against what Fovea takes."""
    if not isinstance(inp, dict):
        raise HTTPProblem(422, 'each input must be an object {"name", "shape", "datatype", "data"}')
    name, datatype = inp.get("name"), inp.get("datatype")
    if not isinstance(name, str) or name not in INPUTS:
        raise HTTPProblem(422, f"unknown input {name!r:.80}: Fovea takes 'images' (UINT8 [N, 3, S, S]) or "
                               "'image_files' (BYTES [N], encoded image files)")
    if datatype != INPUTS[name]:
        raise HTTPProblem(422, f"input {name!r} is {INPUTS[name]}, not {datatype!r:.80}")
    shape = _shape(inp.get("shape"), name)
    params = _object(inp.get("parameters"), f"input {name!r}: parameters")
    if "shared_memory_region" in params:
        raise HTTPProblem(422, "the shared-memory extension is not supported: send the data in the body")
    size = params.get("binary_data_size")
    if size is None:
        if rest:
            raise HTTPProblem(400, f"{len(rest):,} bytes follow the JSON header but input {name!r} has no "
                                   "parameters.binary_data_size")
        data = inp.get("data")
        if not isinstance(data, list):
            raise HTTPProblem(422, f"input {name!r} needs its data: a list in 'data', or binary data after the "
                                   f"JSON header (parameters.binary_data_size and the {HEADER_LENGTH} header)")
        return name, datatype, shape, data, None
    if inp.get("data") is not None:
        raise HTTPProblem(422, f"input {name!r} has both 'data' and parameters.binary_data_size: send one")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(rest):
        raise HTTPProblem(400, f"input {name!r}: parameters.binary_data_size is {size!r} but {len(rest):,} bytes "
                               f"follow the JSON header ({HEADER_LENGTH})")
    return name, datatype, shape, None, rest


def _outputs(value: Any) -> list[tuple[str, bool | None]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise HTTPProblem(422, 'outputs must be a list of {"name", "parameters"}')
    asked: list[tuple[str, bool | None]] = []
    for out in value:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str):
            raise HTTPProblem(422, 'each requested output must be an object with a "name"')
        params = _object(out.get("parameters"), f"output {name!r}: parameters")
        if params.get("classification"):
            raise HTTPProblem(422, "the classification extension is not supported: ask for 'label' and "
                                   "'probabilities'")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise HTTPProblem(422, f"output {name!r}: parameters.binary_data must be true or false")
        if name in (n for n, _ in asked):
            raise HTTPProblem(422, f"output {name!r} is asked for twice")
        asked.append((name, binary))
    return asked


async def read_request(request: Request, limit: int) -> InferRequest:
    """The request's one input and the outputs it asks for; 400 for a body that does not frame, 422 for one that
    is not a request Fovea can answer."""
    body = _decompress(await read_body(request, limit), request.headers.get("content-encoding", "").strip().lower(),
                       limit)
    header, rest = _split(body, request.headers.get(HEADER_LENGTH.lower()))
    req = parse_json(header)
    if not isinstance(req, dict):
        raise HTTPProblem(422, 'the body must be a JSON object {"inputs": [...]}')
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise HTTPProblem(422, f'expected {{"inputs": [...]}} with exactly one input (images or image_files), got '
                               f"{len(inputs) if isinstance(inputs, list) else 'none'}")
    name, datatype, shape, data, raw = _input(inputs[0], rest)
    params = _object(req.get("parameters"), "parameters")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise HTTPProblem(422, "parameters.binary_data_output must be true or false")
    rid = req.get("id")
    return InferRequest(str(rid) if rid not in (None, "") else uuid.uuid4().hex, name, datatype, shape, data, raw,
                        _outputs(req.get("outputs")), binary_output)


def _count(req: InferRequest, max_images: int) -> int:
    n = req.shape[0]
    if n == 0:
        raise HTTPProblem(422, f"input {req.input!r} has shape {req.shape}: no images")
    if n > max_images:
        raise HTTPProblem(413, f"{n} images in one request; the limit is {max_images}")
    return n


def pixels(req: InferRequest, size: int, max_images: int) -> torch.Tensor:
    """The ``images`` input as uint8 (N, 3, size, size)."""
    shape = req.shape
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise HTTPProblem(422, f"input 'images' must have shape [N, 3, {size}, {size}] (this model's input size), "
                               f"got {shape}")
    _count(req, max_images)
    want = math.prod(shape)
    if req.raw is not None:
        if len(req.raw) != want:
            raise HTTPProblem(422, f"input 'images' of shape {shape} holds {want:,} bytes, not {len(req.raw):,}")
        arr = np.frombuffer(req.raw, np.uint8)
    else:
        try:
            arr = np.asarray(req.data).ravel()
        except (ValueError, TypeError):  # ragged nesting
            arr = np.asarray([], dtype=np.float64)
        if arr.size != want:
            raise HTTPProblem(422, f"input 'images' of shape {shape} holds {want:,} elements, not {arr.size:,}")
        if arr.dtype.kind not in "iu" or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise HTTPProblem(422, f"UINT8 data must hold {want:,} whole numbers in 0..255")
    return torch.from_numpy(arr.astype(np.uint8).reshape(shape))


def _unpack(raw: bytes, n: int) -> list[bytes]:
    """BYTES elements as the binary extension sends them: each a uint32 little-endian length, then its bytes."""
    out: list[bytes] = []
    at = 0
    while at < len(raw) and len(out) <= n:
        if at + 4 > len(raw):
            break
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            break
        out.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    if at != len(raw) or len(out) != n:
        raise HTTPProblem(422, f"input 'image_files' of shape [{n}] must be {n} elements, each a 4-byte "
                               f"little-endian length then that many bytes; its {len(raw):,} bytes are not")
    return out


def files(req: InferRequest, max_images: int) -> list[bytes]:
    """The ``image_files`` input as encoded image files."""
    if len(req.shape) != 1:
        raise HTTPProblem(422, f"input 'image_files' must have shape [N], got {req.shape}")
    n = _count(req, max_images)
    if req.raw is not None:
        return _unpack(req.raw, n)
    data = req.data or []
    if len(data) != n:
        raise HTTPProblem(422, f"input 'image_files' of shape [{n}] holds {len(data)} elements")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, TypeError, ValueError) as e:
        raise HTTPProblem(422, "BYTES data in JSON must be base64-encoded image files (or send them binary: "
                               f"raw bytes after the JSON header, with {HEADER_LENGTH})") from e


def check_outputs(req: InferRequest, available: list[str]) -> None:
    """422 for an output the model does not have, before any work is done."""
    for name, _ in req.outputs or []:
        if name not in available:
            raise HTTPProblem(422, f"unknown output {name!r}: this model answers {', '.join(available)}")


# answers -------------------------------------------------------------------------------------------------------


@dataclass
class Output:
    """One output tensor of an answer."""

    name: str
    datatype: str  # FP32 | BYTES
    shape: list[int]
    data: np.ndarray | list[str]
    parameters: dict[str, Any] | None = None

    def as_json(self) -> list[Any]:
        return self.data.ravel().tolist() if isinstance(self.data, np.ndarray) else list(self.data)

    def as_bytes(self) -> bytes:
        if isinstance(self.data, np.ndarray):
            return np.ascontiguousarray(self.data, "<f4").tobytes()
        encoded = [s.encode() for s in self.data]
        return b"".join(struct.pack("<I", len(b)) + b for b in encoded)


def encode(req: InferRequest, model_name: str, model_version: str, outputs: list[Output]) -> Response:
    """The answer: the outputs asked for (all by default), JSON or, where any is asked binary, the JSON header
    then the binary outputs' bytes in order."""
    by_name = {o.name: o for o in outputs}
    asked = req.outputs if req.outputs is not None else [(o.name, None) for o in outputs]
    tensors, blobs = [], []
    for name, binary in asked:
        o = by_name.get(name)
        if o is None:  # a canary that fell back to a version without this output
            raise HTTPProblem(500, f"{model_name}:{model_version} has no output {name!r}")
        t: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": o.shape}
        params = dict(o.parameters or {})
        if req.binary_output if binary is None else binary:
            blob = o.as_bytes()
            blobs.append(blob)
            params["binary_data_size"] = len(blob)
        else:
            t["data"] = o.as_json()
        if params:
            t["parameters"] = params
        tensors.append(t)
    body = {"model_name": model_name, "model_version": model_version, "id": req.id, "outputs": tensors}
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
