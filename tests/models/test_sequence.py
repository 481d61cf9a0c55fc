"""Recurrent models over image rows (rnn, lstm, gru): the course's parameter formulas, FLOPs, and gradient clipping
making the difference between a run that blows up and one that learns."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fovea
from fovea.models import create_model, summarize
from fovea.models._sequence import GATES


def digits_folder(root: Path, classes: tuple[int, ...] = (0, 1), size: int = 16) -> Path:
    """scikit-learn's real handwritten digits (8 x 8, 16 levels) written as PNGs in ROOT/train|val/DIGIT/, a
    quarter of each class in val."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for c in classes:
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            out = root / ("val" if j % 4 == 0 else "train") / str(c)
            out.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8))
            img.resize((size, size), Image.NEAREST).save(out / f"{c}_{i}.png")
    return root


@pytest.mark.parametrize("cell", sorted(GATES))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_course_formula_plus_pytorchs_second_bias_is_the_count(cell: str, bidirectional: bool, layers: int) -> None:
    net = create_model(cell, 3, image_size=16, hidden=24, layers=layers, bidirectional=bidirectional)
    g, h, dirs, d = GATES[cell], 24, 2 if bidirectional else 1, 3 * 16
    expected = 0
    for layer in range(layers):
        d_in = d if layer == 0 else dirs * h
        expected += dirs * (g * (h * (h + d_in) + h) + g * h)  # the course's count, then b_hh
    expected += dirs * h * 3 + 3  # the classifier
    assert sum(p.numel() for p in net.parameters()) == expected
    lines = net.parameter_formulas()
    assert len(lines) == layers + 1 and f"total {expected:,}" in lines[-1]
    assert all("counted:" in line for line in lines[:-1])
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_summary_shows_the_formulas_and_counts_the_lstms_flops() -> None:
    s = summarize("lstm")  # 32 px: 32 steps of 96 inputs, 128 hidden
    assert s.parameters == 4 * (128 * (128 + 96) + 128) + 4 * 128 + 128 * 2 + 2
    assert any("4 x (h(h + d) + h)" in line for line in s.formulas)
    # oneDNN's fused LSTM layer counts 0 in torch's counter; ours: 2 x steps x (4h x d + 4h x h), + the head
    assert s.flops == 2 * 32 * (4 * 128 * 96 + 4 * 128 * 128) + 2 * 128 * 2


def test_bidirectional_reads_both_ends() -> None:
    torch.manual_seed(0)
    net = create_model("gru", 2, image_size=8, hidden=4, bidirectional=True).eval()
    x = torch.rand(1, 3, 8, 8)
    y = x.clone()
    y[:, :, 0] = 0  # only the first row differs: a forward reader forgets it, the backward one reads it last
    with torch.no_grad():
        fa, fb = net.forward_features(x), net.forward_features(y)
    assert fa.shape == (1, 8) and not torch.allclose(fa[:, 4:], fb[:, 4:])


def _history(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader((run / "history.csv").open())]


@pytest.fixture(scope="module")
def digits01(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits01"))


def test_gradient_clipping_is_what_lets_a_high_learning_rate_rnn_train(digits01: Path, tmp_path: Path) -> None:
    """A vanilla RNN with SGD at lr 0.3 (momentum 0.9) on 0-vs-1 digits: without --clip-grad its weights are
    thrown out of their basin (loss ~10, chance accuracy); with --clip-grad 1 the same run learns. Measured on the
    2-core CPU: final loss 7.3 vs 0.76, val accuracy 0.65 vs 0.98."""
    kw = dict(model="rnn", image_size=16, epochs=4, batch_size=16, lr=0.3, optimizer="sgd", schedule="constant",
              label_smoothing=0.0, tta=False, unknown_keep=0.0, progress=False, seed=0)
    wild = _history(fovea.train(digits01, out=str(tmp_path / "wild"), **kw))
    tame = _history(fovea.train(digits01, out=str(tmp_path / "tame"), clip_grad=1.0, **kw))
    blew_up = any(not math.isfinite(r["train_loss"]) or r["train_loss"] > 3 for r in wild)
    assert blew_up and wild[-1]["val_acc"] < 0.8
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] < 1.5 for r in tame)
    assert tame[-1]["val_acc"] > 0.9
    # the norm before clipping is recorded either way: the unclipped run's gradients were larger
    assert max(r["grad_norm_max"] for r in wild) > max(r["grad_norm_max"] for r in tame)
    assert all(r["grad_norm"] > 0 for r in tame)


def test_lstm_trains_with_its_own_optimizer_and_reports_gradient_norms(digits01: Path, tmp_path: Path) -> None:
    import json

    run = fovea.train(digits01, model="lstm", image_size=16, epochs=3, out=str(tmp_path / "lstm"), progress=False,
                      unknown_keep=0.0, extra={"hidden": 32, "bidirectional": True})
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["optimizer"] == "adamw"  # the recurrent models' own default, not the convnets' SGD
    assert json.loads((run / "metrics.json").read_text())["accuracy"] > 0.9
    assert "Gradient norm" in (run / "report.html").read_text()
    assert all(r["grad_norm"] > 0 for r in _history(run))


@pytest.mark.parametrize("arch", [{"hidden": 0}, {"cell": "transformer"}])
def test_a_bad_recurrent_option_is_the_users_error_not_a_bug(arch: dict[str, object]) -> None:
    from fovea.errors import FoveaError
    from fovea.models import create_model

    with pytest.raises(FoveaError, match="lstm does not take"):
        create_model("lstm", 2, image_size=16, **arch)
