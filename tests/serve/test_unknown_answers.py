"""Images of none of the classes through the server: answered "unknown" on /v1/predict and the Open Inference
Protocol, logged with their score, counted on /metrics, queued for people (who may name a new class), and stored
as "unknown" by `fovea batch`. The threshold is moved to the ends (every image unknown, none) so the plumbing is
tested whatever a tiny model's score is worth; bench/unknown.py measures the score itself."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import train_cnn, with_threshold
from fastapi.testclient import TestClient
from sqlalchemy import select

from fovea.batch import run_batch
from fovea.serve import ServeConfig, create_app
from fovea.store import PredictionRecord, Store


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "serve_unknown", image_size=32, epochs=2, widths=(8, 16, 16, 16))


@pytest.fixture
def photos(tiny_pets: Path) -> list[Path]:
    return sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:3] + sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:3]


def test_unknown_answers_are_labelled_logged_counted_and_queued(run: Path, tmp_path: Path, photos: list[Path],
                                                                fovea_home: Path) -> None:
    always = with_threshold(run, tmp_path / "always", -1e30)
    with TestClient(create_app(ServeConfig(model=str(always), drift_every_s=0))) as c:
        r = c.post("/v1/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
        body = r.json()
        assert r.status_code == 200 and body["label"] == "unknown" and body["unknown"] is True
        assert body["class_otherwise"] in ("cat", "dog") and body["unknown_threshold"] == -1e30
        assert isinstance(body["unknown_score"], float)
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[1:]]
        assert all(p["label"] == "unknown" for p in c.post("/v1/predict", files=files).json()["predictions"])
        assert 'fovea_unknown_answers_total{model_version="0"} 6.0' in c.get("/metrics").text
        deadline = time.monotonic() + 10
        while len(queue := c.get("/v1/reviews").json()["reviews"]) < 6:  # every unknown image goes to people
            assert time.monotonic() < deadline, queue
            time.sleep(0.1)
        assert {q["predicted"] for q in queue} == {"unknown"}
        first = queue[0]["id"]
        r = c.post(f"/v1/reviews/{first}", json={"label": "fox", "reviewer": "ana"})
        assert r.status_code == 422 and "new_class" in r.json()["error"]  # a typo is not a new class
        r = c.post(f"/v1/reviews/{first}", json={"label": "../x", "reviewer": "ana", "new_class": True})
        assert r.status_code == 422
        r = c.post(f"/v1/reviews/{first}", json={"label": "fox", "reviewer": "ana", "new_class": True})
        assert r.status_code == 200 and r.json()["state"] == "labelled" and r.json()["label"] == "fox"
        assert c.post(f"/v1/reviews/{queue[1]['id']}", json={"label": "", "reviewer": "ana"}).json()["state"] == "rejected"
        time.sleep(0.3)  # the prediction log writes in the background
    assert len(list((fovea_home / "labelled" / "always" / "fox").iterdir())) == 1  # a folder for the next training
    with Store().session() as s:
        rows = s.scalars(select(PredictionRecord)).all()
    assert len(rows) == 6 and {r.label for r in rows} == {"unknown"} and all(r.unknown_score is not None for r in rows)


def test_open_inference_protocol_adds_the_unknown_score_tensor(run: Path, tmp_path: Path, photos: list[Path]) -> None:
    never = with_threshold(run, tmp_path / "never", 1e30)
    always = with_threshold(run, tmp_path / "always", -1e30)
    x = np.zeros((2, 3, 32, 32), np.uint8)
    infer = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    for folder, label in ((never, None), (always, "unknown")):
        with TestClient(create_app(ServeConfig(model=str(folder), log_predictions=False, drift_every_s=0))) as c:
            out = {o["name"]: o for o in c.post(f"/v2/models/{folder.name}/infer", json=infer).json()["outputs"]}
            assert out["unknown_score"]["shape"] == [2] and out["unknown_score"]["parameters"]["threshold"] in (1e30, -1e30)
            assert (label is None and set(out["label"]["data"]) <= {"cat", "dog"}) or out["label"]["data"] == [label] * 2
    with TestClient(create_app(ServeConfig(model=str(always), log_predictions=False, unknown=False,
                                           drift_every_s=0))) as c:  # --no-unknown
        out = {o["name"]: o for o in c.post("/v2/models/always/infer", json=infer).json()["outputs"]}
        assert "unknown_score" not in out and set(out["label"]["data"]) <= {"cat", "dog"}


def test_batch_stores_unknown_images_as_unknown_with_their_score(run: Path, tmp_path: Path, tiny_pets: Path) -> None:
    always = with_threshold(run, tmp_path / "always", -1e30)
    r = run_batch(str(always), tiny_pets / "val", progress=False)
    closed = run_batch(str(always), tiny_pets / "val", progress=False, unknown=False, job="closed")
    assert r.predicted == closed.predicted == 40
    with Store().session() as s:
        rows = s.scalars(select(PredictionRecord).where(PredictionRecord.job == r.job)).all()
        shut = s.scalars(select(PredictionRecord).where(PredictionRecord.job == "closed")).all()
    assert {x.label for x in rows} == {"unknown"} and all(x.unknown_score is not None for x in rows)
    assert {x.label for x in shut} <= {"cat", "dog"} and all(x.unknown_score is None for x in shut)
