"""fovea lr-find: the range test's numbers on hand-made curves, then real runs on real photos and the CLI."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fovea
from fovea.cli import app, main
from fovea.errors import FoveaError
from fovea.training import lr_find
from fovea.training._lr_find import RULE, LRFind, exp_lrs, range_test, smooth, suggest

# 32 px and batches of 16: 80 training photos make 5 batches, so 100 steps cycle the data 20 times.
TINY: dict[str, Any] = {"image_size": 32, "batch_size": 16, "progress": False}


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------ the numbers


def test_lrs_grow_geometrically_from_start_to_end() -> None:
    lrs = exp_lrs(1e-7, 10, 100)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, 10 ** (8 / 99))  # 8 decades in 99 equal steps
    with pytest.raises(ValueError):
        exp_lrs(1.0, 0.1, 10)


def test_smoothing_is_a_bias_corrected_moving_average() -> None:
    # beta 0.5 by hand: avg 0.5 -> s 0.5 / 0.5 = 1; avg 0.25 + 1 = 1.25 -> s 1.25 / 0.75 = 5/3.
    assert smooth([1.0, 2.0], beta=0.5) == pytest.approx([1.0, 5 / 3])
    assert smooth([0.7] * 50, beta=0.98) == pytest.approx([0.7] * 50)  # no warm-up bias towards 0


def test_suggestion_is_the_steepest_decade_before_the_minimum() -> None:
    lrs = exp_lrs(1e-6, 1.0, 61)  # 10 points per decade
    x = np.log10(lrs)
    # Flat at 1, falls steepest at 1e-3, bottoms out near 1e-2, then climbs; the blow-up is NaN.
    loss = 1 - 0.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -2, (x + 2) ** 2, 0.0)
    loss[-3:] = np.nan
    loss[15:18] -= 0.2  # a wobble on the plateau, steeper than the real descent: not within 2 decades of the minimum
    suggestion, rule, min_lr, steepest = suggest(lrs, loss)
    assert min_lr == pytest.approx(1e-2, rel=0.3)
    assert suggestion == steepest and rule == RULE
    assert steepest == pytest.approx(1e-3, rel=0.3)
    assert suggestion <= min_lr / 3  # the steepest decade ends at or before the minimum


def test_a_minimum_too_early_for_a_slope_falls_back_to_a_tenth_of_it() -> None:
    lrs = exp_lrs(1e-3, 10, 41)  # 10 points per decade; the minimum 4 points after the 10 skipped ones
    loss = np.abs(np.arange(41) - 14.0) * 0.1 + 1
    suggestion, rule, min_lr, _ = suggest(lrs, loss)
    assert min_lr == pytest.approx(lrs[14]) and suggestion == pytest.approx(min_lr / 10) and "/ 10" in rule


def test_a_lucky_first_batch_is_not_the_minimum() -> None:
    lrs = exp_lrs(1e-7, 10, 100)
    loss = smooth([0.60] + [0.70] * 60 + [0.65] * 20 + [5.0] * 19)  # bias-corrected: point 0 is 0.60 itself
    _, _, min_lr, _ = suggest(lrs, loss)
    assert 1e-3 < min_lr < 10


def test_a_curve_that_blows_up_at_once_is_an_error() -> None:
    with pytest.raises(FoveaError, match="diverged at once"):
        suggest(exp_lrs(1e-7, 10, 10), np.array([0.7, math.nan] + [math.nan] * 8))


def test_range_test_stops_at_four_times_the_minimum_or_nan_and_cycles_the_data() -> None:
    batch = (torch.zeros(1), torch.zeros(1))
    lrs = exp_lrs(1e-3, 1e3, 7)  # 1e-3, 1e-2, ... 1e3

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        return {1e-3: 1.0, 1e-2: 0.5, 1e-1: 0.25}.get(round(lr, 6), 50.0)

    # beta 0: no smoothing, so the rule is visible: 0.25 is the minimum and 50 > 4 x 0.25 stops it.
    got_lrs, losses, smoothed, diverged = range_test(step, [batch], lrs, beta=0.0)
    assert losses == [1.0, 0.5, 0.25, 50.0] and smoothed == losses
    assert diverged == pytest.approx(1.0)
    got_lrs, losses, _, diverged = range_test(lambda x, y, lr: math.nan if lr > 5 else 1.0, [batch], lrs)
    assert len(losses) == 5 and math.isnan(losses[-1]) and diverged == pytest.approx(10)
    got_lrs, _, _, diverged = range_test(lambda x, y, lr: 1.0, [batch], lrs)  # one batch, seven steps
    assert diverged is None and got_lrs == pytest.approx(list(lrs))


# ---------------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def cnn_curve(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> LRFind:
    """The range test of the default model (cnn, SGD + Nesterov) on real cats and dogs."""
    return lr_find(tiny_pets, out=tmp_path_factory.mktemp("lrf") / "cnn", **TINY)


def test_the_loss_falls_then_rises_and_the_suggestion_sits_well_before_the_rise(cnn_curve: LRFind) -> None:
    r = cnn_curve
    s = np.array(r.smoothed)
    i_min = int(np.nanargmin(s))
    assert 0 < i_min < len(s) - 1
    assert s[i_min] < s[0] - 0.01, "the smoothed loss never fell"
    assert np.nanmax(s[i_min:]) > s[i_min] + 0.05, "the smoothed loss never rose again"
    lrs = np.array(r.lrs)
    assert lrs[0] < r.suggestion < lrs[-1] and r.min_loss_lr == pytest.approx(lrs[i_min])
    # "well below where the loss diverged": past the minimum, where the loss is back above its start.
    rise = lrs[i_min:][s[i_min:] > s[0]]
    assert len(rise) and r.suggestion <= rise[0] / 10
    assert r.rule == RULE and r.suggestion == r.steepest_lr


def test_csv_and_png_are_written(cnn_curve: LRFind) -> None:
    rows = read_csv(cnn_curve.out / "lr_find.csv")
    assert list(rows[0]) == ["lr", "loss", "smoothed"] and len(rows) == len(cnn_curve.lrs)
    lrs = [row["lr"] for row in rows]
    assert all(a < b for a, b in zip(lrs, lrs[1:])), "learning rates must increase monotonically"
    png = (cnn_curve.out / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_command_reproduces_the_setup(cnn_curve: LRFind, tiny_pets: Path) -> None:
    cmd = cnn_curve.command()
    assert cmd.startswith(f"fovea train {tiny_pets} --model cnn --optimizer sgd --batch-size 16 --image-size 32")
    assert cmd.endswith(f"--lr {cnn_curve.suggestion:.3g}")


def test_a_set_over_the_memory_budget_is_read_from_disk_in_batches(tiny_pets: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """As fovea train: past the memory budget the training split is decoded into its cache file and read from it
    in batches (DiskBatches), for every step of the test."""
    import fovea.data._disk as disk_mod

    epochs: list[int] = []
    produce = disk_mod.DiskBatches.__iter__

    def spy(self: disk_mod.DiskBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epochs.append(len(self.labels))
        return produce(self)

    monkeypatch.setattr(disk_mod.DiskBatches, "__iter__", spy)
    monkeypatch.setenv("FOVEA_MEMORY_BUDGET", "100KB")  # 80 images at 32 px are 240 KB
    r = lr_find(tiny_pets, model="mlp", out=tmp_path / "disk", steps=12, **TINY)
    assert epochs and epochs[0] == 80 and len(r.lrs) == len(r.losses) and all(math.isfinite(x) for x in r.losses[:5])


def test_an_mlp_blows_up_and_the_test_stops_early(tiny_pets: Path, tmp_path: Path) -> None:
    r = lr_find(tiny_pets, model="mlp", out=tmp_path / "mlp", **TINY)
    assert r.diverged_lr is not None and len(r.lrs) < 100
    last = r.smoothed[-1]
    assert not math.isfinite(last) or last > 4 * min(r.smoothed[:-1])
    assert r.suggestion < r.diverged_lr / 10


def test_training_with_the_suggestion_beats_a_hundred_times_larger_lr(cnn_curve: LRFind, tiny_pets: Path,
                                                                      tmp_path: Path) -> None:
    """What a user would see: 3 epochs at the suggested LR end with a lower training loss than at 100x it."""
    final: dict[str, float] = {}
    for name, lr in (("suggested", cnn_curve.suggestion), ("100x", 100 * cnn_curve.suggestion)):
        run = fovea.train(tiny_pets, model="cnn", epochs=3, lr=min(lr, 9.99), out=str(tmp_path / name), **TINY)
        rows = read_csv(run / "history.csv")
        final[name] = rows[-1]["train_loss"]
        if name == "suggested":
            assert rows[-1]["train_loss"] < rows[0]["train_loss"], "the suggested LR did not train at all"
    assert final["suggested"] <= final["100x"], final


def test_weights_from_a_run_sweep_the_finetuning_lr(tiny_pets: Path, tmp_path: Path) -> None:
    backbone = fovea.train(tiny_pets, model="cnn", epochs=2, out=str(tmp_path / "backbone"), **TINY)
    r = lr_find(tiny_pets, weights=str(backbone), out=tmp_path / "lrf", **TINY)
    assert r.config.model == "cnn" and r.config.optimizer == "adamw"  # train's choice for trained weights
    assert r.lrs[0] < r.suggestion < r.lrs[-1] and r.suggestion < r.min_loss_lr
    assert f"--weights {backbone} --mode finetune --optimizer adamw" in r.command()
    assert "--model" not in r.command()  # the run folder brings its architecture along


# --------------------------------------------------------------------------------------------- CLI


def test_cli_prints_the_suggestion_and_the_command(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "lrf"
    result = CliRunner().invoke(app, ["lr-find", str(tiny_pets), "--model", "mlp", "--image-size", "32",
                                      "--batch-size", "16", "--preprocess", "gray", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "suggested --lr" in result.stdout and "steepest descent" in result.stdout
    assert f"fovea train {tiny_pets} --model mlp" in result.stdout and " --lr " in result.stdout
    assert "--preprocess gray" in result.stdout  # the curve was measured on the images train will see
    assert (out / "lr_find.png").is_file() and (out / "lr_find.csv").is_file()


def test_cli_bad_model_is_a_clear_error_with_status_2(tiny_pets: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["fovea", "lr-find", str(tiny_pets), "--model", "resnet1", "--out",
                                      str(tmp_path / "lrf")])
    with pytest.raises(SystemExit) as exit_:
        main()  # the installed `fovea` entry point: FoveaError -> one `error:` line, status 2
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown model 'resnet1'" in err and "Did you mean" in err and "Traceback" not in err
    assert not (tmp_path / "lrf").exists()
