"""Answering "unknown" everywhere a prediction is made: the artifact carries a fitted score and a calibrated
threshold; predict, evaluate, batch, compressed artifacts and ensembles use them; --no-unknown and older
artifacts stay closed-set; calibrate-unknown gives a model its score.

The plumbing is tested with the real fitted score and a threshold moved to the ends (every image unknown, none),
so no assertion depends on how well a tiny model tells ants from cats; bench/unknown.py measures that.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, train_cnn, with_threshold

import fovea
from fovea.artifact import UNKNOWN_FILE, read_meta, write_meta
from fovea.errors import FoveaError
from fovea.runtime import UNKNOWN


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "open_set", image_size=32, epochs=2, widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def ants(pets_root: Path) -> Path:
    folder = pets_root.parent / "hymenoptera" / "val" / "ants"
    if not folder.is_dir():
        pytest.fail(f"the real test data is missing: {folder}")
    return folder


def test_training_fits_a_score_and_calibrates_it_on_validation(run: Path) -> None:
    entry = read_meta(run)["unknown"]
    assert (run / UNKNOWN_FILE).is_file() and entry["file"] == UNKNOWN_FILE
    assert entry["keep"] == 0.95 and entry["calibrated_on"] == 40  # tiny_pets/val: 20 cats, 20 dogs
    assert entry["kept"] >= 0.95  # the threshold keeps at least the asked share of the images it was set on
    assert json.loads((run / "metrics.json").read_text())["unknown"]["score"] == entry["score"]
    model = fovea.load(run, "cpu")
    assert model.answers_unknown and model.unknown_threshold == entry["threshold"]
    reference = np.load(run / "reference.npz")
    assert reference["unknown_scores"].shape == (40,)  # the drift reference knows the validation scores


def test_over_the_threshold_an_image_is_unknown_with_its_score_and_the_class_otherwise(
        run: Path, tmp_path: Path, tiny_pets: Path) -> None:
    files = sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:4]
    always = fovea.load(with_threshold(run, tmp_path / "always", -1e30), "cpu")
    never = fovea.load(with_threshold(run, tmp_path / "never", 1e30), "cpu")
    closed = fovea.load(run, "cpu", unknown=False)
    a, _ = always.predict(files)
    n, _ = never.predict(files)
    c, _ = closed.predict(files)
    assert all(p.label == UNKNOWN and p.unknown and p.class_otherwise in ("cat", "dog") for p in a)
    assert [p.class_otherwise for p in a] == [p.label for p in n] == [p.label for p in c]  # same network
    assert all(not p.unknown and p.unknown_score is not None for p in n)
    assert [p.unknown_score for p in a] == pytest.approx([p.unknown_score for p in n])
    assert all(p.unknown_score is None and "unknown" not in p.to_dict() for p in c)  # closed-set: as before
    d = a[0].to_dict()
    assert d["label"] == UNKNOWN and d["unknown"] is True and d["unknown_threshold"] == -1e30
    np.testing.assert_allclose([list(p.probabilities.values()) for p in a], [list(p.probabilities.values()) for p in c],
                               atol=1e-6)


def test_an_artifact_without_the_fields_stays_closed_set(run: Path, tmp_path: Path, tiny_pets: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta = read_meta(old)
    del meta["unknown"]
    write_meta(old, meta)
    (old / UNKNOWN_FILE).unlink()
    model = fovea.load(old, "cpu")
    preds, _ = model.predict(sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:2])
    assert not model.answers_unknown and all(p.label in ("cat", "dog") and p.unknown_score is None for p in preds)


def test_cli_predict_says_unknown_and_no_unknown_turns_it_off(run: Path, tmp_path: Path, tiny_pets: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    always = with_threshold(run, tmp_path / "always", -1e30)
    photo = str(sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0])
    code, out, _ = run_main(["predict", str(always), photo, "--json"], monkeypatch, capsys)
    row = json.loads(out)
    assert code == 0 and row["label"] == "unknown" and row["unknown"] and row["class_otherwise"] in ("cat", "dog")
    code, out, _ = run_main(["predict", str(always), photo], monkeypatch, capsys)
    assert code == 0 and "\tunknown  (none of the classes: score" in out
    code, out, _ = run_main(["predict", str(always), photo, "--json", "--no-unknown"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["label"] in ("cat", "dog") and "unknown" not in json.loads(out)


def test_evaluate_reports_kept_known_images_and_the_unknown_sets(run: Path, tiny_pets: Path, ants: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "eval.html"
    code, out, _ = run_main(["evaluate", str(run), str(tiny_pets), "--unknown", str(ants), "--json",
                             "--report", str(report)], monkeypatch, capsys)
    u = json.loads(out)["unknown"]
    assert code == 0 and u["threshold"] == read_meta(run)["unknown"]["threshold"]
    assert u["known"]["n"] == 40 and 0 <= u["known"]["kept"] <= 1
    ant = u["unknown"][str(ants)]
    assert ant["n"] == len(list(ants.glob("*.jpg"))) and 0 <= ant["auroc"] <= 1 and 0 <= ant["accepted"] <= 1
    assert "Images of none of the classes" in report.read_text()
    code, out, _ = run_main(["evaluate", str(run), str(tiny_pets), "--unknown", str(ants)], monkeypatch, capsys)
    assert code == 0 and "ROC-AUC" in out and "accepted as a class" in out
    code, _, err = run_main(["evaluate", str(run), str(tiny_pets), "--unknown", str(ants), "--no-unknown"],
                            monkeypatch, capsys)
    assert code == 2 and "no unknown-image score" in err


def test_calibrate_unknown_gives_a_model_its_score_at_the_asked_keep_rate(
        run: Path, tiny_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta = read_meta(old)
    del meta["unknown"]
    write_meta(old, meta)
    code, out, _ = run_main(["calibrate-unknown", str(old), str(tiny_pets), "--keep", "0.9", "-q"], monkeypatch, capsys)
    entry = read_meta(old)["unknown"]
    assert code == 0 and entry["keep"] == 0.9 and entry["kept"] >= 0.9 and "keeps" in out
    assert fovea.load(old, "cpu").answers_unknown
    with pytest.raises(FoveaError, match="--unknown-keep"):
        fovea.training.calibrate_unknown(old, tiny_pets, keep=1.5)


def test_compressed_artifacts_answer_unknown_too(run: Path, tmp_path: Path) -> None:
    from fovea.compress import compress

    result = compress(run, methods=["int8-sym", "onnx"], out=tmp_path / "c", seconds=0.05, rounds=1,
                      gradcam_images=0, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    int8, onnx = read_meta(tmp_path / "c" / "int8-sym")["unknown"], read_meta(tmp_path / "c" / "onnx")["unknown"]
    source = read_meta(run)["unknown"]
    assert int8["score"] == source["score"] and (tmp_path / "c" / "int8-sym" / UNKNOWN_FILE).is_file()
    assert fovea.load(tmp_path / "c" / "onnx", "cpu").answers_unknown
    from fovea.runtime.unknown import SCORES

    if SCORES[source["score"]].uses_embedding:  # ONNX Runtime exposes no embedding: a logits-only score, said so
        assert onnx["score"] == "energy" and "only logits" in onnx["note"] and "unknown" in rows["onnx"]["details"]


def test_an_ensemble_of_models_with_scores_answers_unknown(run: Path, tiny_pets: Path, tmp_path: Path) -> None:
    from fovea.ensemble import make_ensemble

    second = tmp_path / "second"
    shutil.copytree(run, second)
    out = make_ensemble([run, second], tmp_path / "ens", data=tiny_pets, progress=False)
    entry = read_meta(out)["unknown"]
    assert entry["score"] == "ensemble" and len(entry["members"]) == 2 and entry["kept"] >= 0.95
    model = fovea.load(out, "cpu")
    preds, _ = model.predict(sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:3])
    assert model.answers_unknown and all(p.unknown_score is not None for p in preds)


def test_whole_set_passes_run_in_blocks_with_the_same_answers(run: Path, tiny_pets: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation and fitting the score pass over a set in blocks (the image and its mirror concatenated per block,
    so a disk-backed set of any size is never held twice over): block by block gives what one pass gives."""
    import fovea.runtime._predictor as predictor_mod
    from fovea.data import Sample, load_images

    model = fovea.load(run, "cpu")
    files = sorted((tiny_pets / "val").rglob("*.jpg"))
    images = load_images([Sample(str(f), 0) for f in files], model.image_size, cache=False, progress=False).images
    whole, inputs, logits = model.outputs(images, embed=True), model.score_inputs(images), model.logits(images)
    monkeypatch.setattr(predictor_mod, "BLOCK_BYTES", images[0].numel() * 7)  # blocks of 7 images
    assert len(predictor_mod.blocks(images)) == 6
    parts = model.outputs(images, embed=True)
    assert whole.unknown_scores is not None and parts.unknown_scores is not None and whole.embeddings is not None
    assert np.allclose(parts.probabilities, whole.probabilities, atol=1e-6)
    assert np.allclose(parts.unknown_scores, whole.unknown_scores, atol=1e-3)  # bf16 kernels vary with the batch
    assert np.allclose(parts.embeddings, whole.embeddings, atol=1e-5)  # type: ignore[arg-type]
    again = model.score_inputs(images)
    assert all(np.allclose(again[k], v, atol=1e-5) for k, v in inputs.items() if v is not None)
    assert np.allclose(model.logits(images).numpy(), logits.numpy(), atol=1e-5)


