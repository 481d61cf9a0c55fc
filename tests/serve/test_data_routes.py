"""The data page's routes on a model trained on real photos: GET /v1/data and its filters (suspected label errors
from a label check, unknown answers, near-duplicates, low confidence, wrong on validation), and per image its file,
Grad-CAM, similar images and sending it to the review queue; bad ids are 404s, never 500s."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_subset, train_cnn
from fastapi.testclient import TestClient
from PIL import Image

import fovea
from fovea.artifact import read_meta, write_meta
from fovea.data import add_correction, write_label_issues
from fovea.serve import ServeConfig, create_app
from fovea.serve import _dataview as dataview


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """40 + 20 images per class, and two copies of one cat: byte-identical in dog/ (a conflicting label), and
    shrunk and re-encoded (a near-duplicate) in val/cat/."""
    root = make_subset(tmp_path_factory.mktemp("data_pets"), 40, 20, pets_root)
    original = sorted((root / "train" / "cat").glob("*.jpg"))[5]
    shutil.copy(original, root / "train" / "dog" / "copy_of_a_cat.jpg")
    with Image.open(original) as im:
        im.convert("RGB").resize((im.width // 2, im.height // 2)).save(root / "val" / "cat" / "smaller_cat.jpg",
                                                                        quality=70)
    return root


@pytest.fixture(scope="module")
def run(pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(pets, tmp_path_factory, "data_routes", image_size=32, epochs=2, widths=(8, 16, 16, 16))


def suspects(root: Path) -> list[Path]:
    """Three cats the (fake) label check says are dogs, most suspect first, written to FOVEA_HOME."""
    cats = sorted((root / "train" / "cat").glob("*.jpg"))
    picked = [cats[12], cats[3], cats[20]]
    images = [{"path": str(p.absolute()), "split": "train", "given": "cat", "suggested": "dog", "quality": q,
               "issue": True, "rank": r, "probabilities": {"cat": q, "dog": 1 - q}}
              for r, (p, q) in enumerate(zip(picked, (0.01, 0.02, 0.04)), 1)]
    images.append({"path": str(cats[7].absolute()), "split": "train", "given": "cat", "suggested": "cat",
                   "quality": 0.9, "issue": False, "rank": 4, "probabilities": {"cat": 0.9, "dog": 0.1}})
    write_label_issues(root, {"data": str(root), "classes": ["cat", "dog"], "folds": 4, "seconds": 1.0,
                              "created": "2026-11-24T18:00:00", "n_images": 4, "n_issues": 3, "images": images})
    return picked


def ready(c: TestClient, query: str = "") -> dict[str, Any]:
    """GET /v1/data until the table is built (202s with the progress until then)."""
    deadline = time.monotonic() + 120
    while True:
        r = c.get("/v1/data" + query)
        assert r.status_code in (200, 202), r.text
        body = r.json()
        if r.status_code == 200:
            return body
        assert body["state"] == "computing" and body["progress"]["done"] <= body["progress"]["total"]
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def every(c: TestClient, query: str = "") -> list[dict[str, Any]]:
    body = ready(c, query + ("&" if query else "?") + "limit=500")
    assert body["total"] <= 500
    return list(body["rows"])


def test_the_filters_keep_what_they_say(run: Path, pets: Path) -> None:
    picked = suspects(pets)
    model = fovea.load(run, "cpu")
    val = [p for c in ("cat", "dog") for p in sorted((pets / "val" / c).glob("*.jpg"))]
    said = {str(p): (pr, p.parent.name) for p, pr in zip(val, model.predict(val)[0])}
    with TestClient(create_app(ServeConfig(model=str(run), drift_every_s=0))) as c:
        body = ready(c)
        assert body["state"] == "ready" and body["classes"] == ["cat", "dog"] and body["low_confidence_below"] == 0.6
        assert body["counts"]["all"] == 40 + 41 + 21 + 20 and body["class_counts"] == {"cat": 61, "dog": 61}
        assert body["label_check"]["n_issues"] == 3
        rows = every(c)
        by_path = {pets / r["path"]: r for r in rows}
        assert len(by_path) == len(rows) == body["total"]

        # suspects: the three flagged images, most suspect first, with what the check suggests
        flagged = every(c, "?filter=suspect")
        assert [pets / r["path"] for r in flagged] == picked and body["counts"]["suspect"] == 3
        assert [(r["suspect"]["suggested"], r["suspect"]["rank"], r["label"]) for r in flagged] == [
            ("dog", 1, "cat"), ("dog", 2, "cat"), ("dog", 3, "cat")]
        checked = by_path[sorted((pets / "train" / "cat").glob("*.jpg"))[7]]
        assert checked["suspect"]["issue"] is False  # judged, not flagged: not under the filter

        # near-duplicates: the cat and its two copies, pointing at each other
        dups = every(c, "?filter=duplicate")
        original = sorted((pets / "train" / "cat").glob("*.jpg"))[5]
        copies = {original, pets / "train" / "dog" / "copy_of_a_cat.jpg", pets / "val" / "cat" / "smaller_cat.jpg"}
        assert {pets / r["path"] for r in dups} == copies
        ids = {r["id"] for r in dups}
        assert all(r["duplicate_of"] in ids and r["duplicate_of"] != r["id"] for r in dups)

        # wrong on validation and unknown: what the model itself says of the validation images
        wrong = every(c, "?filter=wrong")
        assert {str(pets / r["path"]) for r in wrong} == {p for p, (pr, truth) in said.items()
                                                         if pr.probabilities[truth] < max(pr.probabilities.values())}
        assert all(r["split"] == "val" and r["predicted"] != r["label"] for r in wrong)
        assert [r["confidence"] for r in wrong] == sorted((r["confidence"] for r in wrong), reverse=True)
        unknown_val = {str(pets / r["path"]) for r in every(c, "?filter=unknown") if r["split"] == "val"}
        assert unknown_val == {p for p, (pr, _) in said.items() if pr.unknown}
        low = every(c, "?filter=low_confidence")
        assert all(r["confidence"] < 0.6 for r in low) and len(low) == sum(r["confidence"] < 0.6 for r in rows)
        assert [r["confidence"] for r in low] == sorted(r["confidence"] for r in low)  # least sure first

        # a class, a page, and the counts follow the class
        dogs = c.get("/v1/data?class=dog&limit=10&offset=5").json()
        assert dogs["counts"]["all"] == 61 and dogs["total"] == 61 and len(dogs["rows"]) == 10
        assert all(r["label"] == "dog" for r in dogs["rows"]) and dogs["counts"]["suspect"] == 0
        assert [r["id"] for r in dogs["rows"]] == [r["id"] for r in rows if r["label"] == "dog"][5:15]

        for query, words in (("?class=horse", "not one of cat, dog"), ("?filter=blurry", "filter"),
                             ("?limit=0", "limit"), ("?offset=-1", "offset")):
            r = c.get("/v1/data" + query)
            assert r.status_code == 422 and words in r.json()["error"], (query, r.text)


def test_image_gradcam_similar_and_review(run: Path, pets: Path) -> None:
    picked = suspects(pets)
    with TestClient(create_app(ServeConfig(model=str(run), drift_every_s=0))) as c:
        rows = every(c)
        me = next(r for r in rows if pets / r["path"] == picked[0])
        r = c.get(f"/v1/data/{me['id']}/image")
        assert r.status_code == 200 and r.content == picked[0].read_bytes()
        assert r.headers["content-type"] == "image/jpeg"
        r = c.get(f"/v1/data/{me['id']}/image?size=64")
        with Image.open(io.BytesIO(r.content)) as im:
            assert r.status_code == 200 and im.format == "JPEG" and max(im.size) == 64

        r = c.get(f"/v1/data/{me['id']}/gradcam")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (256, 256) and im.mode == "RGB"

        # similar: itself left out, nearest first; the byte-identical copy is the nearest of all
        original = next(r for r in rows if pets / r["path"] == sorted((pets / "train" / "cat").glob("*.jpg"))[5])
        near = wait_similar(c, original["id"], 5)
        assert len(near) == 5 and original["id"] not in [n["id"] for n in near]
        assert [n["distance"] for n in near] == sorted(n["distance"] for n in near)
        assert near[0]["path"] == "train/dog/copy_of_a_cat.jpg" and near[0]["distance"] < 1e-4
        assert near[0]["label"] == "dog" and near[0]["duplicate_of"] is not None  # rows as GET /v1/data gives them

        # review: queued once, as a suspected label error with the check's suggestion
        r = c.post(f"/v1/data/{me['id']}/review", json={"suggested": "horse"})
        assert r.status_code == 422 and "suggested must be one of cat, dog" in r.json()["error"]
        r = c.post(f"/v1/data/{me['id']}/review")
        assert r.status_code == 201 and r.json()["already_queued"] is False, r.text
        again = c.post(f"/v1/data/{me['id']}/review")
        assert again.status_code == 200 and again.json() == {"review_id": None, "already_queued": True}
        queued = c.get("/v1/reviews").json()["reviews"]
        assert [(q["id"], q["kind"], q["given"], q["predicted"]) for q in queued] == [
            (r.json()["review_id"], "label", "cat", "dog")]
        assert c.get(queued[0]["image_url"]).content == picked[0].read_bytes()

        n = len(rows)
        for path in (f"/v1/data/{n}/image", f"/v1/data/{n}/gradcam", f"/v1/data/{n}/similar", "/v1/data/99999/image"):
            r = c.get(path)
            assert r.status_code == 404 and f"no image #{path.split('/')[3]}" in r.json()["error"], (path, r.text)
        assert c.post(f"/v1/data/{n}/review").status_code == 404
        for path in ("/v1/data/-1/image", "/v1/data/abc/gradcam", "/v1/data/../../etc/passwd/image",
                     f"/v1/data/{2**40}/image", "/v1/data/0/similar?k=0", "/v1/data/0/image?size=9"):
            r = c.get(path)
            assert r.status_code in (404, 422) and "error" in r.json(), (path, r.text)


def wait_similar(c: TestClient, image_id: int, k: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120
    while True:
        r = c.get(f"/v1/data/{image_id}/similar?k={k}")
        if r.status_code != 503:  # the index of the data set is built on first use
            assert r.status_code == 200, r.text
            return list(r.json()["similar"])
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)


def test_a_verdict_shows_and_settles_the_suspicion(run: Path, pets: Path) -> None:
    picked = suspects(pets)
    with TestClient(create_app(ServeConfig(model=str(run), drift_every_s=0))) as c:
        assert ready(c)["counts"]["suspect"] == 3
        add_correction(pets, picked[0], "relabel", "dog", reviewer="ana")  # what a review verdict appends
        time.sleep(0.01)
        body = ready(c, "?limit=500")
        row = next(r for r in body["rows"] if pets / r["path"] == picked[0])
        assert row["label"] == "dog" and row["suspect"] is None
        assert row["corrected"] == {"action": "relabel", "label": "dog", "reviewer": "ana", "from": "cat"}
        assert body["counts"]["suspect"] == 2 and body["class_counts"] == {"cat": 60, "dog": 62}


def test_the_table_is_kept_and_a_second_server_reads_it(run: Path, fovea_home: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataview, "FIRST_WAIT_S", 0.0)
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False, drift_every_s=0))) as c:
        r = c.get("/v1/data")  # built in the background: the first answer is its progress
        assert r.status_code == 202 and r.json()["state"] == "computing" and set(r.json()["progress"]) == {
            "stage", "done", "total"}
        assert c.get("/v1/data/0/image").status_code in (200, 409)  # 409 until the table is there
        first = ready(c)
        assert first["label_check"] is None and first["counts"]["suspect"] == 0  # no label check: no suspects
        # a server without a store still shows the data; only sending to review needs one
        r = c.post("/v1/data/0/review")
        assert r.status_code == 409 and "keeps no store" in r.json()["error"]
    assert len(list((fovea_home / "dataview").glob("*/table.json"))) == 1
    monkeypatch.setattr(dataview, "FIRST_WAIT_S", 5.0)
    monkeypatch.setattr(dataview, "INFERENCE_BATCH", None)  # predicting again would fail
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False, drift_every_s=0))) as c:
        r = c.get("/v1/data")
        assert r.status_code == 200 and r.json()["rows"] == first["rows"]  # read back, not predicted again


def test_moved_data_and_a_model_without_gradients(run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    meta = read_meta(moved)
    meta["data"]["root"] = str(tmp_path / "gone")
    write_meta(moved, meta)
    with TestClient(create_app(ServeConfig(model=str(moved), drift_every_s=0, admin_token="t0ken"))) as c:
        r = c.get("/v1/data")  # viewer-level: with an admin token, the token
        assert r.status_code == 401 and "Authorization" in r.json()["error"]
        c.headers["authorization"] = "Bearer t0ken"
        body = c.get("/v1/data").json()
        assert body["state"] == "unavailable" and "not at" in body["reason"] and "gone" in body["reason"]
        r = c.get("/v1/data/0/image")
        assert r.status_code == 404 and "not at" in r.json()["error"]

    from fovea.ensemble import make_ensemble

    twin = shutil.copytree(run, tmp_path / "twin")
    both = make_ensemble([run, twin], tmp_path / "ensemble", progress=False)
    with TestClient(create_app(ServeConfig(model=str(both), drift_every_s=0))) as c:
        assert ready(c)["total"] == 122
        r = c.get("/v1/data/0/gradcam")
        assert r.status_code == 409 and "Grad-CAM needs one PyTorch network" in r.json()["error"]
        r = c.get("/v1/data/0/similar")
        assert r.status_code == 409 and "embedding" in r.json()["error"]
