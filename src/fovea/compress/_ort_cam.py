"""Grad-CAM for ONNX models, which ONNX Runtime runs but cannot differentiate.

Grad-CAM (Selvaraju et al. 2017) weighs channel k of a layer's activations A (K, h, w) by
alpha_k = mean_ij dy_c / dA_kij and keeps ReLU(sum_k alpha_k A_k). That mean is the derivative of y_c along
1_k (every cell of channel k at once) over h * w, and a directional derivative needs no backward pass: the
graph after the layer (the "head") is cut out and run on A +/- eps * 1_k for every k, a central finite
difference, 2K rows per image in a few batched runs against one forward pass of the whole model.

In an int8 QDQ model the head rounds its input, its pooled features and its logits, so it is a staircase:
the difference is 0 for small eps, and on the pets cnn only eps >= 1 std of the activations got past the
Gemm's output step (0.18, 4.6 x its input's). By default the head's rounding is therefore taken out and its
saturation kept (each QuantizeLinear -> DequantizeLinear pair becomes a Clip to the pair's range): the
straight-through estimator with which quantization-aware training differentiates the same graph (Bengio et
al. 2013; Jacob et al. 2018). The activations A are the int8 model's own and the head's weights its int8
ones, so the map still shows what the quantized model looks at.

The layer is found by the PyTorch module scopes that the torch.export-based exporter writes on every node
(``pkg.torch.onnx.name_scopes``). ``quantize_static`` keeps them and its Q/DQ pairs carry none, but
``quant_pre_process`` loses them all when ONNX Runtime's optimizer inlines a function op (HardSwish in
mobilenetv3); tensor names survive, so the layer is then found in the float32 export (``reference``) and
taken by name. A module that leaves no node (an ``nn.Identity``, the default layer of convnext and regnet)
is found through another module returning the same tensor (``layer_aliases``).
"""

from __future__ import annotations

import ast
import difflib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError
from fovea.runtime.onnx import INPUT, OUTPUT, session

if TYPE_CHECKING:
    import onnx

SCOPES = "pkg.torch.onnx.name_scopes"
# Default eps as a fraction of the std of each image's activations at the layer. Median Spearman against
# PyTorch's Grad-CAM on the pets cnn (64 px, 24-32 val images; layers stages, stages.1, stages.2.conv2):
# >= 0.999 for the float32 export at every fraction from 0.01 to 2; for the int8 models through the
# straight-through head 0.985-0.999 from 0.01 to 0.1, falling to 0.95 at 2 where the head after stages.1 has
# nonlinearities (a secant, not a slope). 0.1: far from float32 round-off and from that curvature.
EPS_STD = 0.1
# Through the int8 head with its rounding (same model, layers): 0.0 at 0.1 (every difference rounded away),
# 0.65-0.9 at 0.3, 0.94-0.99 at 1, 0.93-0.998 at 2: a secant over many quantization steps.
ROUNDED_EPS_STD = 1.0
_CHUNK = 1 << 24  # floats of perturbed activations per run of the head (64 MB)
_BATCH = 64  # images per forward pass of the whole model


