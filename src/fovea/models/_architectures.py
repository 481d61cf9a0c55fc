"""One place that knows every architecture: Fovea's own, timm's, and torchvision's classics.

``create_model(name, num_classes, ...)`` builds any of them with a fresh classifier; ``list_models()``
lists them. Fovea's own models register themselves with ``@register_model``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fovea.errors import FoveaError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TORCHVISION = ("alexnet", "googlenet")  # course classics that timm does not ship


class Headed(nn.Module):
    """timm's model protocol, which Fovea's own models share (explain, features mode, the unknown score and
    similar images call it): ``forward_features`` (the subclass's) -> ``forward_head`` (here: ``self.head``, or
    its input with ``pre_logits``) = ``forward``; ``get_classifier`` is ``self.head``."""

    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; the first line of its docstring is what ``fovea models`` says it is,
    and an optional ``config`` attribute (mean, std, optimizer, kind) what ``default_config`` adds for it."""
    _MODELS[fn.__name__] = fn
    return fn


def describe_model(name: str) -> str:
    """One line on what a model is: Fovea's own from their docstrings; "" for timm's and torchvision's."""
    fn = _MODELS.get(name)
    return (fn.__doc__ or "").strip().splitlines()[0] if fn is not None and fn.__doc__ else ""


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def list_models(source: str = "all") -> list[str]:
    """Names Fovea can build. ``source``: all | fovea | torchvision | timm."""
    out: list[str] = []
    if source in ("all", "fovea"):
        out += sorted(_MODELS)
    if source in ("all", "torchvision"):
        out += list(_TORCHVISION)
    if source in ("all", "timm"):
        out += _timm_names()
    return out


def source_of(name: str) -> str:
    if name in _MODELS:
        return "fovea"
    if name in _TORCHVISION:
        return "torchvision"
    if name in set(_timm_names()):
        return "timm"
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise FoveaError(f"unknown model {name!r}.{hint} `fovea models` lists them all.")


def create_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head. Extra kwargs go to the architecture (e.g. drop_rate)."""
    try:
        return _create(name, num_classes, image_size=image_size, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as e:  # an --arch option (or --batch-norm) the architecture does not take, or a bad value
        if not kwargs:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
        raise FoveaError(f"{name} does not take {given}: {e}") from e


def check_input_size(model: nn.Module, image_size: int, name: str) -> None:
    """One forward pass of a blank image, so an input too small for the network's downsampling fails with a
    clear message before any image is decoded (and not as a shape error deep in the first batch)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as e:
        raise FoveaError(f"--image-size {image_size} is too small for {name} ({str(e).splitlines()[0]}); "
                         "use a larger size (`fovea models` lists each model's own)") from None
    finally:
        model.train(was_training)


def _create(name: str, num_classes: int, *, image_size: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    src = source_of(name)
    if src == "fovea":
        return _MODELS[name](num_classes=num_classes, image_size=image_size, **kwargs)
    if src == "torchvision":
        import torchvision

        if pretrained:
            raise FoveaError(f"pretrained weights for torchvision's {name} are not wired in; use --weights FILE")
        extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        if "drop_rate" in kwargs:
            extra["dropout"] = kwargs.pop("drop_rate")
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **extra)
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise FoveaError(
                f"could not download pretrained weights for {name} ({type(e).__name__}). Offline? "
                "Train without them (--no-pretrained) or give local weights with --weights FILE|RUN."
            ) from e
        raise


def default_config(name: str) -> dict[str, Any]:
    """Preprocessing the architecture expects: input size, mean, std, interpolation (timm's pretrained_cfg)."""
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"}
    src = source_of(name)
    if src == "fovea":  # a model's own config (classical: mean 0, std 1; recurrent: adamw) over ImageNet's
        own = getattr(_MODELS[name], "config", {})
        return {**imagenet, "input_size": getattr(_MODELS[name], "default_size", 64), **own}
    if src == "torchvision":
        return {**imagenet, "input_size": 224}
    import timm

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return {**imagenet, "input_size": 224}
    return {
        "mean": tuple(cfg.mean), "std": tuple(cfg.std),
        "interpolation": cfg.interpolation or "bilinear", "input_size": int(cfg.input_size[-1]),
    }
