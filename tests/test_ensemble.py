"""Ensembles of trained runs: the artifact, its probabilities, the CLI, and what it refuses."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fovea
from fovea.cli import app, main
from fovea.ensemble import make_ensemble
from fovea.errors import FoveaError
from fovea.runtime import Ensemble, TorchModel


def _train(data: Path, out: Path, seed: int, size: int = 32, epochs: int = 2, tta: bool = True) -> Path:
    return fovea.train(data, model="cnn", epochs=epochs, image_size=size, out=str(out), progress=False, seed=seed,
                       tta=tta)


@pytest.fixture(scope="module")
def runs(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real runs: two seeds at 32 px (one without mirror TTA) and one at 40 px, so two members see
    resized images."""
    root = tmp_path_factory.mktemp("ens_runs")
    with pytest.MonkeyPatch.context() as mp:  # the per-test FOVEA_HOME does not exist yet at module scope
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("ens_home")))
        return [_train(tiny_pets, root / "a", 0), _train(tiny_pets, root / "b", 1, tta=False),
                _train(tiny_pets, root / "c", 2, 40)]


@pytest.fixture(scope="module")
def ens(runs: list[Path], tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`fovea ensemble` on copies of the runs with --data, then the copies deleted: OUT must carry its members."""
    tmp = tmp_path_factory.mktemp("ens")
    copies = [shutil.copytree(r, tmp / "runs" / r.name) for r in runs]
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("ens_home2")))
        done = CliRunner().invoke(app, ["ensemble", *map(str, copies), "--out", str(out), "--data", str(tiny_pets), "-q"])
    assert done.exit_code == 0, done.output
    shutil.rmtree(tmp / "runs")
    return out, done.output


def _val_images(tiny_pets: Path) -> list[Path]:
    return [p for c in ("cat", "dog") for p in sorted((tiny_pets / "val" / c).glob("*.jpg"))[:6]]


def _fovea(*args: str) -> int:
    """Run the command as ``fovea`` does (main(): FoveaError -> exit 2), in process: no interpreter start-up."""
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as done:
        mp.setattr(sys, "argv", ["fovea", *args])
        main()
    return done.value.code if isinstance(done.value.code, int) else 1


def test_the_folder_is_a_self_describing_model(ens: tuple[Path, str], runs: list[Path]) -> None:
    out, _ = ens
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "fovea.model"
    assert meta["ensemble"]["members"] == ["members/00", "members/01", "members/02"]
    assert meta["ensemble"]["combine"] == "mean of probabilities"
    assert meta["classes"] == ["cat", "dog"]
    assert meta["preprocessing"]["image_size"] == 40  # the largest member's
    assert not (out / "model.safetensors").exists()
    for rel in meta["ensemble"]["members"]:
        assert (out / rel / "model.safetensors").is_file() and (out / rel / "model.json").is_file()
    m = meta["metrics"]
    assert m["n_images"] == 40 and m["split"] == "val"
    assert [Path(r["run"]).name for r in m["members"]] == [r.name for r in runs]
    for row in [m, *m["members"]]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["balanced_accuracy"] <= 1 and 0 <= row["roc_auc"] <= 1
    # Each member's row is that member evaluated alone.
    alone = fovea.evaluate(runs[2], m["data"], progress=False)
    assert m["members"][2]["accuracy"] == pytest.approx(alone["accuracy"])


def test_probabilities_are_the_mean_of_the_members(ens: tuple[Path, str], runs: list[Path], tiny_pets: Path) -> None:
    model = fovea.load(ens[0], "cpu")
    assert isinstance(model, Ensemble)
    assert model.classes == ["cat", "dog"] and model.image_size == 40
    files = _val_images(tiny_pets)
    x, kept, bad = model.load_images(files)
    assert x.shape == (12, 3, 40, 40) and x.dtype == torch.uint8 and kept == list(range(12)) and bad == []
    probs = model.predict_proba(x)

    members = [TorchModel(r, "cpu") for r in runs]  # the original runs, loaded on their own
    small = F.interpolate(x.float(), size=(32, 32), mode="bilinear", antialias=True).round().to(torch.uint8)
    each = np.stack([members[0].predict_proba(small), members[1].predict_proba(small), members[2].predict_proba(x)])
    # Two epochs on 80 images leave the members near 0.5, but they disagree by ~3e-3: 300x the tolerance.
    assert np.ptp(each, axis=0).max() > 1e-3
    np.testing.assert_allclose(probs, each.mean(0), atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(model.logits(x).softmax(1).numpy(), probs, atol=1e-5)

    preds, skipped = model.predict(files)
    assert skipped == [] and [p.path for p in preds] == [str(f) for f in files]
    for p, row in zip(preds, probs):
        top = p.class_otherwise if p.unknown else p.label  # "unknown" when the ensemble's score is over its threshold
        assert top == model.classes[int(row.argmax())] and p.probability == pytest.approx(row.max(), abs=1e-6)


def test_members_of_one_size_are_averaged_exactly(runs: list[Path], tiny_pets: Path, tmp_path: Path) -> None:
    out = make_ensemble(runs[:2], tmp_path / "two", progress=False)
    model = fovea.load(out, "cpu")
    assert model.image_size == 32 and "metrics" not in model.meta
    x, _, _ = model.load_images(_val_images(tiny_pets))
    expected = np.mean([TorchModel(r, "cpu").predict_proba(x) for r in runs[:2]], axis=0)
    np.testing.assert_allclose(model.predict_proba(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="40"):
        fovea.load(make_ensemble([runs[0], runs[2]], tmp_path / "mixed", progress=False), "cpu").predict_proba(x)


def test_cli_prints_the_table(ens: tuple[Path, str], runs: list[Path]) -> None:
    out, printed = ens
    for word in ("accuracy", "balanced", "ROC-AUC", "ensemble", *(r.name for r in runs), str(out)):
        assert word in printed


def test_cli_predict_and_evaluate_without_the_original_runs(ens: tuple[Path, str], tiny_pets: Path) -> None:
    out, _ = ens  # built from copies that are deleted now
    cli = CliRunner()
    files = [str(f) for f in _val_images(tiny_pets)[::6]]
    done = cli.invoke(app, ["predict", str(out), *files, "--json", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in done.output.splitlines() if line.startswith("{")]
    assert [d["path"] for d in lines] == files
    assert all(d["label"] in ("cat", "dog", "unknown") and sum(d["probabilities"].values()) == pytest.approx(1) for d in lines)

    done = cli.invoke(app, ["evaluate", str(out), str(tiny_pets), "--json", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    m = json.loads(done.output[done.output.index("{"):])
    assert m["n_images"] == 40 and m["classes"] == ["cat", "dog"]
    saved = json.loads((out / "model.json").read_text())["metrics"]
    assert m["accuracy"] == pytest.approx(saved["accuracy"]) and m["roc_auc"] == pytest.approx(saved["roc_auc"])


@pytest.fixture(scope="module")
def other_classes(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run on a few of the same photos filed as kitten/puppy: same images, other classes."""
    data = tmp_path_factory.mktemp("renamed")
    for split, n in (("train", 4), ("val", 2)):
        for src, dst in (("cat", "kitten"), ("dog", "puppy")):
            (data / split / dst).mkdir(parents=True)
            for p in sorted((tiny_pets / split / src).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / dst / p.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("renamed_home")))
        return _train(data, tmp_path_factory.mktemp("renamed_run") / "run", 0, size=16, epochs=1)


