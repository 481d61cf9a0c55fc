"""Similar images: exact search on hand-made vectors, the IVF index against exact search, the gallery of a data set
(cached, reloaded, unreadable files skipped), ``fovea similar``, and POST /v1/similar."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, train_cnn
from fastapi.testclient import TestClient

import fovea
import fovea.similar as similar
from fovea.artifact import read_meta, write_meta
from fovea.errors import FoveaError
from fovea.serve import ServeConfig, create_app
from fovea.similar import Gallery, NoEmbedding, exact_search, gallery_for, normalize


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "similar", image_size=32, epochs=1, widths=(8, 16))


@pytest.fixture(scope="module")
def ensemble(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fovea.ensemble import make_ensemble

    base = tmp_path_factory.mktemp("similar_ensemble")
    members = [shutil.copytree(run, base / name) for name in ("a", "b")]
    return make_ensemble(members, base / "ensemble", progress=False)


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    return normalize(c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim)))


# --- search ------------------------------------------------------------------------------------------------------


def test_exact_search_finds_the_hand_made_neighbours_with_cosine_distances() -> None:
    a = math.radians(30)
    vectors = np.array([[1, 0], [0, 1], [-1, 0], [math.cos(a), math.sin(a)]], np.float32)
    g = Gallery(vectors, ["east", "north", "west", "east-north-east"], ["e", "n", "w", None])
    [hits] = g.search(np.array([[1, 0]], np.float32), k=3)
    assert [h.path for h in hits] == ["east", "east-north-east", "north"]
    assert [h.index for h in hits] == [0, 3, 1] and hits[1].label is None and hits[0].label == "e"
    assert np.allclose([h.distance for h in hits], [0.0, 1 - math.cos(a), 1.0], atol=1e-6)
    [all_of_them] = g.search(np.array([[0, -1]], np.float32), k=10)  # k over the gallery's size: every image
    assert len(all_of_them) == 4 and all_of_them[-1].path == "north" and abs(all_of_them[-1].distance - 2) < 1e-6


def test_exact_search_in_blocks_equals_one_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(500, 16, 10, seed=1)
    q = clustered(20, 16, 10, seed=2)
    monkeypatch.setattr(similar, "_EXACT_ROWS", 37)  # many blocks, the last one short
    scores, rows = exact_search(x, q, 7)
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    assert np.array_equal(rows, truth) and np.allclose(scores, np.take_along_axis(q @ x.T, truth, 1))


def test_the_index_agrees_with_exact_search_past_the_switch() -> None:
    x = clustered(3000, 32, 40, seed=0)
    q = clustered(200, 32, 40, seed=1)
    paths, labels = [str(i) for i in range(len(x))], [None] * len(x)
    exact = Gallery(x, paths, labels, exact_below=10**9)
    indexed = Gallery(x, paths, labels, exact_below=1000)
    assert not exact.indexed and indexed.indexed
    truth, got = exact.search(q, 10), indexed.search(q, 10)
    recall = np.mean([len({h.index for h in a} & {h.index for h in b}) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.95
    for a, b in zip(truth, got):  # the index's distances are exact ones (IndexIVFFlat keeps the vectors whole)
        exact_distance = {h.index: h.distance for h in a}
        assert all(abs(h.distance - exact_distance[h.index]) < 1e-5 for h in b if h.index in exact_distance)
    assert np.allclose(indexed.vectors, x, atol=1e-6) and indexed.nbytes > exact.nbytes


@pytest.mark.parametrize("exact_below", [10**9, 50], ids=["exact", "index"])
def test_add_updates_the_search_and_crosses_the_switch(exact_below: int) -> None:
    x = clustered(40, 8, 4, seed=3)
    g = Gallery(x, [f"old{i}" for i in range(40)], ["a"] * 40, exact_below=exact_below)
    new = clustered(20, 8, 4, seed=4)
    q = new[:1]
    assert g.search(q, 1)[0][0].distance > 1e-4  # not in the gallery yet
    g.add(new, [f"new{i}" for i in range(20)], ["b"] * 20)
    assert len(g) == 60 and g.indexed == (exact_below == 50)
    [[top]] = g.search(q, 1)
    assert top.path == "new0" and top.label == "b" and top.index == 40 and top.distance < 1e-5
    with pytest.raises(ValueError, match="one each per image"):
        g.add(new, ["x"], ["y"])


def test_the_index_is_made_again_when_the_gallery_has_grown_fourfold() -> None:
    x = clustered(1000, 16, 20, seed=6)
    g = Gallery(x[:100], [f"p{i}" for i in range(100)], [None] * 100, exact_below=100)
    made_for = g._index.nlist
    g.add(x[100:300], [f"p{i}" for i in range(100, 300)], [None] * 200)  # 300 < 4 x 100: the same lists
    assert g._index.nlist == made_for and g._index.ntotal == 300
    g.add(x[300:], [f"p{i}" for i in range(300, 1000)], [None] * 700)  # past 4 x 100: lists for 1000 images
    assert g.indexed and g._index.nlist > made_for and g._index.ntotal == 1000
    tops = [row[0].path for row in g.search(x[[5, 555, 999]], 1)]
    assert tops == ["p5", "p555", "p999"] and np.allclose(g.vectors, x, atol=1e-6)


@pytest.mark.parametrize("exact_below", [10**9, 5], ids=["exact", "index"])
def test_a_bounded_gallery_keeps_the_newest(exact_below: int) -> None:
    g = Gallery(np.zeros((0, 8), np.float32), [], [], capacity=10, exact_below=exact_below)
    for i in range(25):
        g.add(clustered(1, 8, 1, seed=i), [f"p{i}"], [None])
    assert 9 <= len(g) <= 10 and g.paths[-1] == "p24" and g.paths == [f"p{i}" for i in range(25 - len(g), 25)]
    [[top]] = g.search(clustered(1, 8, 1, seed=24), 1)
    assert top.path == "p24"


@pytest.mark.parametrize("exact_below", [10**9, 10], ids=["exact", "index"])
def test_a_saved_gallery_loads_back_the_same(tmp_path: Path, exact_below: int) -> None:
    x = clustered(30, 8, 3, seed=5)
    g = Gallery(x, [f"p{i}" for i in range(30)], ["a", None] * 15, exact_below=exact_below, root="/data",
                skipped=[("/data/bad.jpg", "not an image")])
    g.save(tmp_path / "g")
    back = Gallery.load(tmp_path / "g", exact_below=exact_below)
    assert back.paths == g.paths and back.labels == g.labels and back.indexed == g.indexed
    assert back.root == "/data" and back.skipped == [("/data/bad.jpg", "not an image")]
    assert [h.index for h in back.search(x[:3], 5)[2]] == [h.index for h in g.search(x[:3], 5)[2]]
    (tmp_path / "g" / "items.json").write_text("{broken")
    with pytest.raises(FoveaError, match="delete it to rebuild it"):
        Gallery.load(tmp_path / "g")


# --- the gallery of a data set -------------------------------------------------------------------------------------


def test_the_training_gallery_is_built_once_then_reloaded(run: Path, tiny_pets: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = fovea.load(run, "cpu")
    g = gallery_for(model)
    assert len(g) == 120 and set(g.labels) == {"cat", "dog"} and g.root == str(tiny_pets) and not g.skipped
    cat = sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0]
    [[top, *_]] = g.search(similar.embed(model, model.load_images([cat])[0]), 3)
    assert top.path == str(cat) and top.label == "cat" and top.distance < 1e-5 and g.shown(top.path) == f"val/cat/{cat.name}"

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the gallery was built again instead of reloaded")

    monkeypatch.setattr(similar, "_build", no_rebuild)
    again = gallery_for(model)
    assert again.paths == g.paths and np.allclose(again.vectors, g.vectors)


def test_unreadable_files_are_skipped_and_an_unlabelled_folder_works(run: Path, tiny_pets: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(tiny_pets / "val" / "dog", folder / "2024")
    (folder / "2024" / "broken.jpg").write_bytes(b"not a jpeg at all")
    g = gallery_for(fovea.load(run, "cpu"), folder)
    assert len(g) == 20 and set(g.labels) == {None}
    assert [(Path(p).name, "not an image" in r) for p, r in g.skipped] == [("broken.jpg", True)]


def test_missing_data_and_missing_embeddings_are_clear_errors(run: Path, ensemble: Path, tmp_path: Path) -> None:
    model = fovea.load(run, "cpu")
    with pytest.raises(FoveaError, match="does not exist; --in takes"):
        gallery_for(model, tmp_path / "nowhere")
    moved = shutil.copytree(run, tmp_path / "moved")
    meta = read_meta(moved)
    meta["data"]["root"] = str(tmp_path / "gone")
    write_meta(moved, meta)
    with pytest.raises(FoveaError, match=r"training data .*gone is not here.*--in DATA"):
        gallery_for(fovea.load(moved, "cpu"))
    with pytest.raises(NoEmbedding, match=r"runtime \(ensemble\) exposes no embedding.*members"):
        gallery_for(fovea.load(ensemble, "cpu"))
    with pytest.raises(NoEmbedding):
        similar.embed(fovea.load(ensemble, "cpu"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# --- fovea similar --------------------------------------------------------------------------------------------


def test_fovea_similar_prints_the_neighbours(run: Path, tiny_pets: Path, ensemble: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    dog = sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[1]
    code, out, err = run_main(["similar", str(run), str(dog), "--k", "3"], monkeypatch, capsys)
    assert code == 0, err
    assert "rank" in out and f"val/dog/{dog.name}" in out and "120 images (exact search)" in out
    code, out, err = run_main(["similar", str(run), str(dog), "--k", "4", "--json"], monkeypatch, capsys)
    doc = json.loads(out)
    [q] = doc["queries"]
    assert code == 0 and q["path"] == str(dog) and [n["rank"] for n in q["neighbours"]] == [1, 2, 3, 4]
    assert q["neighbours"][0]["path"] == f"val/dog/{dog.name}" and q["neighbours"][0]["label"] == "dog"
    assert doc["gallery"] == {"root": str(tiny_pets), "images": 120, "unreadable": 0, "search": "exact"}
    distances = [n["distance"] for n in q["neighbours"]]
    assert distances == sorted(distances)

    code, _, err = run_main(["similar", str(run), str(tiny_pets / "no-such.jpg")], monkeypatch, capsys)
    assert code == 2 and "no-such.jpg does not exist" in err and "Traceback" not in err
    code, _, err = run_main(["similar", str(ensemble), str(dog)], monkeypatch, capsys)
    assert code == 2 and "exposes no embedding" in err


# --- POST /v1/similar -----------------------------------------------------------------------------------------


def test_the_server_answers_similar_images(run: Path, tiny_pets: Path) -> None:
    cat = sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[2]
    image = {"content": cat.read_bytes(), "headers": {"content-type": "image/jpeg"}}
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False, drift_every_s=0))) as c:
        r = c.post("/v1/similar?k=5", **image)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["k"] == 5 and body["in"] == "training" and body["gallery_size"] == 120
        hits = body["neighbours"]
        assert len(hits) == 5 and {h["label"] for h in hits} <= {"cat", "dog"}
        assert hits[0]["path"] == f"val/cat/{cat.name}" and hits[0]["distance"] < 1e-4
        assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
        got = c.get(hits[0]["image_url"])
        assert got.status_code == 200 and got.content == cat.read_bytes()
        assert got.headers["content-type"] == "image/jpeg"
        assert c.get("/v1/similar/images/100000").status_code == 404
        assert c.get("/v1/similar/images/0?version=7").status_code == 404

        for bad in ("k=0", "k=101", "k=ten", "in=everything"):
            r = c.post(f"/v1/similar?{bad}", **image)
            assert r.status_code == 422 and "error" in r.json(), bad
        r = c.post("/v1/similar", content=b"hello, not a picture", headers={"content-type": "image/jpeg"})
        assert r.status_code == 422 and "not a usable image" in r.json()["error"]
        r = c.post("/v1/similar", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415

        r = c.post("/v1/similar?in=seen", **image)  # nothing answered yet
        assert r.status_code == 200 and r.json()["neighbours"] == [] and r.json()["gallery_size"] == 0
        answered = c.post("/v1/predict", **image).json()
        c.post("/v1/predict", content=sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[0].read_bytes(),
               headers={"content-type": "image/jpeg"})
        r = c.post("/v1/similar?in=seen&k=10", **image)
        seen = r.json()["neighbours"]
        assert r.json()["gallery_size"] == 2 and len(seen) == 2
        assert seen[0]["path"] == f"seen:{answered['request_id']}" and seen[0]["label"] == answered["label"]
        assert seen[0]["distance"] < 1e-4 and seen[0]["image_url"] is None


def test_the_server_refuses_what_it_cannot_search(run: Path, ensemble: Path, tiny_pets: Path, tmp_path: Path) -> None:
    image = {"content": sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0].read_bytes(),
             "headers": {"content-type": "image/jpeg"}}
    with TestClient(create_app(ServeConfig(model=str(ensemble), log_predictions=False, drift_every_s=0))) as c:
        r = c.post("/v1/similar", **image)
        assert r.status_code == 409 and "exposes no embedding" in r.json()["error"]
    moved = shutil.copytree(run, tmp_path / "moved")
    meta = read_meta(moved)
    meta["data"]["root"] = str(tmp_path / "gone")
    write_meta(moved, meta)
    with TestClient(create_app(ServeConfig(model=str(moved), log_predictions=False, drift_every_s=0,
                                           admin_token="secret"))) as c:
        r = c.post("/v1/similar", **image)
        assert r.status_code == 409 and "is not here" in r.json()["error"]
        assert c.post("/v1/similar?in=seen", **image).status_code == 200  # what it answered needs no training data
        assert c.get("/v1/similar/images/0").status_code == 401  # training images are behind the token it has
