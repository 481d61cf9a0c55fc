"""Defaults follow the data size and the hardware, and say why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea.errors import FoveaError
from fovea.training._config import GPU_CNN_WIDTHS, TrainConfig, resolve
from fovea.training._loop import logit_norm


def _resolve(device: str, n_train: int, model: str = "cnn", **kw: object) -> tuple[TrainConfig, dict[str, str]]:
    source = "fovea" if model in ("cnn", "mlp") else "timm"
    return resolve(TrainConfig(data="d", model=model, **kw), device_type=device, n_train=n_train,  # type: ignore[arg-type]
                   source=source, native_size=64 if source == "fovea" else 224, cpu_bf16=False)


def test_cpu_cnn_defaults_are_the_measured_laptop_recipe() -> None:
    c, why = _resolve("cpu", 2000)
    assert (c.image_size, c.epochs, c.batch_size, c.optimizer) == (64, 60, 128, "sgd")
    assert c.lr is not None and abs(c.lr - 0.1) < 1e-12
    assert "widths" not in c.extra and c.amp is False
    assert set(why) >= {"image_size", "epochs", "batch_size", "lr"}


def test_gpu_cnn_defaults_are_the_measured_gpu_recipe() -> None:
    c, why = _resolve("cuda", 2000)
    assert (c.image_size, c.epochs, c.batch_size) == (160, 200, 256)
    assert c.extra["widths"] == GPU_CNN_WIDTHS and "widths" in why
    assert c.amp and c.channels_last


def test_user_choices_win_over_defaults() -> None:
    c, _ = _resolve("cuda", 2000, image_size=96, epochs=5, extra={"widths": (8, 16)})
    assert (c.image_size, c.epochs, c.extra["widths"]) == (96, 5, (8, 16))


def test_epochs_shrink_with_more_data_within_bounds() -> None:
    assert _resolve("cpu", 200)[0].epochs == 80
    assert _resolve("cpu", 100_000)[0].epochs == 10
    assert _resolve("cuda", 100_000)[0].epochs == 20
    assert _resolve("cpu", 2000, model="resnet18")[0].image_size == 160


def test_logit_norm_loss_ignores_the_logits_scale_and_a_bad_tau_fails() -> None:
    z, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    loss = F.cross_entropy(logit_norm(z, 0.04), y)
    # LogitNorm: growing the logits (what plain cross-entropy rewards) no longer lowers the loss
    assert torch.allclose(F.cross_entropy(logit_norm(7.5 * z, 0.04), y), loss)
    assert F.cross_entropy(7.5 * z, y) != F.cross_entropy(z, y)
    assert torch.allclose(logit_norm(z, 0.04).norm(dim=1), torch.full((16,), 25.0))  # norm 1 / tau
    assert torch.equal(logit_norm(z, 0.0), z)  # 0: off, plain cross-entropy
    TrainConfig(data="d", logit_norm=0.04).validate()
    with pytest.raises(FoveaError, match="--logit-norm .* >= 0, got -0.04"):
        TrainConfig(data="d", logit_norm=-0.04).validate()
