"""The online server on a model trained on real photos: every input form, bad inputs, OIP v2, metrics, logging."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_cnn
from fastapi.testclient import TestClient
from PIL import Image

import fovea
from fovea import model_registry
from fovea.serve import MicroBatcher, ServeConfig, create_app
from fovea.store import PredictionRecord, Store


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "serve", image_size=32, epochs=2,
                     widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def photos(tiny_pets: Path) -> list[Path]:
    return sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:3] + sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:3]


def client(run: Path, **kw: object) -> TestClient:
    return TestClient(create_app(ServeConfig(model=str(run), **kw)))  # type: ignore[arg-type]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with a token image body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_input_form_gives_the_artifacts_own_prediction(run: Path, photos: list[Path]) -> None:
    expected, _ = fovea.load(run, "cpu").predict(photos)
    with client(run, log_predictions=False) as c:
        r = c.post("/v1/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == expected[0].label and body["model"] == "cnn" and body["model_version"] == 0
        assert abs(body["probability"] - expected[0].probability) < 1e-5 and r.headers["x-request-id"] == body["request_id"]
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 200 and [x["label"] for x in r.json()["predictions"]] == [e.label for e in expected]
        payload = {"images": [base64.b64encode(p.read_bytes()).decode() for p in photos[:2]]}
        r = c.post("/v1/predict", json=payload, headers={"x-request-id": "abc"})
        assert r.status_code == 200 and r.json()["request_id"] == "abc"
        got = [x["probabilities"]["dog"] for x in r.json()["predictions"]]
        assert np.allclose(got, [e.probabilities["dog"] for e in expected[:2]], atol=1e-5)
        r = c.post("/v1/predict", json=payload, headers={"x-client-id": "x" * 100_000})
        assert r.status_code == 422 and "x-client-id is over 200 characters" in r.json()["error"]


def test_bad_inputs_get_4xx_json_and_the_server_stays_up(run: Path, photos: list[Path]) -> None:
    good = photos[0].read_bytes()
    rgba = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(rgba, format="PNG")
    cases = [
        ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 422, "empty"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not an image"),
        ({"content": b"hello, not a picture", "headers": {"content-type": "image/jpeg"}}, 422, "not a usable image"),
        ({"content": good[: len(good) // 2], "headers": {"content-type": "image/jpeg"}}, 422, "truncated"),
        ({"content": png_header_only(30000, 30000), "headers": {"content-type": "image/png"}}, 422, "pixels"),
        ({"content": b"\0" * (2 * 2**20), "headers": {"content-type": "image/png"}}, 413, "limit"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "BASE64"),
        ({"json": {"image": "%%%not base64"}}, 422, "BASE64"),
        ({"files": [("notes", (None, "just a field"))]}, 422, "no file parts"),
    ]
    with client(run, max_body_bytes=2**20, log_predictions=False) as c:
        for kw, status, words in cases:
            r = c.post("/v1/predict", **kw)  # type: ignore[arg-type]
            assert r.status_code == status, (words, r.status_code, r.text)
            assert words in r.json()["error"], (words, r.json())
        r = c.post("/v1/predict", content=rgba.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200  # a PNG with alpha is an image: composited, predicted
        assert c.post("/v1/predict", content=good, headers={"content-type": "image/jpeg"}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'fovea_errors_total{model_version="0",status="422"} 7.0' in metrics
        assert 'fovea_errors_total{model_version="0",status="415"} 1.0' in metrics


def test_open_inference_protocol_v2(run: Path, photos: list[Path]) -> None:
    model = fovea.load(run, "cpu")
    x, _, _ = model.load_images(photos[:2])
    with client(run, log_predictions=False) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2/models/cnn").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["parameters"]["classes"] == ["cat", "dog"]
        req = {"id": "r1", "inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8",
                                       "data": x.flatten().tolist()}]}
        out = c.post("/v2/models/cnn/infer", json=req).json()
        probs = np.array(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"])
        assert out["id"] == "r1" and np.allclose(probs, model.predict_proba(x), atol=1e-5)
        req = {"inputs": [{"name": "image_files", "shape": [2], "datatype": "BYTES",
                           "data": [base64.b64encode(p.read_bytes()).decode() for p in photos[:2]]}]}
        labels = c.post("/v2/models/cnn/infer", json=req).json()["outputs"][1]["data"]
        assert labels == [p.label for p in model.predict(photos[:2])[0]]  # a class, or "unknown" over the threshold
        bad = {"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [0] * 192}]}
        assert c.post("/v2/models/cnn/infer", json=bad).status_code == 422
        assert c.post("/v2/models/other/infer", json=req).status_code == 404
        n = int(np.prod(x.shape))
        for data, datatype in ((["a"] * n, "UINT8"), ([None] * n, "UINT8"), ([1.7] * n, "UINT8"), ([], "BYTES")):
            odd = {"inputs": [{"name": "x", "shape": list(x.shape) if datatype == "UINT8" else [0],
                               "datatype": datatype, "data": data}]}
            r = c.post("/v2/models/cnn/infer", json=odd)
            assert r.status_code == 422 and "error" in r.json(), (data[:1], r.text)
        two = {"inputs": req["inputs"] * 2}
        assert c.post("/v2/models/cnn/infer", json=two).status_code == 422  # not one answered, one dropped


def test_micro_batcher_gathers_concurrent_requests_and_returns_each_its_rows() -> None:
    sizes: list[int] = []

    def fn(x: torch.Tensor) -> np.ndarray:  # each image's "probabilities" are its first pixel: traceable
        return x[:, 0, 0, :2].float().numpy()

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(fn, max_batch_size=16, max_wait_ms=50, on_batch=sizes.append)
        b.start()
        reqs = [torch.full((1 + i % 2, 3, 4, 4), i, dtype=torch.uint8) for i in range(12)]
        out = await asyncio.gather(*(b.submit(r) for r in reqs))
        await b.stop()
        return out

    out = asyncio.run(main())
    assert [o.shape[0] for o in out] == [1 + i % 2 for i in range(12)]
    assert all((o == i).all() for i, o in enumerate(out))  # nobody got another request's rows
    assert sum(sizes) == 18 and max(sizes) > 1 and max(sizes) <= 16  # gathered, never past the cap


def test_concurrent_http_requests_share_forward_passes_and_are_logged(run: Path, photos: list[Path],
                                                                       fovea_home: Path) -> None:
    with client(run, max_wait_ms=30) as c:
        codes: list[int] = []

        def one(p: Path) -> None:
            codes.append(c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg",
                                                                                 "x-client-id": "t"}).status_code)

        threads = [threading.Thread(target=one, args=(p,)) for p in photos * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 24
        metrics = c.get("/metrics").text
        count = float(metrics.split('fovea_batch_size_count{model_version="0"} ')[1].split()[0])
        assert count < 24 + 2  # 24 requests (+2 warm-up batches) took fewer forward passes than requests
    with Store().session() as s:  # leaving the client shut the server down, which flushes the log
        rows = s.query(PredictionRecord).all()
    assert len(rows) == 24 and {r.client_id for r in rows} == {"t"} and all(len(r.fingerprint) == 64 for r in rows)


def test_serving_a_registered_version(run: Path, photos: list[Path]) -> None:
    model_registry.add(run, "pets", alias="production")
    with TestClient(create_app(ServeConfig(model="pets:production", log_predictions=False))) as c:
        r = c.post("/v1/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and (r.json()["model"], r.json()["model_version"]) == ("pets", 1)


def test_hybrid_answers_from_batch_predictions_and_falls_back_to_online(run: Path, photos: list[Path],
                                                                         tmp_path: Path) -> None:
    from sqlalchemy import update

    from fovea.batch import run_batch

    folder = tmp_path / "precomputed"
    folder.mkdir()
    (folder / photos[0].name).write_bytes(photos[0].read_bytes())
    job = run_batch(str(run), folder, progress=False).job
    with Store().session() as s:  # mark the stored answer, to see that it is the one served
        s.execute(update(PredictionRecord).where(PredictionRecord.job == job).values(
            probabilities={"cat": 0.123, "dog": 0.877}, unknown_score=-1e30))  # and surely one of the classes
    with client(run, hybrid=True, log_predictions=False) as c:
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:2]]
        preds = c.post("/v1/predict", files=files).json()["predictions"]
        answered = {k: preds[0][k] for k in ("label", "probability", "probabilities", "source")}
        assert answered == {"label": "dog", "probability": 0.877, "probabilities": {"cat": 0.123, "dog": 0.877},
                            "source": "batch"}
        assert preds[0]["unknown"] is False  # the stored unknown score answers too (under the threshold here)
        assert preds[1]["source"] == "online" and abs(sum(preds[1]["probabilities"].values()) - 1) < 1e-5
        assert 'fovea_hybrid_hits_total{model_version="0"} 1.0' in c.get("/metrics").text