def _module_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The modules a node was exported from, outermost first (``['net', 'net.stages', ...]``); None for
    the nodes a quantizer inserted, which carry no scopes."""
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            scopes = ast.literal_eval(prop.value)  # a Python list literal: ['', 'net', ..., 'add_147']
            return [s for s in scopes[:-1] if s]  # the last entry names the op, '' the exported module
    return None


def layer_aliases(net: nn.Module, image_size: int, layer: str) -> list[str]:
    """``layer`` and every other module of ``net`` returning the very same tensor, unmodified (an
    ``nn.Identity`` returns its input; a container, its last child's output), in the order they finish.

    One forward pass of a blank image with hooks. A tensor changed in place in between (``x += shortcut``
    then an in-place ReLU, as in resnet) has a new version and is not the same output.
    """
    from fovea.explain import blank_forward

    seen: list[tuple[str, torch.Tensor, int]] = []

    def record(name: str, module: nn.Module, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            seen.append((name, out, out._version))  # _version: bumped by every in-place op

    blank_forward(net, image_size, record)
    target = next(((t, v) for n, t, v in seen if n == layer), None)
    if target is None:
        return [layer]
    same = [n for n, t, v in seen if t is target[0] and v == target[1] and n != layer]
    return [layer, *same]


def layer_tensor(model: onnx.ModelProto, layer: str | Sequence[str]) -> str:
    """Name of the tensor that module ``layer`` of the exported network returns (the first of several
    names, aliases of one output, that the graph has).

    A module's output is the tensor made inside its scope and used outside it (or a graph output). Q/DQ
    nodes, which have no scope, are looked through, so in a QDQ model the answer is the float tensor before
    the layer's QuantizeLinear, with the same name as in the float32 export. The network exported inside
    ``Normalized`` has its modules under ``net.``; a bare network's names are tried too.
    """
    names = [layer] if isinstance(layer, str) else list(layer)
    nodes = list(model.graph.node)
    scopes = [_module_scopes(n) for n in nodes]
    known = list(dict.fromkeys(s for ss in scopes if ss for s in ss))
    if not known:
        raise FoveaError("the ONNX model records no PyTorch module scopes, so its layers cannot be found by "
                         "name: pass the float32 export it was made from as the reference")
    scope = next((s for n in names for s in (f"net.{n}", n) if n and s in known), None)
    if scope is None:
        stripped = [s.removeprefix("net.") for s in known]
        close = difflib.get_close_matches(names[0], stripped, n=3) or stripped[-5:]
        raise FoveaError(f"no layer {names[0]!r} in the ONNX graph (a layer without ops, as nn.Identity, leaves "
                         f"none: see layer_aliases); its layers include: {', '.join(close)}")
    inside = {i for i, s in enumerate(scopes) if s and scope in s}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in model.graph.output}

    def escapes(name: str) -> bool:
        if name in graph_outputs:
            return True
        return any(j not in inside and (scopes[j] is not None or any(escapes(o) for o in nodes[j].output))
                   for j in consumers.get(name, []))

    outputs = [o for i in sorted(inside) for o in nodes[i].output if o and escapes(o)]
    if not outputs:
        raise FoveaError(f"layer {names[0]!r} has no output that the rest of the ONNX graph uses")
    return outputs[-1]  # a module returning one tensor has one; else the last made (nodes are in topological order)


def _find(model: onnx.ModelProto, layer: str | Sequence[str], reference: str | Path | None) -> str:
    """The layer's tensor in ``model``, by its own scopes or, when it has none, by name via ``reference``."""
    import onnx

    if reference is None or any(_module_scopes(n) is not None for n in model.graph.node):
        return layer_tensor(model, layer)
    name = layer_tensor(onnx.load(str(reference), load_external_data=False), layer)
    if name not in {o for n in model.graph.node for o in n.output}:
        raise FoveaError(f"the layer's output {name!r} in {reference} has no tensor of that name in the model: "
                         "is it the float32 model this one was quantized from?")
    return name


def _side_inputs(model: onnx.ModelProto, name: str) -> list[str]:
    """Tensors the head reads besides ``name`` that come from the images by another path: activations (a
    residual around the layer), which a partial derivative holds fixed, and index arithmetic on the input's
    shape."""
    graph = model.graph
    dynamic = {i.name for i in graph.input}
    after = {name}
    head = []
    for node in graph.node:  # topological order
        if any(i in dynamic for i in node.input):
            dynamic.update(node.output)
        if any(i in after for i in node.input):
            after.update(node.output)
            head.append(node)
    made = {o for n in head for o in n.output}
    return list(dict.fromkeys(i for n in head for i in n.input if i in dynamic and i not in made and i != name))


def straight_through(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each activation QuantizeLinear -> DequantizeLinear pair replaced by a Clip to the
    range it represents: the rounding goes, the saturation stays. Per-channel pairs are left as they are
    (ONNX Runtime quantizes activations per tensor; weights have a DequantizeLinear alone)."""
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quant = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    nodes, bounds = [], []
    for node in model.graph.node:
        q = quant.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        scale = inits.get(q.input[1]) if q is not None else None
        if q is None or scale is None or scale.size != 1:
            nodes.append(node)
            continue
        zero = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        kind = np.iinfo(zero.dtype if zero is not None else np.uint8)
        z = float(zero.ravel()[0]) if zero is not None else 0.0
        lo, hi = f"{node.output[0]}_clip_min", f"{node.output[0]}_clip_max"
        bounds += [numpy_helper.from_array(np.array((v - z) * float(scale.ravel()[0]), scale.dtype), n)
                   for v, n in ((kind.min, lo), (kind.max, hi))]
        nodes.append(helper.make_node("Clip", [q.input[0], lo, hi], [node.output[0]], name=f"{node.name}_clip"))
    used = {i for n in nodes for i in n.input}
    nodes = [n for n in nodes if n.op_type != "QuantizeLinear" or n.output[0] in used]
    out = type(model)()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(bounds)
    return out


def _cut(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str], bool]:
    """(the whole model giving ``name`` and the head's other float inputs as extra outputs, the head from
    them to the logits, those inputs, whether the head also reads the images).

    The head reads the images only through index arithmetic on their shape (the batch size; convnext's
    head has some): it gets blank images of its own batch size rather than the whole model's numbers.
    """
    import onnx
    from onnx import helper
    from onnx.utils import Extractor

    dynamic = _side_inputs(model, name)
    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v for v in model.graph.value_info}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    side = [t for t in dynamic if t not in typed or typed[t].type.tensor_type.elem_type in floats]
    reads_images = len(side) < len(dynamic)
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    for t in (name, *side):
        whole.graph.output.append(typed.get(t) or helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    head = Extractor(model).extract_model([name, *side, *([INPUT] if reads_images else [])], [OUTPUT])
    return whole, head, side, reads_images


def onnx_gradcam(onnx_path: str | Path, layer: str | Sequence[str], images: torch.Tensor, targets: Sequence[int], *,
                 eps: float | None = None, rounding: bool = False, reference: str | Path | None = None) -> np.ndarray:
    """Grad-CAM maps (N, S, S) float32 in [0, 1] of an ONNX model, without gradients.

    Args:
        onnx_path: a model written by ``export_onnx`` (uint8 ``images`` in, ``logits`` out), or the int8 QDQ
            model that ``quantize_ort`` makes from one.
        layer: the target layer's module name in the unwrapped network (``stages.2``, ``layer4``), as
            ``fovea.explain._cam.resolve_layer`` gives it; or that name and its aliases (``layer_aliases``),
            needed when it is a module without ops.
        images: uint8 (N, 3, S, S) at the model's input size.
        targets: the class to explain, one per image.
        eps: the finite-difference step in the layer's activation units. None: for each image, ``EPS_STD``
            (``ROUNDED_EPS_STD`` with ``rounding``) times the std of its activations at the layer.
        rounding: keep the int8 head's rounding (a secant of the deployed staircase, needing a large eps)
            instead of differentiating it straight through. No effect on a float model.
        reference: the float32 export an int8 model was made from, where the layer is looked up when the
            int8 model has lost its module scopes. None: the model's own scopes only.

    Maps are made as pytorch-grad-cam (and so ``fovea.explain``) makes them: ReLU, each map scaled to
    [0, 1] and resized bilinearly to S x S.
    """
    import onnx
    from pytorch_grad_cam.utils.image import scale_cam_image

    if len(targets) != len(images):
        raise FoveaError(f"{len(targets)} targets for {len(images)} images: give one class per image")
    model = onnx.load(str(onnx_path))
    name = _find(model, layer, reference)
    whole, head, side, reads_images = _cut(model, name)
    if not rounding:
        head = straight_through(head)
    frac = ROUNDED_EPS_STD if rounding else EPS_STD
    x = images.cpu().numpy()
    with tempfile.TemporaryDirectory() as tmp:  # fovea's session() (providers, errors) opens files
        onnx.save(whole, f"{tmp}/whole.onnx")
        onnx.save(head, f"{tmp}/head.onnx")
        run_whole, run_head = session(f"{tmp}/whole.onnx"), session(f"{tmp}/head.onnx")
        got = [run_whole.run([name, *side], {INPUT: x[i : i + _BATCH]}) for i in range(0, len(x), _BATCH)]
        acts = np.concatenate([g[0] for g in got]).astype(np.float32)  # (N, K, h, w)
        extras = [np.concatenate([g[j] for g in got]) for j in range(1, len(side) + 1)]
        if acts.ndim != 4:
            raise FoveaError(f"layer {name!r} gives a {acts.ndim}-D output; Grad-CAM needs a (N, C, H, W) map")
        for e, s in zip(extras, side):
            if len(e) != len(x):
                raise FoveaError(f"the graph after {name!r} also reads {s!r}, which is not a per-image "
                                 "activation; pick a layer that everything after it flows through (a whole block)")
        blank = np.zeros((1, *x.shape[1:]), x.dtype) if reads_images else None
        steps = np.full(len(x), eps) if eps is not None else frac * acts.std((1, 2, 3))
        steps[steps == 0] = 1.0  # a blank map: any step gives alpha 0 times nothing
        weights = np.stack([
            _channel_weights(run_head, name, acts[i], dict(zip(side, (e[i] for e in extras))), blank,
                             int(targets[i]), float(steps[i]))
            for i in range(len(x))
        ])  # (N, K)
    cam = np.maximum(np.einsum("nk,nkhw->nhw", weights, acts), 0)
    size = (x.shape[-1], x.shape[-2])
    # scaled twice, as pytorch-grad-cam does: per layer, then after averaging its (here one) layers
    return np.asarray(scale_cam_image(scale_cam_image(cam, size)), dtype=np.float32)


def _channel_weights(head: Any, name: str, a: np.ndarray, extras: dict[str, np.ndarray], blank: np.ndarray | None,
                     target: int, eps: float) -> np.ndarray:
    """alpha (K,) for one image's activations ``a`` (K, h, w): the central difference of logit ``target``
    along 1_k over h * w, the perturbed copies sent through the head in chunks of at most ``_CHUNK`` floats.
    ``extras``: the image's other activations the head reads; ``blank``: a (1, 3, S, S) image whose copies
    give a head that reads the input's shape the batch size it runs at."""
    k_all, h, w = a.shape
    per_run = max(1, _CHUNK // (2 * a.size))
    alphas = np.empty(k_all, np.float64)
    for k0 in range(0, k_all, per_run):
        ks = np.arange(k0, min(k0 + per_run, k_all))
        n = len(ks)
        rows = np.repeat(a[None], 2 * n, 0)  # (2n, K, h, w): n copies + eps * 1_k, then n copies - eps * 1_k
        rows[np.arange(n), ks] += eps
        rows[n + np.arange(n), ks] -= eps
        feed = {name: rows, **{s: np.repeat(e[None], 2 * n, 0) for s, e in extras.items()}}
        if blank is not None:
            feed[INPUT] = np.repeat(blank, 2 * n, 0)
        y = head.run([OUTPUT], feed)[0][:, target].astype(np.float64)
        alphas[ks] = (y[:n] - y[n:]) / (2 * eps * h * w)
    return alphas.astype(np.float32)
