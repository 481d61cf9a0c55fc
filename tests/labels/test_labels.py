"""`fovea check DATA --labels` on real images: labels flipped on purpose are the ones it suspects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from fovea.labels import check_labels, rank_issues

FAST = {"epochs": 60, "image_size": 32, "extra": {"widths": (8, 16, 16, 16)}}


@pytest.fixture(scope="module")
def cats_and_digits(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> tuple[Path, set[str]]:
    """24 real cat photos and 24 of scikit-learn's handwritten digits, two of each filed under the other class:
    (the folder, the flipped files' absolute paths). Any model tells these classes apart, so the flips are the
    only images whose label it doubts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cats_and_digits")
    for c in ("cat", "digit"):
        (root / c).mkdir()
    flipped = set()
    for i, f in enumerate(sorted((pets_root / "train" / "cat").glob("*.jpg"))[:24]):
        dest = root / ("digit" if i < 2 else "cat") / f"img{i:03d}.jpg"
        shutil.copy(f, dest)
        flipped |= {str(dest)} if i < 2 else set()
    for i, d in enumerate(load_digits().images[:24]):
        dest = root / ("cat" if i < 2 else "digit") / f"img{100 + i:03d}.png"
        Image.fromarray((255 - d * 16).clip(0, 255).astype(np.uint8)).resize((64, 64)).convert("RGB").save(dest)
        flipped |= {str(dest)} if i < 2 else set()
    return root, flipped


def test_the_flipped_labels_are_the_suspects(cats_and_digits: tuple[Path, set[str]]) -> None:
    root, flipped = cats_and_digits
    result = check_labels(root, folds=3, progress=False, **FAST)
    assert result["n_images"] == 48 and result["folds"] == 3
    ranked = [r["path"] for r in result["images"]]
    assert set(ranked[:4]) == flipped  # the four flips rank first
    flagged = {r["path"] for r in result["images"] if r["issue"]}
    assert flipped <= flagged and len(flagged) <= 8
    top = result["images"][0]
    assert top["suggested"] != top["given"] and top["quality"] < 0.5 and top["fold"].startswith("fold-")
    saved = json.loads(Path(result["file"]).read_text())  # what the review queue and the data page read
    assert saved["images"] == result["images"]
    page = Path(result["html"]).read_text()
    assert page.count("<figure>") == len(flagged) and "data:image/jpeg;base64," in page


def test_rank_issues_flags_confidently_wrong_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    p_given = rng.uniform(0.7, 0.99, 100)
    p_given[[3, 60]] = [0.02, 0.05]  # two images the models are sure belong to the other class
    probs = np.where(labels[:, None] == np.arange(2), p_given[:, None], 1 - p_given[:, None])
    quality, flagged = rank_issues(labels, probs)
    assert set(np.argsort(quality)[:2]) == {3, 60} and set(np.flatnonzero(flagged)) == {3, 60}


def test_the_command(cats_and_digits: tuple[Path, set[str]], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    root, flipped = cats_and_digits
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal's width
    code, out, _ = run_main(["check", str(root), "--labels", "--folds", "2", "--rounds", "2", "--epochs", "60",
                             "--image-size", "32", "--top", "3", "--review", "pets"], monkeypatch, capsys)
    assert code == 0 and "the 3 most likely wrong" in out and "label-issues.html" in out
    assert "sent to the review queue" in out
    from fovea import review
    from fovea.store import Store

    queued = review.reviews(Store(), "pets")
    assert {r["given"] for r in queued} == {"cat", "digit"} and all(r["kind"] == "label" for r in queued)
    assert len(queued) >= 4  # at least the four flips
    code, _, err = run_main(["check", str(root), "--review", "pets"], monkeypatch, capsys)
    assert code != 0 and "add --labels" in err
    code, _, err = run_main(["check", str(root), "--labels", "--folds", "30"], monkeypatch, capsys)
    assert code != 0 and "--folds" in err
