"""Labelling on the fly, end to end on real photos: unsure uploads are queued, reviewers agree on labels
(consensus of two), the labelled images land in a data folder, and `fovea train --from-store` produces the
next version, ready for a canary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import run_main, train_cnn
from fastapi.testclient import TestClient

from fovea import deploy, model_registry
from fovea.artifact import read_meta
from fovea.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "review", image_size=32, epochs=2, widths=(8, 16, 16, 16))


def test_label_correct_retrain(run: Path, pets_root: Path, fovea_home: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    model_registry.add(run, "pets")
    uploads = {p: c for c in ("cat", "dog") for p in sorted((pets_root / "val" / c).glob("*.jpg"))[30:34]}
    with TestClient(create_app(ServeConfig(model="pets", review_below=1.0, consensus=2, drift_every_s=0))) as c:
        for p in uploads:
            assert c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).status_code == 200
        c.post("/v1/predict", content=next(iter(uploads)).read_bytes(), headers={"content-type": "image/jpeg"})
        deadline = time.monotonic() + 10
        while len(queue := c.get("/v1/reviews").json()["reviews"]) < 8:
            assert time.monotonic() < deadline, queue
            time.sleep(0.1)
        assert len(queue) == 8  # the same image sent twice is queued once
        image = c.get(queue[0]["image_url"])
        assert image.status_code == 200 and image.content in {p.read_bytes() for p in uploads}
        truth = {p.read_bytes(): c_ for p, c_ in uploads.items()}
        labels = {r["id"]: truth[c.get(r["image_url"]).content] for r in queue}
        first = queue[0]["id"]
        r = c.post(f"/v1/reviews/{first}", json={"label": labels[first], "reviewer": "ana"})
        assert r.status_code == 200 and r.json()["state"] == "pending"  # one vote of the two needed
        r = c.post(f"/v1/reviews/{first}", json={"label": "horse", "reviewer": "bob"})
        assert r.status_code == 422 and "not one of" in r.json()["error"]
        r = c.post(f"/v1/reviews/{first}", json={"label": labels[first], "reviewer": "bob"})
        assert r.status_code == 200 and r.json()["state"] == "labelled" and r.json()["label"] == labels[first]
        assert c.post(f"/v1/reviews/{first}", json={"label": "cat", "reviewer": "cy"}).status_code == 409
        rejected = queue[1]["id"]
        for who in ("ana", "bob"):
            c.post(f"/v1/reviews/{rejected}", json={"label": "", "reviewer": who})
        for rid in [r["id"] for r in queue[2:]]:
            for who in ("ana", "bob"):
                c.post(f"/v1/reviews/{rid}", json={"label": labels[rid], "reviewer": who})
        assert c.get("/v1/reviews").json()["reviews"] == []
        assert len(c.get("/v1/reviews?state=labelled").json()["reviews"]) == 7
        assert c.get("/v1/reviews/9999/image").status_code == 404
    saved = sorted(p.relative_to(fovea_home / "labelled" / "pets").parts[0] for p in (fovea_home / "labelled" / "pets").rglob("*.jpg"))
    expected = sorted(labels[r["id"]] for r in queue if r["id"] != rejected)
    assert saved == expected  # every agreed image in DATA/CLASS/, the rejected one nowhere

    code, out, err = run_main(["train", "--from-store", "pets", "--epochs", "1", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert "registered pets:2 (candidate)" in out and "fovea deploy pets:2" in out
    v2 = model_registry.resolve("pets:candidate")
    counts = read_meta(v2.path)["data"]["counts"]["train"]
    gained = {c: expected.count(c) for c in ("cat", "dog")}
    assert counts == {c: 40 + gained[c] for c in ("cat", "dog")}  # the original 40 per class plus the labelled
    assert read_meta(v2.path)["training"]["model"] == "cnn" and v2.version == 2
    d = deploy.start("pets:candidate", "canary", percent=10)
    assert d.candidate is not None and d.candidate.version == 2 and json.dumps(d.to_dict())


def test_a_csv_dataset_is_merged_with_the_labelled_images(tiny_pets: Path, tmp_path: Path, fovea_home: Path) -> None:
    import csv

    from fovea.review import labelled_dir, merged_data

    files = sorted((tiny_pets / "train").glob("*/*.jpg"))[:6]
    original = tmp_path / "set.csv"
    original.write_text("path,label,group\n" + "".join(
        f"{Path(*f.parts[-3:])},{f.parent.name},g{i}\n" for i, f in enumerate(files)))
    for p in files:  # the CSV's paths are relative to it
        (tmp_path / Path(*p.parts[-3:])).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / Path(*p.parts[-3:])).write_bytes(p.read_bytes())
    (labelled_dir("pets") / "dog").mkdir(parents=True)
    (labelled_dir("pets") / "dog" / "abc.jpg").write_bytes(files[0].read_bytes())
    merged, gained = merged_data("pets", original, tmp_path / "out")
    rows = list(csv.DictReader(merged.open()))
    assert gained == {"dog": 1} and len(rows) == 7 and all(Path(r["path"]).is_file() for r in rows)
    assert rows[-1]["label"] == "dog" and rows[-1]["group"] == "labelled-abc"


def test_suspected_label_errors_become_corrections_that_training_applies(tiny_pets: Path, tmp_path: Path) -> None:
    import fovea
    from fovea import review
    from fovea.data import corrections_file, read_corrections
    from fovea.errors import FoveaError
    from fovea.store import Store

    store = Store()
    cats = sorted((tiny_pets / "train" / "cat").glob("*.jpg"))
    probs = {"cat": 0.1, "dog": 0.9}
    ids = [review.enqueue_suspect(store, "pets", tiny_pets, p, "cat", probs, quality=0.1) for p in cats[:3]]
    assert all(ids) and review.enqueue_suspect(store, "pets", tiny_pets, cats[0], "cat", probs) is None  # once
    queued = review.reviews(store, "pets")
    assert [(r["kind"], r["given"], r["predicted"]) for r in queued] == [("label", "cat", "dog")] * 3
    with pytest.raises(FoveaError, match="new class"):
        review.vote(store, ids[0], "horse", "ana", ["cat", "dog"], new_class=True)
    assert review.vote(store, ids[0], "dog", "ana", ["cat", "dog"])["state"] == "labelled"  # relabel
    assert review.vote(store, ids[1], "", "ana", ["cat", "dog"])["state"] == "rejected"  # drop
    assert review.vote(store, ids[2], "cat", "ana", ["cat", "dog"])["label"] == "cat"  # keep
    verdicts = read_corrections(corrections_file(tiny_pets))
    assert [(v.action, v.label) for v in verdicts.values()] == [("relabel", "dog"), ("drop", None), ("keep", None)]
    assert cats[0].exists() and cats[1].exists()  # the user's folder is not edited
    run = fovea.train(tiny_pets, model="cnn", epochs=1, image_size=32, unknown_keep=0, out=str(tmp_path / "run"),
                      progress=False, extra={"widths": (8, 8, 8, 8)})
    assert json.loads((run / "model.json").read_text())["data"]["counts"]["train"] == {"cat": 38, "dog": 41}
