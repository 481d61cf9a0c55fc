"""``fovea compare`` on real photos: one row per model, counts that match the models, files, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import fovea
from fovea.cli import app
from fovea.cli._render import compare_table as rich_table
from fovea.compare import COLUMNS, compare, count_flops, table
from fovea.errors import FoveaError

# Not resnet18: one epoch of 80 images at 32 px took 26 s on the shared 2-core CPU, half a minute too long.
MODELS = ["mlp", "cnn", "hog-svm", "lstm"]  # the course's comparison: fully connected, CNN, classical, recurrent
FAST = {"epochs": 1, "image_size": 32, "pretrained": False, "progress": False}


@pytest.fixture(scope="module")
def compared(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    with pytest.MonkeyPatch.context() as mp:  # the autouse FOVEA_HOME fixture is per test; this runs once
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("compare_home")))
        rows = compare(tiny_pets, MODELS, out=out, **FAST)
    return out, rows


def _mlp_layers(image_size: int) -> list[tuple[int, int, bool]]:
    """(in, out, bias) of the mlp's Linear layers with its defaults: hidden 512, 256 with batch norm, no bias."""
    return [(3 * image_size * image_size, 512, False), (512, 256, False), (256, 2, True)]


def test_a_row_per_model_with_the_loaded_models_parameters(compared: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = compared
    assert [r["model"] for r in rows] == MODELS
    for r in rows:
        assert r["error"] is None
        assert Path(r["run"]) == out / r["model"]
        net = fovea.load(r["run"], device="cpu").net
        assert r["parameters"] == sum(p.numel() for p in net.parameters())
        assert r["flops_per_image"] == count_flops(net, 32) > 0
        assert r["image_size"] == 32 and r["epochs"] == 1 and r["pretrained"] is False
        assert r["n_train"] == 80 and r["n_val"] == 40
        assert r["train_seconds"] > 0 and r["wall_seconds"] >= r["train_seconds"]
        for key in ("accuracy", "balanced_accuracy", "roc_auc"):
            assert 0.0 <= r[key] <= 1.0, key
    by = {r["model"]: r for r in rows}
    assert by["cnn"]["flops_per_image"] > by["mlp"]["flops_per_image"]  # 24 vs 3.4 MFLOPs: convolutions reuse weights
    assert by["cnn"]["parameters"] < by["mlp"]["parameters"]  # 0.66 M vs 1.71 M


def test_mlp_counts_match_its_layers(compared: tuple[Path, list[dict[str, Any]]]) -> None:
    mlp = next(r for r in compared[1] if r["model"] == "mlp")
    layers = _mlp_layers(32)
    weights = sum(i * o + (o if bias else 0) for i, o, bias in layers)
    batch_norms = 2 * (512 + 256)  # a scale and a shift per hidden unit
    assert mlp["parameters"] == weights + batch_norms == 1_705_986
    # One image: 2 FLOPs per multiply-add of each matrix product; the bias add and batch norm are not counted.
    assert mlp["flops_per_image"] == 2 * sum(i * o for i, o, _ in layers) == 3_408_896
    assert mlp["mflops_per_image"] == pytest.approx(3.408896)


def test_table_files_are_written(compared: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = compared
    with open(out / "compare.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [r["model"] for r in lines] == MODELS
    assert [int(r["parameters"]) for r in lines] == [r["parameters"] for r in rows]
    assert all(r["error"] == "" for r in lines)

    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["wall_seconds"] >= sum(r["wall_seconds"] for r in rows)
    assert "cores" in saved["machine"]

    md = (out / "compare.md").read_text()
    assert "| model | parameters | MFLOPs/image | px |" in md
    for r in rows:
        assert f"| {r['model']} | {r['parameters']:,} |" in md
    assert "multiply-add" in md and "Whole comparison" in md and "handcrafted features" in md
    from PIL import Image

    assert Image.open(out / "compare.png").size[0] > 400  # accuracy against training time


def test_classical_and_recurrent_rows(compared: tuple[Path, list[dict[str, Any]]]) -> None:
    by = {r["model"]: r for r in compared[1]}
    hog, lstm = by["hog-svm"], by["lstm"]
    assert hog["error"] is None and lstm["error"] is None
    dim = 324  # HOG at 32 px: 3 x 3 blocks of 2 x 2 cells x 9 orientations
    assert hog["parameters"] == 2 * dim + 2 * dim + 2  # mean, spread, the linear head
    assert hog["flops_per_image"] > 2 * dim * 2  # the head's product plus the features' estimate
    assert lstm["parameters"] == 4 * (128 * (128 + 96) + 128) + 4 * 128 + 128 * 2 + 2


def test_the_terminal_table_turns_when_it_does_not_fit(compared: tuple[Path, list[dict[str, Any]]]) -> None:
    rows = compared[1]
    wide = rich_table(rows, title="t", width=200)
    assert [c.header for c in wide.columns] == [h for h, _, _ in COLUMNS] and wide.row_count == len(rows)
    tall = rich_table(rows, title="t", width=80)  # 11 columns need ~110 characters: a column per model
    assert [c.header for c in tall.columns] == ["model", *MODELS] and tall.row_count == len(COLUMNS) - 1


def test_unknown_model_fails_before_any_training(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(FoveaError, match=r"unknown model 'resnet_18'.*resnet18"):
        compare(tiny_pets, ["mlp", "resnet_18"], out=out, **FAST)
    assert not out.exists()  # not even the mlp, which comes first, was trained


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epochs": 0}, "--epochs must be positive"),
    ({"weights": "x.safetensors"}, "cannot pass weights"),
])
def test_bad_options_fail_before_any_training(tiny_pets: Path, tmp_path: Path, kwargs: dict[str, Any],
                                              match: str) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(FoveaError, match=match):
        compare(tiny_pets, ["mlp"], out=out, progress=False, **kwargs)
    assert not out.exists()


def test_a_failed_model_is_recorded_and_the_others_go_on(tiny_pets: Path, tmp_path: Path) -> None:
    # torchvision's alexnet has no hub weights wired in: a FoveaError once training starts. Fovea's own mlp
    # ignores --pretrained (it has no hub weights) and trains.
    rows = compare(tiny_pets, ["alexnet", "mlp"], out=tmp_path / "cmp", **{**FAST, "pretrained": True})
    assert [r["model"] for r in rows] == ["alexnet", "mlp"]
    assert "pretrained weights" in rows[0]["error"] and "accuracy" not in rows[0]
    assert rows[1]["error"] is None and rows[1]["pretrained"] is False and 0 <= rows[1]["accuracy"] <= 1
    _, cells = table(rows)
    assert cells[0] == ["alexnet", "failed"] + ["-"] * (len(cells[0]) - 2)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "- `alexnet`: pretrained weights" in md


def test_cli_prints_the_table(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(tiny_pets), "--models", "mlp,cnn", "--epochs", "1",
                                      "--image-size", "32", "--preprocess", "gray", "--out", str(out), "-q"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "parameters" in line)
    for name in ("model", "MFLOPs/image", "val acc", "balanced acc", "ROC-AUC", "train s", "wall s"):
        assert name in header
    rows = [line for line in result.output.splitlines() if line.strip("│ ").startswith(("mlp ", "cnn "))]
    assert len(rows) == 2
    assert "whole command" in result.output and str(out / "compare.md") in result.output
    for name in ("mlp", "cnn"):
        assert (out / name / "model.safetensors").is_file()
        steps = json.loads((out / name / "model.json").read_text())["preprocessing"]["steps"]
        assert [s["op"] for s in steps] == ["gray"]  # --preprocess reached every model


def test_cli_exits_non_zero_only_when_every_model_fails(tiny_pets: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(tiny_pets), "--models", "alexnet", "--pretrained",
                                      "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "c"), "-q"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "alexnet failed" in result.output
