"""Transfer learning: load someone's weights into a model with a new head, freeze part of it, measure
how far new data sits from what the backbone was trained on.

Weights come from a file (safetensors, or a PyTorch ``.pth``/``.pt`` read with ``weights_only=True``,
never unpickled), or from a Fovea run folder. Tensors whose shapes do not fit (the old classifier, or a
layer of another width) are listed in a report and logged; none is dropped silently.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.errors import FoveaError

log = logging.getLogger("fovea.transfer")
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------------------ reading weights


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors from a weights file or a Fovea run folder; the run's model.json comes along (else None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(source)
    meta = None
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FoveaError(f"--weights {path}: a folder must be a Fovea run (model.safetensors + model.json)")
        if (path / "model.json").is_file():
            meta = json.loads((path / "model.json").read_text())
        path = path / "model.safetensors"
    elif not path.is_file():
        raise FoveaError(f"--weights {path}: no such file or run folder")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            # weights_only=True: tensors and plain containers only; a pickle with code in it is refused.
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise FoveaError(f"--weights {path}: expected .safetensors, .pth or .pt (or a Fovea run folder)")
    except pickle.UnpicklingError as e:
        raise FoveaError(f"--weights {path}: refused: it holds Python objects, not only tensors, and loading it "
                         "would run code from the file. Save a state_dict (or safetensors) instead.") from e
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError) as e:
        raise FoveaError(f"--weights {path}: cannot read it ({type(e).__name__}: {str(e)[:200]})") from e
    for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FoveaError(f"--weights {path}: not a state dict (a mapping of names to tensors)")
    prefix = "module."  # saved from DataParallel / DDP
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


# -------------------------------------------------------------------------------------------- the head


def head_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the classifier head (timm's pretrained_cfg, ours, or the last Linear)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if names:
        return [names] if isinstance(names, str) else list(names)
    if hasattr(model, "head") and isinstance(model.head, nn.Linear):
        return ["head"]
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [last[-1]] if last else []


def _in_head(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def linear_classifier(model: nn.Module) -> nn.Linear:
    """The model's final Linear layer, applied to the pooled features (timm's ``get_classifier()``)."""
    has_head = hasattr(model, "get_classifier") and hasattr(model, "forward_head")
    fc = model.get_classifier() if has_head else None  # type: ignore[operator]
    if not isinstance(fc, nn.Linear):
        raise FoveaError(f"{type(model).__name__} has no single linear classifier on pooled features; "
                         "use --mode finetune")
    return fc


@torch.no_grad()
def fold_probe(model: nn.Module, probe: nn.Linear, mu: torch.Tensor, sigma: torch.Tensor) -> None:
    """Write a linear probe trained on standardised features ((f - mu) / sigma) into the model's own
    classifier, so that the model maps raw features to the same logits (dividing by its logit scale)."""
    fc = linear_classifier(model)
    scale = float(getattr(model, "logit_scale", 1.0))
    w = probe.weight.float() / sigma
    fc.weight.copy_((w / scale).to(fc.weight.dtype))
    fc.bias.copy_(((probe.bias.float() - w @ mu) / scale).to(fc.bias.dtype))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features just before the classifier (timm's forward_head(pre_logits=True))."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


# -------------------------------------------------------------------------------------- loading weights


@dataclass
class WeightsReport:
    source: str
    loaded: int = 0
    head_replaced: list[str] = field(default_factory=list)  # "name (file shape -> model shape)"
    mismatched: list[str] = field(default_factory=list)  # backbone tensors of another shape: left as initialised
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: unused

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded from {self.source}"]
        if self.head_replaced:
            parts.append(f"classifier replaced for the new classes ({', '.join(self.head_replaced)})")
        for label, items in (("of another shape, left as initialised", self.mismatched),
                             ("missing from the file, left as initialised", self.missing),
                             ("in the file but not in the model, unused", self.unexpected)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        return "; ".join(parts)


def load_weights(model: nn.Module, source: str | Path, state: dict[str, torch.Tensor] | None = None) -> WeightsReport:
    """Copy every tensor of ``source`` that fits into ``model``; report the ones that do not."""
    if state is None:
        state, _ = read_weights(source)
    expected = model.state_dict()
    heads = head_prefixes(model)
    report = WeightsReport(str(source))
    fits: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k not in expected:
            report.unexpected.append(k)
        elif _in_head(k, heads):  # new classes, new head: even one of the same shape means other classes
            report.head_replaced.append(f"{k} {tuple(v.shape)} -> {tuple(expected[k].shape)}")
        elif v.shape != expected[k].shape:
            report.mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(expected[k].shape)}")
        else:
            fits[k] = v
    report.missing = [k for k in expected if k not in state and not _in_head(k, heads)]
    report.loaded = len(fits)
    backbone = [k for k in expected if not _in_head(k, heads)]
    loaded_backbone = sum(1 for k in backbone if k in fits)
    if not backbone or loaded_backbone < 0.5 * len(backbone):
        raise FoveaError(
            f"--weights {source}: only {loaded_backbone} of the model's {len(backbone)} backbone tensors are in it with "
            f"the right shape; is it a {type(model).__name__} of the same size? ({report.summary()})")
    model.load_state_dict(fits, strict=False)
    for line in (report.mismatched, report.missing):
        if line:
            log.warning("%s", report.summary())
            break
    return report


# ---------------------------------------------------------------------------------------- freezing


def layer_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters in groups from input to output (a block each), the head excluded.

    Grouped by the first two components of the name (``layer1.0``, ``stages.2``, ``blocks.3``), which
    follows each architecture's own block structure without knowing it.
    """
    heads = head_prefixes(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if _in_head(name, heads):
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append((name, p))
    return list(groups.values())


def frozen_count(groups: list[list[tuple[str, nn.Parameter]]], fraction: float) -> int:
    """How many groups, from the input side, hold ``fraction`` of the backbone's parameters."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return len(groups)
    sizes = [sum(p.numel() for _, p in g) for g in groups]
    total, acc = sum(sizes), 0
    for i, s in enumerate(sizes):
        if acc + s / 2 > fraction * total:  # a group counts when most of it falls inside the fraction
            return i
        acc += s
    return len(groups)


def norm_modules(model: nn.Module, names: set[str]) -> list[nn.Module]:
    """The BatchNorm modules whose parameters are among ``names``."""
    return [m for n, m in model.named_modules() if isinstance(m, NORMS) and f"{n}.weight" in names]


# ------------------------------------------------------------------------------------ domain shift


@torch.no_grad()
def domain_shift(model: nn.Module, images: torch.Tensor) -> list[float] | None:
    """How far new images sit from what the backbone was trained on, from its BatchNorm statistics.

    For every BatchNorm layer, the per-channel mean and variance of the new images' activations are
    compared with the layer's running statistics (what the backbone saw in training) as a KL divergence
    between two Gaussians, averaged over channels: one figure per layer, input side first. 0 means
    "looks like the training data". ``images`` are already normalised, on the model's device. None when
    the model has no BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
             and m.running_mean is not None and m.running_var is not None]
    if not norms:
        return None
    scores: list[float] = []

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        x = inputs[0].float()
        dims = [0] + list(range(2, x.ndim))
        mu, var = x.mean(dims), x.var(dims)
        eps = float(m.eps)  # type: ignore[arg-type]
        mu_r = torch.as_tensor(m.running_mean).float()
        var_r = torch.as_tensor(m.running_var).float() + eps
        var = var + eps
        kl = 0.5 * ((mu - mu_r) ** 2 / var_r + var / var_r - 1 - torch.log(var / var_r))
        scores.append(float(kl.mean()))

    handles = [m.register_forward_hook(hook) for m in norms]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return scores
