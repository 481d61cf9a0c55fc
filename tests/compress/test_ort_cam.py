"""Grad-CAM of ONNX models by finite differences, against PyTorch's Grad-CAM of the same network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fovea.compress import _ort_cam
from fovea.compress._onnx import export_onnx, quantize_ort
from fovea.compress._ort_cam import layer_aliases, onnx_gradcam
from fovea.errors import FoveaError
from fovea.explain._cam import _net_maps, resolve_layer
from fovea.explain._sanity import rank_correlation
from fovea.models import create_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass
class Exported:
    net: nn.Module
    fp32: Path
    int8: Path
    images: torch.Tensor  # uint8 (6, 3, 32, 32)
    targets: list[int]  # the net's predictions


def patches(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise with one bright 8 x 8 patch: in the left half for class 0, the right half for class 1."""
    images = torch.randint(0, 128, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    for i, (y, x) in enumerate(torch.randint(0, 24, (n, 2), generator=generator).tolist()):
        x = x // 3 + 16 * int(labels[i])  # 0..7 left, 16..23 right
        images[i, :, y : y + 8, x : x + 8] = 255
    return images, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A small cnn (4 x 4 last map at 32 px) given 20 SGD steps on patch images, exported to ONNX and int8."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = create_model("cnn", 2, image_size=32, widths=(8, 16, 32, 64), stem_stride=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(20):
        x, y = patches(32, g)
        loss = F.cross_entropy(net((x.float() / 255 - 0.5) / 0.25), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    work = tmp_path_factory.mktemp("ort_cam")
    fp32 = export_onnx(net, MEAN, STD, 32, work / "fp32.onnx")
    quantize_ort(fp32, work / "int8.onnx", patches(32, g)[0], "minmax", work=work)
    images, _ = patches(6, g)
    with torch.no_grad():
        targets = net((images.float() / 255 - 0.5) / 0.25).argmax(1).tolist()
    return Exported(net, fp32, work / "int8.onnx", images, targets)


def median_rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.median([rank_correlation(x, y) for x, y in zip(a, b)]))


def torch_maps(setup: Exported, layer: str) -> np.ndarray:
    _, module = resolve_layer(setup.net, 32, layer)
    return _net_maps(setup.net, setup.images, setup.targets, method="gradcam", layer=module, mean=MEAN, std=STD,
                     batch_size=16)


@pytest.mark.parametrize("layer", ["stages", "stages.2.conv2"])  # the second has a residual around it
def test_fp32_onnx_matches_pytorch_gradcam(setup: Exported, layer: str) -> None:
    maps = onnx_gradcam(setup.fp32, layer, setup.images, setup.targets)
    assert maps.shape == (6, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert median_rho(maps, torch_maps(setup, layer)) > 0.95  # measured: 1.00


def test_int8_maps_follow_fp32(setup: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = torch_maps(setup, "stages")
    maps = onnx_gradcam(setup.int8, "stages", setup.images, setup.targets)
    assert median_rho(maps, reference) > 0.95  # measured: 1.00 (0.999 on the pets cnn)
    rounded = onnx_gradcam(setup.int8, "stages", setup.images, setup.targets, rounding=True)
    assert median_rho(rounded, reference) > 0.95  # measured: 0.998
    # the bar is no formality: random channel weights in place of the estimated ones fail it
    rng = np.random.default_rng(0)
    monkeypatch.setattr(_ort_cam, "_channel_weights", lambda head, name, a, *rest: rng.standard_normal(len(a)))
    maps = onnx_gradcam(setup.int8, "stages", setup.images, setup.targets)
    assert median_rho(maps, reference) < 0.95  # measured: 0.44 (0.08-0.86 over 40 seeds)


def test_unknown_layer_is_refused(setup: Exported) -> None:
    with pytest.raises(FoveaError, match="no layer 'stages.9'.*stages.2"):
        onnx_gradcam(setup.int8, "stages.9", setup.images, setup.targets)


def test_int8_model_without_scopes_uses_the_fp32_export(setup: Exported, tmp_path: Path) -> None:
    """quant_pre_process drops every node's metadata when ONNX Runtime inlines a function (mobilenetv3's
    HardSwish): the layer is then found in the float32 export and taken by its tensor name."""
    model = onnx.load(str(setup.int8))
    for node in model.graph.node:
        del node.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(FoveaError, match="no PyTorch module scopes"):
        onnx_gradcam(bare, "stages", setup.images, setup.targets)
    maps = onnx_gradcam(bare, "stages", setup.images, setup.targets, reference=setup.fp32)
    assert np.allclose(maps, onnx_gradcam(setup.int8, "stages", setup.images, setup.targets), atol=1e-6)


def test_layer_aliases_follow_identity_but_not_in_place_changes() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=True)
            self.out = nn.Identity()  # no op: absent from an ONNX graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y += 1  # conv's output object now holds something else
            return self.out(self.act(y))

    assert layer_aliases(nn.Sequential(Block()), 8, "0.out") == ["0.out", "0.act", "0"]
