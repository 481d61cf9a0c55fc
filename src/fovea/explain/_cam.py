"""Class activation maps: which part of the image a model's decision rests on.

Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al. 2018), Score-CAM (Wang et al. 2020),
Eigen-CAM (Muhammad & Yeasin 2020) and Layer-CAM (Jiang et al. 2021) come from pytorch-grad-cam; the
original CAM (Zhou et al. 2016) is computed here from the classifier's weights, because that library has
no plain CAM. Every map is taken at one layer: by default the last spatial feature map of the network.
"""

from __future__ import annotations

import contextlib
import difflib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError

if TYPE_CHECKING:
    from fovea.runtime import TorchModel

METHODS = ("gradcam", "gradcam++", "cam", "scorecam", "eigencam", "layercam")
_LIBRARY = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM", "eigencam": "EigenCAM",
            "layercam": "LayerCAM"}
# Adaptive pools resample to the classifier's fixed input (alexnet's 6 x 6 from a 3 x 3 map at 128 px):
# their output looks spatial but only repeats the map before them, so they are never the target layer.
_RESAMPLERS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class Explanation:
    """Maps for N images, and what each one explains."""

    maps: np.ndarray  # (N, S, S) float32 in [0, 1], at the model's input size
    targets: list[int]  # the class each map explains
    predicted: list[int]
    probabilities: np.ndarray  # (N, classes), as `fovea predict` gives them
    method: str
    layer: str


def blank_forward(net: nn.Module, image_size: int, on_output: Callable[[str, nn.Module, Any], None]) -> None:
    """One forward pass of a blank image in eval mode with ``on_output(name, module, output)`` hooked on every
    named module (called as each finishes: a container after its children); hooks and mode restored after."""
    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            on_output(name, module, out)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()


def _spatial_outputs(net: nn.Module, image_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every module whose output is a 4-D map with more than one cell, in the
    order they finish during one forward pass (a container finishes after its children)."""
    found: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str, module: nn.Module, out: Any) -> None:
        if (isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1
                and not isinstance(module, _RESAMPLERS)):
            found.append((name, tuple(out.shape)))

    blank_forward(net, image_size, record)
    return found


def find_target_layer(net: nn.Module, image_size: int = 224) -> str:
    """Name of the module producing the network's last spatial feature map at this input size.

    One forward pass of a blank image with hooks; the last module to finish whose output is (1, C, H, W)
    with H * W > 1 wins. When a container and its last child return the same tensor the container is
    named (``layer4``, not ``layer4.1.act2``). A 1 x 1 map is no map: mobilenetv3's conv_head after the
    global pool is skipped, so is a last stage that an input this small shrinks to one cell.
    """
    why = getattr(net, "no_cam", None)  # a model that says why maps do not apply to it (classical, recurrent)
    if why:
        raise FoveaError(f"does not apply: {why}")
    found = _spatial_outputs(net, image_size)
    if not found:
        raise FoveaError(f"{type(net).__name__} has no spatial feature map at {image_size} px (a fully connected "
                         "model such as mlp, or a transformer): class activation maps need a convolutional network")
    return found[-1][0]


def resolve_layer(net: nn.Module, image_size: int, layer: str | None) -> tuple[str, nn.Module]:
    """The target layer: ``layer`` by name if given (checked to give a spatial map), else found."""
    if layer is None or getattr(net, "no_cam", None):
        name = find_target_layer(net, image_size)  # raises "does not apply" for a model without maps
        return name, net.get_submodule(name)
    modules = dict(net.named_modules())
    spatial = list(dict.fromkeys(n for n, _ in _spatial_outputs(net, image_size)))
    if layer not in modules or not layer:
        close = difflib.get_close_matches(layer, spatial, n=3) or spatial[-5:]
        raise FoveaError(f"no layer {layer!r} in {type(net).__name__}; layers with a spatial map include: "
                         f"{', '.join(close)}")
    if layer not in spatial:
        raise FoveaError(f"layer {layer!r} gives no spatial map at {image_size} px; pick one that does, e.g. "
                         f"{', '.join(spatial[-5:]) or 'none: this model has none'}")
    return layer, modules[layer]


def _targets(target: int | str | None, predicted: Sequence[int], classes: Sequence[str]) -> list[int]:
    if target is None:
        return list(predicted)
    if isinstance(target, str):
        if target not in classes:
            raise FoveaError(f"unknown class {target!r}; the model's classes are: {', '.join(classes)}")
        return [list(classes).index(target)] * len(predicted)
    if not 0 <= int(target) < len(classes):
        raise FoveaError(f"class index {target} is out of range: the model has {len(classes)} classes")
    return [int(target)] * len(predicted)


def _quiet(method: str) -> contextlib.AbstractContextManager[Any]:
    """Score-CAM draws a tqdm bar per image on stderr (the library offers no switch; TQDM_DISABLE is
    read once, when tqdm is imported): that bar goes nowhere. Other methods print nothing."""
    return contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()


def _last_linear(net: nn.Module, x: torch.Tensor, layer: nn.Module) -> tuple[nn.Linear | None, torch.Tensor,
                                                                                torch.Tensor]:
    """One forward pass: (the last nn.Linear called, the layer's activations, the logits)."""
    called: list[nn.Module] = []
    acts: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, o: called.append(m)) for m in net.modules()
               if isinstance(m, nn.Linear)]
    handles.append(layer.register_forward_hook(lambda m, a, o: acts.append(o)))
    try:
        with torch.no_grad():
            logits = net(x).float()
    finally:
        for h in handles:
            h.remove()
    fc = called[-1] if called else None
    return fc if isinstance(fc, nn.Linear) else None, acts[-1].float(), logits


