"""``fovea summary``: a model's layers with their output shapes, parameters and FLOPs, and the totals.

One forward pass of a dummy (1, 3, S, S) image under ``torch.utils.flop_counter.FlopCounterMode``, with a
pre- and a post-forward hook on every module. The counter's running total read in the two hooks gives the
FLOPs of each call, sub-layers included; a layer's own FLOPs are that minus its sub-layers' calls, so that
the own counts of all layers add up to the model's total exactly: a container is never counted twice, nor
is a module called twice (its calls add up in one row). Parameters are likewise each layer's own
(``recurse=False``), each tensor counted once even where two layers share it. Showing the tree only down to
``depth`` folds everything deeper into its ancestor at that depth, so the columns still add up to the totals.

FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix products (a convolution's
weight shape (c_out, c_in / groups, k, k), so grouped and depthwise convolutions are counted right); bias
adds, norms, activations and pooling are not counted. This is what ``fovea compare`` reports too.

Why not torchinfo: it would be a new dependency, and it derives mult-adds from each module's parameters and
output size, so products outside a Linear or a Conv (attention's q·kᵀ) are missed and its figures would not be
``fovea compare``'s. torch's own counter counts by operator, whatever module runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.errors import FoveaError

ROOT = ""  # the model itself: the name named_modules() gives it
NOTES = ("params and FLOPs of a row are the layer's own: for a layer with its sub-layers listed below it, "
         "only what is not in them; for a layer at the --depth limit, everything inside it. FLOPs: one "
         "image's forward pass, 2 per multiply-add of the convolutions and matrix products "
         "(torch.utils.flop_counter); norms, activations, pooling and bias adds are not counted.")


@dataclass
class Layer:
    """One module of the model: what it outputs, what it holds and what it computes."""

    name: str  # as in the state dict ("layer1.0.conv1"); "" is the model itself
    type: str  # the module's class name
    depth: int  # 0 the model, 1 its children, ...
    output_shape: list[int] | list[list[int]] | None  # first call's; a list per tensor of a tuple; None: not called
    parameters: int
    trainable_parameters: int
    flops: int
    calls: int  # times the forward pass called it (0: never; its parameters still count)


@dataclass
class Summary:
    """A model's layers, pre-order (every layer before its sub-layers), and its totals."""

    model: str
    source: str  # fovea | timm | torchvision | run | module
    image_size: int
    num_classes: int | None
    layers: list[Layer]
    input_shape: list[int] = field(default_factory=list)
    param_bytes: int = 0  # of the parameters, as stored (4 per float32)
    # The course's parameter formulas where the model writes them out (recurrent cells), one line per layer
    formulas: list[str] = field(default_factory=list)
    # Estimated operations torch's counter does not see (a classical model's handcrafted features), in the model's
    # row and the total; 0 for networks, whose every FLOP torch counts
    uncounted_flops: int = 0

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def trainable_parameters(self) -> int:
        return sum(layer.trainable_parameters for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def output_shape(self) -> Any:
        return self.layers[0].output_shape

    def at_depth(self, depth: int | None = None) -> list[Layer]:
        """The layers down to ``depth`` (None: all); each deeper layer's counts are added to its ancestor's."""
        if depth is None:
            return list(self.layers)
        if depth < 0:
            raise FoveaError(f"--depth must be 0 (the model as one row) or more, not {depth}")
        shown = {layer.name: Layer(**asdict(layer)) for layer in self.layers if layer.depth <= depth}
        for layer in self.layers:
            if layer.depth > depth:
                top = shown[".".join(layer.name.split(".")[:depth])]
                top.parameters += layer.parameters
                top.trainable_parameters += layer.trainable_parameters
                top.flops += layer.flops
        return list(shown.values())

    @property
    def notes(self) -> str:
        """What a row's counts mean: a table of them should say so."""
        if not self.uncounted_flops:
            return NOTES
        return (NOTES + f" The model's own row includes {self.uncounted_flops:,} operations of its handcrafted features "
                "(and naive Bayes' elementwise sums), computed outside torch's counter and estimated from the "
                "algorithm; its parameters are the fitted arrays (standardisation, classifier), none trained by "
                "gradient.")

    def cells(self, depth: int | None = None) -> list[list[str]]:
        """The layer table as text, one row per layer down to ``depth``: name (indented), type, output shape,
        parameters, FLOPs."""
        rows = []
        for layer in self.at_depth(depth):
            name = "(model)" if layer.name == ROOT else "  " * (layer.depth - 1) + layer.name
            if layer.calls > 1:
                name += f" (x{layer.calls})"
            rows.append([name, layer.type, _shape_cell(layer.output_shape, layer.calls),
                         f"{layer.parameters:,}" if layer.parameters else "-", f"{layer.flops:,}" if layer.flops else "-"])
        return rows

    def footer(self) -> list[str]:
        return ["total", "", _shape_cell(self.output_shape), f"{self.parameters:,}", f"{self.flops:,}"]

    def totals(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "trainable_parameters": self.trainable_parameters,
                "flops": self.flops, "gflops": self.flops / 1e9, "param_mb": self.param_bytes / 1e6}

    def to_dict(self, depth: int | None = None) -> dict[str, Any]:
        return {"model": self.model, "source": self.source, "image_size": self.image_size,
                "num_classes": self.num_classes, "input_shape": self.input_shape, "output_shape": self.output_shape,
                "depth": depth, "layers": [asdict(layer) for layer in self.at_depth(depth)], "totals": self.totals(),
                "formulas": self.formulas, "uncounted_flops": self.uncounted_flops}


def summarize(
    model: str | Path | nn.Module,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    arch: dict[str, Any] | None = None,
) -> Summary:
    """Output shape, parameters and FLOPs of every layer of ``model`` for one image, and the totals.

    Args:
        model: a Fovea run folder (model.json + model.safetensors), an architecture name (``fovea models``:
            mlp, cnn, any timm name, alexnet, googlenet; built with pretrained=False) or an ``nn.Module``.
        image_size: square input size in px. Default: the run's; else the architecture's own (timm's
            pretrained_cfg input size, e.g. 224 for resnet18 and 299 for inception_v3; 64 for cnn, 32 for mlp).
        num_classes: classes of the head built for an architecture name. Default: 1000 (ImageNet, the
            published counts) for timm and torchvision; 2 for Fovea's own models, made for a few classes.
            A run folder has its own classes.
        arch: the architecture's options for a name (``fovea train --arch``, e.g. ``{"widths": [8, 16, 32, 64]}``);
            a run folder has its own.
    """
    if image_size is not None and image_size < 1:
        raise FoveaError(f"--image-size must be at least 1 px, not {image_size}")
    if num_classes is not None and num_classes < 1:
        raise FoveaError(f"--num-classes must be at least 1, not {num_classes}")
    if isinstance(model, nn.Module):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        return _summarize(model, label=type(model).__name__, source="module", image_size=size, num_classes=None)
    from fovea.artifact import META, read_meta
    from fovea.models._architectures import create_model, default_config, source_of

    path, name = Path(model), str(model)
    if path.is_dir() and (path / META).is_file():
        if arch:
            raise FoveaError(f"--arch: the run {path} has its own architecture options; --arch is for architecture "
                             "names")
        return _summarize_run(path, image_size, num_classes)
    try:
        source = source_of(name)
    except FoveaError:  # not an architecture: say what is wrong with it as a path, if it is one
        if path.is_dir():
            read_meta(path)  # raises: "... is not a Fovea model: no model.json"
        if path.exists():
            raise FoveaError(f"{name} is a file; give a run folder (model.json + model.safetensors) or an "
                             "architecture name (`fovea models`)") from None
        if "/" in name or "\\" in name:
            raise FoveaError(f"{name}: no such run folder (nor an architecture name: `fovea models`)") from None
        raise  # unknown model, with "did you mean"
    size = image_size or int(default_config(name)["input_size"])
    classes = num_classes or (2 if source == "fovea" else 1000)
    net = create_model(name, classes, image_size=size, pretrained=False, **(arch or {}))
    return _summarize(net, label=name, source=source, image_size=size, num_classes=classes)


def _summarize_run(path: Path, image_size: int | None, num_classes: int | None) -> Summary:
    """A run folder's network, rebuilt from its model.json (shapes, parameters and FLOPs do not depend on the
    weights' values, so the weights are not read: a compressed artifact is summarised as its architecture)."""
    from fovea.artifact import read_meta
    from fovea.models._architectures import create_model

    meta = read_meta(path)  # FoveaError: not a Fovea model folder
    members = (meta.get("ensemble") or {}).get("members")
    if members:
        raise FoveaError(f"{path} is an ensemble of {len(members)} models, not one network; summarize a member, "
                         f"e.g. fovea summary {path / str(members[0])}")
    if num_classes is not None and num_classes != len(meta["classes"]):
        raise FoveaError(f"--num-classes {num_classes}: the run {path} has {len(meta['classes'])} classes; "
                         "--num-classes is for architecture names")
    arch, size = meta["architecture"], int(meta["preprocessing"]["image_size"])
    net = create_model(arch["name"], len(meta["classes"]), image_size=size, **arch.get("kwargs", {}))
    return _summarize(net, label=f"{path} ({arch['name']})", source="run", image_size=image_size or size,
                      num_classes=len(meta["classes"]))


def _shape(out: Any) -> list[int] | list[list[int]] | None:
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return [list(t.shape) for t in out]
    return None


def _flop_counter() -> Any:
    """torch's FLOP counter, taught the CPU's attention kernel and oneDNN's LSTM layer.

    torch 2.11 has a formula for the CUDA attention kernels (flash, efficient, cudnn) but not for the one
    ``scaled_dot_product_attention`` runs on a CPU, so a ViT's attention counted 0 FLOPs there (vit_tiny:
    2.15 instead of 2.51 GFLOPs at 224 px). Its formula is the same two matrix products: torch's own.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def rnn_layer(input: Any, w_ih: Any, w_hh: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        """oneDNN's fused LSTM layer (what nn.LSTM runs on a CPU; torch counts it as 0): at every step, the input
        and the previous hidden state times their weights, (G h x d) and (G h x h), 2 FLOPs per multiply-add."""
        from math import prod

        steps = prod(input) // input[-1]  # batch x time (torch hands the formula shapes, not tensors)
        return 2 * steps * (prod(w_ih) + prod(w_hh))

    mapping: dict[Any, Any] = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        mapping[cpu_attention] = sdpa
    onednn_rnn = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)
    if onednn_rnn is not None:
        mapping[onednn_rnn] = rnn_layer
    return FlopCounterMode(display=False, custom_mapping=mapping or None)


def _summarize(net: nn.Module, *, label: str, source: str, image_size: int, num_classes: int | None) -> Summary:
    layers: dict[nn.Module, Layer] = {}
    seen: set[int] = set()  # a parameter shared by two layers counts once, in the first
    param_bytes = 0
    for name, m in net.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        param_bytes += sum(p.numel() * p.element_size() for p in own)
        depth = name.count(".") + 1 if name else 0
        layers[m] = Layer(name, type(m).__name__, depth, None, sum(p.numel() for p in own),
                          sum(p.numel() for p in own if p.requires_grad), 0, 0)

    counter = _flop_counter()
    stack: list[list[int]] = []  # per call in progress: [counter total at its start, FLOPs of its sub-calls]

    def before(m: nn.Module, args: Any) -> None:
        stack.append([counter.get_total_flops(), 0])

    def after(m: nn.Module, args: Any, out: Any) -> None:
        start, inner = stack.pop()
        total = counter.get_total_flops() - start
        if stack:
            stack[-1][1] += total
        layer = layers[m]
        layer.flops += total - inner
        layer.calls += 1
        if layer.calls == 1:
            layer.output_shape = _shape(out)

    first = next(net.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=first.device if first is not None else "cpu",
                    dtype=first.dtype if first is not None and first.is_floating_point() else torch.float32)
    handles = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    was_training = net.training
    net.eval()  # batch norm on a batch of one, dropout off: the forward pass inference runs
    try:
        with torch.no_grad(), counter:
            net(x)
    # An mlp built for 32 px given 64 px, a kernel larger than the map (RuntimeError), a ViT given another
    # size than its position embeddings (timm asserts): the size does not suit the model, which is the user's to fix.
    except (RuntimeError, AssertionError, ValueError) as e:
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise FoveaError(f"{label} cannot take a {image_size}x{image_size} px image: {detail}") from e
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    own_flops = getattr(net, "uncounted_flops", None)  # a classical model's features: estimated, not counted
    uncounted_flops = int(own_flops()) if callable(own_flops) else 0
    layers[net].flops += uncounted_flops
    formulas = getattr(net, "parameter_formulas", None)
    return Summary(label, source, image_size, num_classes, list(layers.values()),
                   input_shape=list(x.shape), param_bytes=param_bytes,
                   formulas=list(formulas()) if callable(formulas) else [], uncounted_flops=uncounted_flops)


def _shape_cell(shape: Any, calls: int = 1) -> str:
    if calls == 0:
        return "not called"
    if shape is None:
        return "-"  # not a tensor (a dict, None, ...)
    if shape and isinstance(shape[0], list):
        return ", ".join(str(s) for s in shape)
    return str(shape)
