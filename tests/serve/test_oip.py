"""The Open Inference Protocol v2 on a model trained on real photos: server and version metadata, the binary tensor
data extension both ways (equal to JSON), and strict validation of names, datatypes, shapes and outputs."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import train_cnn
from fastapi.testclient import TestClient

import fovea
from fovea import deploy, model_registry
from fovea.serve import ServeConfig, create_app

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "oip", image_size=32, epochs=1, widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def photos(tiny_pets: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:2]
            + sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def c(run: Path) -> Any:
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False, drift_every_s=0,
                                           max_images=8))) as client:
        yield client


def pack(elements: list[bytes]) -> bytes:
    """BYTES elements as the binary extension frames them: a uint32 little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary(header: dict[str, Any], *blobs: bytes) -> dict[str, Any]:
    """The keyword arguments of a POST with the binary tensor data extension."""
    head = json.dumps(header).encode()
    return {"content": head + b"".join(blobs),
            "headers": {HEADER: str(len(head)), "content-type": "application/octet-stream"}}


def decode(r: Any) -> dict[str, np.ndarray | list[str]]:
    """{output name: its data} from a JSON or a binary answer."""
    if HEADER not in r.headers:
        return {o["name"]: o["data"] for o in r.json()["outputs"]}
    n = int(r.headers[HEADER])
    head, at, out = json.loads(r.content[:n]), n, {}
    for o in head["outputs"]:
        if "data" in o:
            out[o["name"]] = o["data"]
            continue
        size = o["parameters"]["binary_data_size"]
        blob, at = r.content[at : at + size], at + size
        if o["datatype"] == "FP32":
            out[o["name"]] = np.frombuffer(blob, "<f4").reshape(o["shape"])
        else:
            labels, i = [], 0
            while i < len(blob):
                (k,) = struct.unpack_from("<I", blob, i)
                labels.append(blob[i + 4 : i + 4 + k].decode())
                i += 4 + k
            out[o["name"]] = labels
    assert at == len(r.content)
    return out


def test_server_metadata_names_the_binary_extension(c: TestClient) -> None:
    meta = c.get("/v2").json()
    assert meta["name"] == "fovea" and meta["version"] == fovea.__version__
    assert "binary_tensor_data" in meta["extensions"]
    assert c.get("/v2/health/live").json() == {"live": True} and c.get("/v2/health/ready").status_code == 200
    assert c.get("/v2/models/cnn/ready").json() == {"name": "cnn", "ready": True}


