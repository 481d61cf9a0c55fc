"""The model-parameter randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An explanation of a model must depend on the model. The test re-initializes the trained network's layers
top-down (from the classifier toward the input), cumulatively, and after each step recomputes the maps for
the same images and the same classes. A method whose maps stay the same while the weights they claim to
explain are destroyed is explaining the image, not the model (an edge detector would pass as a "saliency
map" otherwise).

Similarity to the trained model's maps is measured as in the paper: the absolute Spearman rank
correlation (the absolute value because a map and its negation highlight the same pixels; rank because map
scales differ between models) and SSIM, each averaged over images.

Verdict: the method passes when, with the top half of the layers randomized (the midpoint of the
cascade), the mean |Spearman| has dropped below ``threshold`` (0.5 by default). The midpoint, not the end:
the layers near the output are the ones that decide the class, and an explanation of the decision must
change without them. With the lower layers random too, a random network's maps follow raw image structure
(edges, contrast), which the trained model's maps partly follow as well, so the end of the cascade can read
higher than its middle (0.07 at step 3, 0.46 at the end on a weakly trained 48 px cnn).

Measured on the default cnn trained on pets (64 px, 85 % validation accuracy; 16 images, 8 steps), mean
|Spearman| at the midpoint: Grad-CAM 0.35 (0.38 with only the classifier randomized), Layer-CAM 0.48,
Grad-CAM++ 0.54, Score-CAM 0.62, Eigen-CAM 0.71 (it ignores the classifier: 1.00 at step 1), and a Sobel
edge map of the input, which never looks at the model, 1.00 at every step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError
from fovea.explain._cam import METHODS, _targets, cam_maps, resolve_layer, single_model

if TYPE_CHECKING:
    from fovea.runtime import TorchModel

# (network, normalised batch (B, 3, S, S) on its device, classes to explain) -> maps (B, H, W)
Explainer = Callable[[nn.Module, torch.Tensor, Sequence[int]], np.ndarray]
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """|Spearman rho| between two maps' pixels; a constant map ranks nothing, so it correlates 0."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    rho = float(spearmanr(a, b).statistic)
    return 0.0 if math.isnan(rho) else abs(rho)


def map_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) between two maps each scaled to [0, 1]; 7 x 7 windows, or smaller maps' size."""
    from skimage.metrics import structural_similarity

    a, b = _unit(np.asarray(a, np.float64)), _unit(np.asarray(b, np.float64))
    win = min(7, *a.shape)
    win -= 1 - win % 2  # odd
    if win < 3:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@dataclass
class SanityStep:
    randomized: str  # the layer(s) re-initialized at this step, on top of every step before
    spearman: float  # mean |rank correlation| with the trained model's maps
    ssim: float  # mean SSIM with the trained model's maps
    spearman_per_image: list[float] = field(repr=False, default_factory=list)


@dataclass
class SanityResult:
    method: str
    layer: str
    n_images: int
    threshold: float
    steps: list[SanityStep]
    passed: bool
    rule: str
    midpoint: int  # index of the step the verdict is taken at
    seconds: float

    @property
    def decisive(self) -> SanityStep:
        return self.steps[self.midpoint]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_groups(net: nn.Module, x: torch.Tensor) -> list[tuple[str, list[nn.Module]]]:
    """Modules that own parameters, in the order the forward pass finishes them, each norm layer joined
    to the layer before it (a conv and its batch norm are one layer, as in the paper's block-wise test)."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[str, list[nn.Module]]] = []
    for name, module in order:
        if isinstance(module, _NORMS) and groups:
            groups[-1][1].append(module)
        else:
            groups.append((name or type(module).__name__, [module]))
    return groups


def _chunk(groups: list[tuple[str, list[nn.Module]]], max_steps: int) -> list[tuple[str, list[nn.Module]]]:
    """Top-down steps: the groups from the output back, merged into at most ``max_steps`` runs."""
    top_down = groups[::-1]
    size = max(1, math.ceil(len(top_down) / max_steps))
    steps = []
    for i in range(0, len(top_down), size):
        part = top_down[i : i + size]
        label = part[0][0] if len(part) == 1 else f"{part[0][0]} .. {part[-1][0]}"
        steps.append((label, [m for _, ms in part for m in ms]))
    return steps


def _reinitialize(module: nn.Module) -> None:
    """The architecture's own initializer where the module has one (conv, linear, norms: what the paper
    does); else its values shuffled, which keeps their scale and destroys what was learned."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.copy_(p.flatten()[torch.randperm(p.numel(), device=p.device)].view_as(p))


