"""People's corrections of a data set's labels: kept in FOVEA_HOME, applied by training, never in the folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fovea.data import add_correction, apply_corrections, corrected, corrections_file, discover, read_corrections
from fovea.errors import FoveaError


def _folders(root: Path, n: int = 3) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{c}{i}.jpg").write_bytes(b"x")
    return root


def test_relabel_drop_and_keep_are_applied_and_counted(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    add_correction(root, root / "cat" / "cat0.jpg", "relabel", "dog", reviewer="ana")
    add_correction(root, root / "cat" / "cat1.jpg", "drop")
    add_correction(root, root / "dog" / "dog0.jpg", "keep")
    add_correction(root, tmp_path / "elsewhere.jpg", "drop")
    ds, summary = apply_corrections(discover(root, 0.5), read_corrections(corrections_file(root)))
    labels = {Path(s.path).name: ds.classes[s.label] for split in ds.splits.values() for s in split}
    assert labels["cat0.jpg"] == "dog" and "cat1.jpg" not in labels and labels["dog0.jpg"] == "dog"
    assert len(labels) == 5
    assert summary == {"relabelled": 1, "dropped": 1, "kept": 1, "not_found": 1}
    assert (root / "cat" / "cat0.jpg").exists() and not list(root.rglob("*.csv"))  # the folders are untouched


def test_the_last_verdict_for_an_image_wins(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    add_correction(root, root / "cat" / "cat0.jpg", "drop")
    add_correction(root, root / "cat" / "cat0.jpg", "keep")
    assert read_corrections(corrections_file(root))[str((root / "cat" / "cat0.jpg").resolve())].action == "keep"


def test_corrected_reads_the_data_sets_own_file_unless_told_otherwise(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    ds = discover(root, 0.5)
    assert corrected(ds).corrections is None  # no file yet: nothing applied
    add_correction(root, root / "dog" / "dog2.jpg", "relabel", "cat")
    assert corrected(ds).corrections["relabelled"] == 1
    assert corrected(ds, "none").corrections is None
    with pytest.raises(FoveaError, match="no such file"):
        corrected(ds, str(tmp_path / "missing.csv"))


def test_bad_corrections_are_clear_errors(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    with pytest.raises(FoveaError, match="relabel, drop or keep|one of relabel"):
        add_correction(root, root / "cat" / "cat0.jpg", "rename")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,action,label\nx.jpg,relabel,\n")
    with pytest.raises(FoveaError, match="line 2"):
        read_corrections(bad)
    other = tmp_path / "other.csv"
    other.write_text(f"path,action,label\n{root / 'cat' / 'cat0.jpg'},relabel,horse\n")
    with pytest.raises(FoveaError, match="'horse'"):
        corrected(discover(root, 0.5), str(other))


def test_fovea_train_applies_the_corrections_and_records_them(tiny_pets: Path, tmp_path: Path) -> None:
    import fovea

    train = tiny_pets / "train"
    cats = sorted((train / "cat").glob("*.jpg"))
    for f in cats[:4]:
        add_correction(tiny_pets, f, "drop")
    add_correction(tiny_pets, cats[4], "relabel", "dog")
    run = fovea.train(tiny_pets, model="cnn", epochs=1, image_size=32, unknown_keep=0, out=str(tmp_path / "run"),
                      progress=False, extra={"widths": (8, 8, 8, 8)})
    meta = json.loads((run / "model.json").read_text())
    assert meta["data"]["corrections"]["dropped"] == 4 and meta["data"]["corrections"]["relabelled"] == 1
    assert meta["data"]["counts"]["train"] == {"cat": 35, "dog": 41}
    plain = fovea.train(tiny_pets, model="cnn", epochs=1, image_size=32, unknown_keep=0, corrections="none",
                        out=str(tmp_path / "plain"), progress=False, extra={"widths": (8, 8, 8, 8)})
    assert json.loads((plain / "model.json").read_text())["data"]["counts"]["train"] == {"cat": 40, "dog": 40}
