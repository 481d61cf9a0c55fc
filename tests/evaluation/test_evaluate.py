"""fovea.evaluate on a trained run: which images it uses, what it returns, what it refuses."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fovea
from fovea.errors import FoveaError

REQUIRED = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "confusion_matrix", "classes", "n_images",
            "skipped")


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # the per-test FOVEA_HOME does not exist yet at module scope
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("eval_home")))
        return fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, progress=False,
                           out=str(tmp_path_factory.mktemp("eval_run") / "run"))


@pytest.fixture(scope="module")
def pets_val_300(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred real photos: the first 150 cats and 150 dogs of pets/val, as class folders."""
    dst = tmp_path_factory.mktemp("pets_val_300")
    for cls in ("cat", "dog"):
        (dst / cls).mkdir()
        for p in sorted((pets_root / "val" / cls).glob("*.jpg"))[:150]:
            shutil.copy(p, dst / cls / p.name)
    return dst


def _class_tree(src: Path, dst: Path) -> Path:
    for cls in ("cat", "dog"):
        shutil.copytree(src / cls, dst / cls)
    return dst


def test_split_layout_is_evaluated_on_val(run: Path, tiny_pets: Path) -> None:
    m = fovea.evaluate(run, tiny_pets, progress=False)
    for key in REQUIRED:
        assert key in m, f"evaluate() result lacks {key!r}"
    assert m["split"] == "val"
    assert m["n_images"] == 40
    assert m["skipped"] == 0 and m["quarantined"] == []
    assert m["classes"] == ["cat", "dog"]
    cm = np.asarray(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum(1).tolist() == [20, 20]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 40)
    assert m["balanced_accuracy"] == pytest.approx((cm[0, 0] / 20 + cm[1, 1] / 20) / 2)
    assert 0.0 <= m["roc_auc"] <= 1.0
    assert 0.0 <= m["f1_macro"] <= 1.0
    json.dumps(m)  # JSON-ready: the CLI prints it as is


def test_class_tree_with_a_corrupt_file(run: Path, tiny_pets: Path, tmp_path: Path) -> None:
    tree = _class_tree(tiny_pets / "val", tmp_path / "photos")
    (tree / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a JPEG")
    m = fovea.evaluate(run, tree, progress=False)
    assert m["split"] == "all"
    assert m["n_images"] == 40
    assert m["skipped"] == 1
    assert [Path(q["path"]).name for q in m["quarantined"]] == ["broken.jpg"]
    assert np.asarray(m["confusion_matrix"]).sum() == 40


def test_report_is_written_on_request(run: Path, tiny_pets: Path, tmp_path: Path) -> None:
    report = tmp_path / "eval.html"
    fovea.evaluate(run, tiny_pets, progress=False, report=report)
    page = report.read_text()
    assert "Confusion matrix" in page and "data:image/png;base64," in page


def test_unknown_class_folder_is_an_error(run: Path, tiny_pets: Path, tmp_path: Path) -> None:
    tree = _class_tree(tiny_pets / "val", tmp_path / "photos")
    (tree / "bird").mkdir()
    shutil.copy(sorted((tree / "cat").glob("*.jpg"))[0], tree / "bird" / "b.jpg")
    with pytest.raises(FoveaError, match="bird"):
        fovea.evaluate(run, tree, progress=False)


def test_not_a_run_folder_is_an_error(tiny_pets: Path, tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="model.json"):
        fovea.evaluate(tmp_path, tiny_pets, progress=False)


def test_a_set_over_the_memory_budget_is_read_from_disk_with_the_same_metrics(
        run: Path, pets_val_300: Path, fovea_home: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Past the memory budget, evaluate decodes the set into its cache file and passes over it a block at a time
    (read from the file, not held): the metrics JSON is the same as from the set decoded into memory."""
    import fovea.data._cache as cache_mod
    import fovea.runtime._predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "BLOCK_BYTES", 3 * 32 * 32 * 64)  # blocks of 64 images: five of them
    read: list[tuple[int, int]] = []
    rows = cache_mod.ImageSet.rows

    def spy(self: cache_mod.ImageSet, lo: int, hi: int) -> torch.Tensor:
        if self.on_disk:
            read.append((lo, hi))
        return rows(self, lo, hi)

    monkeypatch.setattr(cache_mod.ImageSet, "rows", spy)
    monkeypatch.setenv("FOVEA_MEMORY_BUDGET", "100KB")  # 300 images at 32 px are 900 KB
    with caplog.at_level(logging.INFO, logger="fovea.evaluation"):
        disk = fovea.evaluate(run, pets_val_300, progress=False)  # auto: over the budget, so on disk
    assert "more than FOVEA_MEMORY_BUDGET" in caplog.text
    assert read == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320)]
    assert list((fovea_home / "cache").glob("*.npy"))
    memory = fovea.evaluate(run, pets_val_300, progress=False, cache="none")  # decoded again, into memory
    assert disk["n_images"] == 300 and "unknown" in disk  # the run has an unknown score: its figures compared too
    assert json.dumps(disk, sort_keys=True) == json.dumps(memory, sort_keys=True)


def test_fovea_evaluate_takes_cache(run: Path, tiny_pets: Path, fovea_home: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`fovea evaluate --cache disk` gives the JSON of `--cache memory`; a value of neither kind is refused."""
    from conftest import run_main

    said = {}
    for store in ("memory", "disk"):
        code, out, err = run_main(["evaluate", str(run), str(tiny_pets / "val"), "--json", "--cache", store,
                                   "--device", "cpu"], monkeypatch, capsys)
        assert code == 0, err
        said[store] = {k: v for k, v in json.loads(out).items() if k != "timings"}
    assert said["disk"] == said["memory"]
    code, out, err = run_main(["evaluate", str(run), str(tiny_pets / "val"), "--cache", "dsk"], monkeypatch, capsys)
    assert code == 2 and "dsk" in err and "Traceback" not in err + out