def _maps(explainer: Explainer, net: nn.Module, batches: list[torch.Tensor], targets: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(explainer(net, x, t), np.float32) for x, t in zip(batches, targets)])


def sanity_check(model: TorchModel, images: torch.Tensor, method: str | Explainer = "gradcam", *,
                 target: int | str | None = None, layer: str | None = None, threshold: float = 0.5,
                 max_steps: int = 16, seed: int = 0, batch_size: int = 32) -> SanityResult:
    """Cascading randomization: does the explanation change when the model's weights are destroyed?

    Args:
        model: a loaded artifact (``fovea.load(run)``); it is not changed (a copy is randomized).
        images: uint8 (N, 3, S, S) at the model's size, from ``model.load_images``.
        method: one of ``METHODS``, or any ``explainer(net, x, targets) -> (B, H, W)`` to test.
        target: the class explained in every image; None: the trained model's prediction (kept fixed
            through the randomization, so only the weights change).
        layer: the target layer for the built-in methods (default: the last spatial map).
        threshold: the method passes if mean |Spearman| at the cascade's midpoint is below this.
        max_steps: consecutive layers are randomized together so that there are at most this many steps.
        seed: seed of the re-initialization.
    """
    from fovea.data import normalize

    start = time.perf_counter()
    model = single_model(model)
    if len(images) == 0:
        raise FoveaError("the sanity check needs at least one image")
    if max_steps < 1:
        raise FoveaError(f"max_steps must be at least 1, got {max_steps}")
    if not 0 < threshold <= 1:
        raise FoveaError(f"the threshold is a rank correlation in (0, 1], got {threshold}")
    net = copy.deepcopy(model.net).eval()
    device = next(net.parameters()).device
    probs = model.predict_proba(images)
    all_targets = _targets(target, [int(i) for i in probs.argmax(1)], model.classes)
    prepared = model.prepare(images)  # the artifact's --preprocess steps, as predict_proba applies them
    batches = [normalize(prepared[i : i + batch_size].to(device), tuple(model.mean), tuple(model.std))
               for i in range(0, len(images), batch_size)]
    targets = [all_targets[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if isinstance(method, str):
        if method not in METHODS:
            raise FoveaError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        name, module = resolve_layer(net, model.image_size, layer)
        method_name = method

        def builtin(n: nn.Module, x: torch.Tensor, t: Sequence[int]) -> np.ndarray:
            return cam_maps(n, x, t, method=method_name, layer=module)
        explainer: Explainer = builtin
    else:
        name, method_name, explainer = "-", getattr(method, "__name__", "explainer"), method
    reference = _maps(explainer, net, batches, targets)
    steps = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for label, modules in _chunk(layer_groups(net, batches[0]), max_steps):
            for m in modules:
                _reinitialize(m)
            maps = _maps(explainer, net, batches, targets)
            rho = [rank_correlation(a, b) for a, b in zip(reference, maps)]
            ssim = [map_ssim(a, b) for a, b in zip(reference, maps)]
            steps.append(SanityStep(label, float(np.mean(rho)), float(np.mean(ssim)), rho))
    mid = (len(steps) - 1) // 2  # 8 steps: the 4th, when the top half of the layers is random
    rule = (f"passes when mean |Spearman| with the trained model's maps is below {threshold} at the midpoint "
            f"of the cascade (step {mid + 1} of {len(steps)}: the top half of the layers randomized)")
    return SanityResult(method_name, name, len(images), threshold, steps, steps[mid].spearman < threshold, rule, mid,
                        time.perf_counter() - start)