def test_binary_requests_and_answers_equal_json(c: TestClient, photos: list[bytes]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    as_json = c.post("/v2/models/cnn/infer", json={"id": "j", "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [3, 3, 32, 32], "data": pixels.ravel().tolist()}]})
    assert as_json.status_code == 200 and "application/json" in as_json.headers["content-type"]
    want = decode(as_json)
    head = {"id": "b", "inputs": [{"name": "images", "datatype": "UINT8", "shape": [3, 3, 32, 32],
                                   "parameters": {"binary_data_size": pixels.size}}]}
    r = c.post("/v2/models/cnn/infer", **binary(head, pixels.tobytes()))
    assert r.status_code == 200 and HEADER not in r.headers and r.json()["id"] == "b"  # outputs not asked binary
    assert decode(r) == want
    r = c.post("/v2/models/cnn/infer", **binary({**head, "parameters": {"binary_data_output": True}}, pixels.tobytes()))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    got = decode(r)
    assert np.array_equal(got["probabilities"], np.array(want["probabilities"], np.float32).reshape(3, 2))
    assert got["label"] == want["label"]

    # raw JPEG bytes as BYTES; one output asked binary, the other JSON, in the order asked
    files = {"name": "image_files", "datatype": "BYTES", "shape": [len(photos)]}
    as_json = c.post("/v2/models/cnn/infer", json={"inputs": [
        {**files, "data": [base64.b64encode(p).decode() for p in photos]}]})
    want = decode(as_json)
    blob = pack(photos)
    head = {"inputs": [{**files, "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}]}
    r = c.post("/v2/models/cnn/infer", **binary(head, blob))
    assert r.status_code == 200, r.text
    assert [o["name"] for o in json.loads(r.content[: int(r.headers[HEADER])])["outputs"]] == ["label", "probabilities"]
    got = decode(r)
    assert got["label"] == want["label"]
    assert np.array_equal(got["probabilities"], np.array(want["probabilities"], np.float32).reshape(-1, 2))
    v1 = c.post("/v1/predict", files=[("file", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]).json()
    assert [p["label"] for p in v1["predictions"]] == got["label"]
    assert np.allclose([[p["probabilities"][k] for k in ("cat", "dog")] for p in v1["predictions"]],
                       got["probabilities"], atol=1e-6)

    # tritonclient's request_compression_algorithm: the whole body gzip'd, the header length uncompressed
    kw = binary(head, blob)
    r = c.post("/v2/models/cnn/infer", content=gzip.compress(kw["content"]),
               headers={**kw["headers"], "content-encoding": "gzip"})
    assert r.status_code == 200 and decode(r)["label"] == want["label"]


def images(n: int = 1, **over: Any) -> dict[str, Any]:
    return {"name": "images", "datatype": "UINT8", "shape": [n, 3, 32, 32], "data": [0] * (n * 3 * 32 * 32), **over}


def files(data: list[str] | None, **over: Any) -> dict[str, Any]:
    """The image_files input; ``data`` None: sent binary (say its binary_data_size)."""
    return {"name": "image_files", "datatype": "BYTES", "shape": [len(data or [])], "data": data, **over}


def test_strict_validation_names_what_is_wrong(c: TestClient, photos: list[bytes]) -> None:
    jpeg = base64.b64encode(photos[0]).decode()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"json": {"inputs": [images(name="input_0")]}}, 422, "unknown input 'input_0'"),
        ({"json": {"inputs": [images(datatype="FP32")]}}, 422, "'images' is UINT8, not 'FP32'"),
        ({"json": {"inputs": [files([jpeg], datatype="UINT8")]}}, 422, "'image_files' is BYTES"),
        ({"json": {"inputs": [images()], "outputs": [{"name": "logits"}]}}, 422, "unknown output 'logits'"),
        ({"json": {"inputs": [images()], "outputs": [{"name": "label"}, {"name": "label"}]}}, 422, "twice"),
        ({"json": {"inputs": [images()], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}},
         422, "classification extension"),
        ({"json": {"inputs": [files([jpeg], shape=[5])]}}, 422, "shape [5] holds 1 elements"),
        ({"json": {"inputs": [files([jpeg], shape=[1, 1])]}}, 422, "shape [N]"),
        ({"json": {"inputs": [files([])]}}, 422, "no images"),
        ({"json": {"inputs": [images(data=[0] * 100)]}}, 422, "holds 3,072 elements, not 100"),
        ({"json": {"inputs": [images(shape=[1, 3, 8, 8])]}}, 422, "[N, 3, 32, 32]"),
        ({"json": {"inputs": [images(shape=[1, 3, -32, 32])]}}, 422, "whole numbers >= 0"),
        ({"json": {"inputs": [images(data=[300] * 3072)]}}, 422, "0..255"),
        ({"json": {"inputs": [images(9, data=[])]}}, 413, "limit is 8"),
        ({"json": {"inputs": [images(), images()]}}, 422, "exactly one input"),
        ({"json": {"inputs": [images(data=None)]}}, 422, "needs its data"),
        ({"json": {"inputs": [files(["%%%"])]}}, 422, "base64"),
        ({"content": b"[" * 100_000 + b"]" * 100_000}, 422, "nested too deeply"),
        ({"json": {"inputs": [images()], "parameters": {"binary_data_output": "yes"}}}, 422, "true or false"),
        (binary({"inputs": [images(data=None, parameters={"binary_data_size": 3072})]}, b"\0" * 3000), 400,
         "binary_data_size is 3072 but 3,000 bytes"),
        (binary({"inputs": [images(parameters={"binary_data_size": 3072})]}, b"\0" * 3072), 422, "both 'data'"),
        (binary({"inputs": [images()]}, b"\0" * 10), 400, "has no parameters.binary_data_size"),
        (binary({"inputs": [files(None, shape=[2], parameters={"binary_data_size": 13})]},
                pack([photos[0][:5]]) + b"\x09\0\0\0"), 422, "4-byte little-endian length"),
        ({"content": b"{}", "headers": {HEADER: "99"}}, 400, HEADER),
        ({"content": b"{}", "headers": {HEADER: "-1"}}, 400, HEADER),
        ({"content": b"not gzip", "headers": {"content-encoding": "gzip"}}, 400, "not valid gzip"),
        ({"content": b"{}", "headers": {"content-encoding": "br"}}, 415, "'br' is not supported"),
    ]
    for kw, status, words in cases:
        r = c.post("/v2/models/cnn/infer", **kw)
        assert r.status_code == status, (words, r.status_code, r.text[:300])
        assert words in r.json()["error"], (words, r.json())
    bomb = gzip.compress(b" " * (c.app.state.server.config.max_body_bytes + 1))  # type: ignore[attr-defined]
    r = c.post("/v2/models/cnn/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates past the limit" in r.json()["error"]
    assert c.post("/v2/models/cnn/infer", json={"inputs": [images()]}).status_code == 200  # still serving


def test_openapi_declares_the_infer_body_and_its_answers(c: TestClient) -> None:
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        post = paths[path]["post"]
        assert set(post["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
        assert {"200", "400", "404", "413", "422", "503"} <= set(post["responses"])
        assert set(post["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"/v2", "/v2/models/{name}/versions/{version}", "/v2/models/{name}/versions/{version}/ready"} <= set(paths)


def test_version_metadata_and_readiness_for_every_version_held(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    deploy.start("pets:2", "canary", percent=50, interval_s=3600)
    with TestClient(create_app(ServeConfig(model="pets", poll_s=0.1, log_predictions=False, drift_every_s=0))) as c:
        for _ in range(200):
            if c.get("/v2/models/pets").json()["versions"] == ["1", "2"]:
                break
            time.sleep(0.05)
        for v in ("1", "2"):
            meta = c.get(f"/v2/models/pets/versions/{v}")
            assert meta.status_code == 200 and meta.json()["versions"] == [v], meta.text
            assert meta.json()["inputs"][0]["shape"] == [-1, 3, 32, 32]
            assert c.get(f"/v2/models/pets/versions/{v}/ready").json() == {"name": "pets", "ready": True}
            blob = pack(photos[:1])
            r = c.post(f"/v2/models/pets/versions/{v}/infer", **binary(
                {"inputs": [files(None, shape=[1], parameters={"binary_data_size": len(blob)})],
                 "parameters": {"binary_data_output": True}}, blob))
            assert r.status_code == 200 and json.loads(r.content[: int(r.headers[HEADER])])["model_version"] == v
        for path in ("/v2/models/pets/versions/7", "/v2/models/pets/versions/7/ready"):
            r = c.get(path)
            assert r.status_code == 404 and "loaded: 1, 2" in r.json()["error"]
        assert c.get("/v2/models/cats/versions/1").status_code == 404
