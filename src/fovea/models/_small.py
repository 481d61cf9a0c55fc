"""Fovea's own models: the fully connected baseline and a compact convnet for small data on a CPU."""

from __future__ import annotations

import torch
from torch import nn

from fovea.models._architectures import Headed, register_model

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}


class _Gray(nn.Module):
    """(B, 3, H, W) -> (B, 1, H, W): the channels' mean, for an MLP that reads one value per pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


class MLP(Headed):
    """Fully connected baseline (the seeds' "FC vs CNN"): flatten -> [Linear, (BN), act, Dropout] x k -> Linear.

    ``activations`` names each hidden layer's (relu, sigmoid, tanh, gelu; default relu for all) and ``gray``
    reads one value per pixel (the channels' mean): with ``hidden=(784, 256, 64)``, ``activations=("relu",
    "relu", "sigmoid")``, ``gray=True`` and 28 px this is seed 003's digit reader, 784 inputs to 10 classes.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        hidden: tuple[int, ...] = (512, 256),
        batch_norm: bool = True,
        drop_rate: float = 0.2,
        activations: tuple[str, ...] | str | None = None,
        gray: bool = False,
    ) -> None:
        super().__init__()
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        acts = (activations,) * len(hidden) if isinstance(activations, str) else tuple(activations or ("relu",) * len(hidden))
        if len(acts) != len(hidden) or any(a not in _ACTIVATIONS for a in acts):
            raise TypeError(f"activations must name one of {', '.join(_ACTIVATIONS)} per hidden layer "
                            f"({len(hidden)}), got {activations!r}")
        layers: list[nn.Module] = [_Gray()] if gray else []
        layers += [nn.Flatten()]
        n_in = (1 if gray else 3) * image_size * image_size
        for n, act in zip(hidden, acts):
            layers += [nn.Linear(n_in, n, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(n)] if batch_norm else []
            layers += [_ACTIVATIONS[act](), nn.Dropout(drop_rate)]
            n_in = n
        self.features = nn.Sequential(*layers)
        self.num_features = n_in
        self.head = nn.Linear(n_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _conv_bn(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm),
        *([nn.BatchNorm2d(c_out)] if batch_norm else []),
        nn.GELU(),
    ]


class _Stage(nn.Module):
    """conv -> 2x2 max-pool -> conv with a residual: the airbench block, plus a skip for depth-robustness."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(c_in, c_out, batch_norm))
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(*_conv_bn(c_out, c_out, batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        return x + self.conv2(x)


class CNN(Headed):
    """Compact convnet that trains fast from scratch on a few thousand images, on a CPU.

    stem conv (stride ``stem_stride``) -> 3 stages (conv, pool, residual conv) at widths ``widths`` ->
    global average + max pooling -> dropout -> linear. Defaults (widths 24-192, stride-2 stem): 0.66 M params,
    ~800 training images/s at 64 px on 2 Zen 4 cores in bf16; 86.6 % on pets/val in 80 epochs
    (bench/recipe_sweep.py).
    """

    default_size = 64

    def __init__(
        self,
        num_classes: int,
        image_size: int = 64,
        widths: tuple[int, ...] = (24, 48, 96, 192),
        stem_stride: int = 2,
        batch_norm: bool = True,
        drop_rate: float = 0.2,
    ) -> None:
        super().__init__()
        del image_size  # fully convolutional: any input size works
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=not batch_norm),
            *([nn.BatchNorm2d(widths[0])] if batch_norm else []),
            nn.GELU(),
        )
        self.stages = nn.Sequential(*[_Stage(a, b, batch_norm) for a, b in zip(widths[:-1], widths[1:])])
        self.num_features = 2 * widths[-1]
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)
        self.logit_scale = 0.125

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H/8, W/8): the last spatial map, for CAM

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)  # (B, 2C)
        # Scaled logits (as in airbench/hlb-cifar10): the pooled features are unnormalised and large, so
        # an unscaled head takes steps of |f|^2 * lr and diverged at lr 0.02 in our tests; 1/8 fixes it.
        return x if pre_logits else self.head(self.drop(x)) * self.logit_scale


@register_model
def mlp(num_classes: int, image_size: int = 32, **kwargs: object) -> nn.Module:
    """fully connected baseline: flatten, hidden layers (--arch hidden=512,256), linear"""
    return MLP(num_classes, image_size, **kwargs)  # type: ignore[arg-type]


@register_model
def cnn(num_classes: int, image_size: int = 64, **kwargs: object) -> nn.Module:
    """compact residual convnet for small data on a CPU (--arch widths=24,48,96,192)"""
    return CNN(num_classes, image_size, **kwargs)  # type: ignore[arg-type]


mlp.default_size = 32  # type: ignore[attr-defined]
cnn.default_size = 64  # type: ignore[attr-defined]
