"""Shared fixtures: an isolated FOVEA_HOME per test, and small subsets of the real photos in ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real photos beside the checkout; FOVEA_TEST_DATA points elsewhere (e.g. a copy on a GPU machine).
SHARED = Path(os.environ.get("FOVEA_TEST_DATA", REPO.parent / "shared" / "data"))


def _first(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[:n]


@pytest.fixture(autouse=True)
def fovea_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("fovea_home")
    monkeypatch.setenv("FOVEA_HOME", str(home))
    torch.set_num_threads(2)
    return home


@pytest.fixture(scope="session")
def pets_root() -> Path:
    root = SHARED / "pets"
    if not (root / "train").is_dir():
        pytest.fail(f"the real test data is missing: {root} (see ../shared/data/README.md)")
    return root


def make_subset(dst: Path, n_train: int, n_val: int, root: Path) -> Path:
    """Copy the first n images per class of pets/train and pets/val into dst (split layout)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("cat", "dog"):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for p in _first(root / split / cls, n):
                shutil.copy(p, out / p.name)
    return dst


@pytest.fixture(scope="session")
def tiny_pets(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """40 train + 20 val images per class of real cats and dogs (read-only: copy before changing)."""
    return make_subset(tmp_path_factory.mktemp("tiny_pets"), 40, 20, pets_root)