def class_activation_map(net: nn.Module, x: torch.Tensor, targets: Sequence[int], layer: nn.Module) -> np.ndarray:
    """The original CAM, sum_k w[c, k] A_k, for a head that is global average pooling + one linear layer.

    CAM is defined only when logits = W . mean_hw(A) + b exactly; that is checked on these very images,
    so a head with anything else between the map and the classifier (max pooling, an MLP, a scale) is
    refused rather than explained wrongly. Returns (B, h, w) on the map's own grid, before ReLU.
    """
    fc, acts, logits = _last_linear(net, x, layer)  # acts: (B, K, h, w)
    why = None
    if fc is None:
        why = "it has no linear classifier"
    elif fc.in_features != acts.shape[1]:
        why = f"its classifier takes {fc.in_features} features, the map has {acts.shape[1]} channels"
    else:
        with torch.no_grad():
            pooled = fc(acts.mean((2, 3))).float()
        err = float((pooled - logits).abs().max())
        if err > 1e-3 * max(1.0, float(logits.abs().max())):
            why = f"its logits are not W . mean(map) + b (off by up to {err:.3g})"
    if why is not None:
        raise FoveaError(f"CAM needs a head that is global average pooling + one linear layer on the last feature "
                         f"map, and {type(net).__name__}'s is not: {why}. Use --method gradcam (CAM generalized "
                         "to any head)")
    assert fc is not None
    w = fc.weight.detach().float()[list(targets)]  # (B, K)
    return torch.einsum("bk,bkhw->bhw", w, acts).cpu().numpy()


def cam_maps(net: nn.Module, x: torch.Tensor, targets: Sequence[int], *, method: str, layer: nn.Module) -> np.ndarray:
    """Maps (B, H, W) in [0, 1] at the input's size for a normalised batch ``x`` on the net's device.

    As pytorch-grad-cam does for every method: ReLU (only evidence for the class), then each map scaled
    to [0, 1] and resized bilinearly to the input.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    if method not in METHODS:
        raise FoveaError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    size = (x.shape[-1], x.shape[-2])
    if method == "cam":
        raw = class_activation_map(net, x, targets, layer)
        return scale_cam_image(np.maximum(raw, 0), size)
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, _LIBRARY[method])(net, [layer])
    if method == "scorecam":
        cam.batch_size = 128  # masked copies of one image per forward pass (the library's default, 16, is slow)
    # The input asks for gradients, so every activation does, even where parameters are frozen.
    x = x.detach().requires_grad_(True)
    try:
        with _quiet(method):
            maps = cam(x, [ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
        net.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def _net_maps(net: nn.Module, images: torch.Tensor, targets: Sequence[int], *, method: str, layer: nn.Module,
              mean: Sequence[float], std: Sequence[float], batch_size: int) -> np.ndarray:
    """Maps for uint8 (N, 3, S, S) images, a batch at a time on the net's device."""
    from fovea.data import normalize

    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size].to(device), tuple(mean), tuple(std))
            out.append(cam_maps(net, x, targets[i : i + batch_size], method=method, layer=layer))
    finally:
        net.train(was_training)
    s = images.shape[-1]
    return np.concatenate(out) if out else np.zeros((0, s, s), np.float32)


def single_model(model: Any) -> TorchModel:
    """The one PyTorch network of a loaded artifact: an ensemble (several) and an ONNX Runtime or torch.export
    artifact (no gradients) are refused with what to do instead."""
    from fovea.runtime import Ensemble, TorchModel

    if isinstance(model, TorchModel):
        return model
    if isinstance(model, Ensemble):
        raise FoveaError(f"{model.path} is an ensemble of {len(model.members)} models; explain one member at a time "
                         f"(its folders are under {model.path}/members)")
    runtime = (model.meta.get("compression") or {}).get("runtime", "?")
    raise FoveaError(f"{model.path} runs in {runtime}, which gives no gradients; explain the PyTorch run it was "
                     "compressed from")


def explain(model: TorchModel, images: torch.Tensor, *, method: str = "gradcam", target: int | str | None = None,
            layer: str | None = None, batch_size: int = 32) -> Explanation:
    """Heatmaps for uint8 (N, 3, S, S) images from ``model.load_images``; by default of the predicted class.

    Args:
        model: a loaded artifact (``fovea.load(run)``).
        images: the images at the model's size, as ``model.load_images`` returns them.
        method: one of ``METHODS``.
        target: the class to explain for every image (name or index); None: each image's predicted class.
        layer: the module to take the map at (a name from ``net.named_modules()``); None: the last spatial map.
        batch_size: images per forward/backward pass.
    """
    model = single_model(model)
    if method not in METHODS:
        raise FoveaError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    name, module = resolve_layer(model.net, model.image_size, layer)
    probs = model.predict_proba(images)
    predicted = [int(i) for i in probs.argmax(1)] if len(probs) else []
    targets = _targets(target, predicted, model.classes)
    # the network sees the images after the artifact's --preprocess steps, as predict_proba does
    maps = _net_maps(model.net, model.prepare(images), targets, method=method, layer=module, mean=model.mean, std=model.std,
                     batch_size=batch_size)
    return Explanation(maps, targets, predicted, probs, method, name)