def test_refuses_members_with_other_classes(runs: list[Path], other_classes: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = _fovea("ensemble", str(runs[0]), str(other_classes), "--out", str(tmp_path / "out"), "-q")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "different classes" in err
    assert "cat, dog" in err and "kitten, puppy" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_refuses_a_folder_that_is_not_a_model(runs: list[Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("not a model")
    code = _fovea("ensemble", str(runs[0]), str(photos), "--out", str(tmp_path / "out"), "-q")
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "is not a Fovea model" in err and "photos" in err
    assert "Traceback" not in err


def test_refuses_a_single_member(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _fovea("ensemble", str(runs[0]), "--out", str(tmp_path / "out"), "-q")
    err = capsys.readouterr().err
    assert code == 2 and "at least 2 models" in err


def test_refuses_nesting_repeats_and_overwriting(runs: list[Path], ens: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = ens
    with pytest.raises(FoveaError, match="itself an ensemble"):
        make_ensemble([runs[0], out], tmp_path / "nested", progress=False)
    with pytest.raises(FoveaError, match="more than once"):
        make_ensemble([runs[0], runs[0]], tmp_path / "twice", progress=False)
    with pytest.raises(FoveaError, match="already holds a model"):
        make_ensemble(runs[:2], out, progress=False)
    with pytest.raises(FoveaError, match="already holds a model"):
        make_ensemble(runs[:2], runs[0], progress=False)


def test_members_inside_out_are_referenced_not_copied(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    inside = [shutil.copytree(r, out / f"seed-{i}") for i, r in enumerate(runs[:2])]
    make_ensemble(inside, out, progress=False)
    meta = json.loads((out / "model.json").read_text())
    assert meta["ensemble"]["members"] == ["seed-0", "seed-1"] and not (out / "members").exists()
    assert isinstance(fovea.load(out, "cpu"), Ensemble)


def test_a_member_path_outside_the_folder_is_refused(ens: tuple[Path, str], tmp_path: Path) -> None:
    bad = shutil.copytree(ens[0], tmp_path / "bad")
    meta = json.loads((bad / "model.json").read_text())
    meta["ensemble"]["members"][0] = "../../elsewhere"
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FoveaError, match="outside the ensemble folder"):
        fovea.load(bad, "cpu")