def test_calibrate_unknown_from_the_disk_store_gives_what_memory_gives(
        run: Path, tiny_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--cache disk decodes both splits into their cache files and fits and calibrates the score a block at a time:
    the same entry and the same fitted score as from the splits decoded into memory."""
    import fovea.runtime._predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "BLOCK_BYTES", 3 * 32 * 32 * 16)  # blocks of 16 images: several per split
    disk, memory = tmp_path / "disk", tmp_path / "memory"
    shutil.copytree(run, disk)
    shutil.copytree(run, memory)
    code, _, _ = run_main(["calibrate-unknown", str(disk), str(tiny_pets), "--cache", "disk", "-q"], monkeypatch, capsys)
    assert code == 0 and list((Path(os.environ["FOVEA_HOME"]) / "cache").glob("*.npy"))
    fovea.training.calibrate_unknown(memory, tiny_pets, cache="none", progress=False,
                                     score=read_meta(run)["unknown"]["score"])  # the CLI keeps the run's score
    assert read_meta(disk)["unknown"] == read_meta(memory)["unknown"]
    from safetensors.torch import load_file

    fitted, again = load_file(disk / UNKNOWN_FILE), load_file(memory / UNKNOWN_FILE)  # the header's order may differ
    assert fitted.keys() == again.keys() and all(torch.equal(fitted[k], again[k]) for k in fitted)
