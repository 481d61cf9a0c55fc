"""K-means colour segmentation: an operation (fovea ops kmeans), a gallery tile, and a --preprocess step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

import fovea
from fovea import ops
from fovea.errors import FoveaError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage.data import chelsea  # a real cat photo

    return np.ascontiguousarray(chelsea()[::3, ::3])  # (100, 151, 3)


def test_two_flat_colours_are_found_exactly() -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :10] = (200, 30, 40)  # a third red, two thirds blue
    img[:, 10:] = (10, 20, 230)
    seg = ops.kmeans_clusters(img, k=2)
    assert seg.centres.tolist() == [[10, 20, 230], [200, 30, 40]]  # largest cluster first
    assert seg.shares == pytest.approx([2 / 3, 1 / 3])
    assert (seg.image == img).all() and set(np.unique(seg.labels)) == {0, 1}


def test_k_colours_same_size_and_deterministic(photo: np.ndarray) -> None:
    a = ops.apply("kmeans", photo, k=4)
    assert a.shape == photo.shape and a.dtype == np.uint8
    assert len(np.unique(a.reshape(-1, 3), axis=0)) == 4
    assert (ops.apply("kmeans", photo, k=4) == a).all()  # seeded: a preprocessing step must repeat
    seg = ops.kmeans_clusters(photo, k=4)
    assert sum(seg.shares) == pytest.approx(1.0) and seg.shares == sorted(seg.shares, reverse=True)
    # each pixel sits in the cluster whose centre is nearest (k-means' fixed point, up to its tolerance)
    d = ((photo.reshape(-1, 1, 3).astype(float) - seg.centres[None].astype(float)) ** 2).sum(2)
    assert (d.argmin(1) == seg.labels.ravel()).mean() > 0.99


def test_gray_input_and_bad_parameters(photo: np.ndarray) -> None:
    gray = ops.apply("gray", photo)
    out = ops.apply("kmeans", gray, k=3)
    assert out.shape == gray.shape and len(np.unique(out)) == 3
    with pytest.raises(FoveaError, match="k must be in 1..64"):
        ops.apply("kmeans", photo, k=0)
    with pytest.raises(FoveaError, match="integer"):
        ops.apply("kmeans", photo, k="many")


def test_cli_prints_the_clusters_and_writes_the_png(photo: np.ndarray, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo).save(src)
    code, out, err = run_main(["ops", "kmeans", str(src), "--param", "k=4", "--out", str(tmp_path / "k.png")],
                              monkeypatch, capsys)
    assert code == 0, err
    assert "4 clusters, largest first" in out and out.count("% of the pixels") == 4
    assert (np.asarray(Image.open(tmp_path / "k.png")) == ops.apply("kmeans", photo, k=4)).all()


def test_in_the_gallery(photo: np.ndarray, tmp_path: Path) -> None:
    names = [o.name for o in ops.list_ops()]
    assert "kmeans" in names and ops.get_op("kmeans").kind == "segment"
    g = ops.gallery(photo, tmp_path / "g.png")
    assert g.tiles == 1 + len(names) + 3


def test_as_a_preprocess_step_recorded_in_the_model(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, model="colorhist-nb", preprocess="kmeans:k=3", out=str(tmp_path / "run"),
                      progress=False, unknown_keep=0.0)
    steps = json.loads((run / "model.json").read_text())["preprocessing"]["steps"]
    assert steps == [{"op": "kmeans", "params": {"k": 3, "attempts": 3, "iterations": 20, "seed": 0}}]
    model = fovea.load(run, "cpu")
    images, _, _ = model.load_images(sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:2])
    prepared = model.prepare(images)
    for img in prepared.permute(0, 2, 3, 1).numpy():  # 3 colours per image: the step ran inside the model
        assert len(np.unique(img.reshape(-1, 3), axis=0)) <= 3
