"""PyTorch artifacts: weights in safetensors (float32, fp16/bf16 downcasts, int8 weights), and inference."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.artifact import FORMAT, WEIGHTS, write_meta
from fovea.errors import FoveaError
from fovea.runtime._predictor import Network


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA or CPU when enabled, else a no-op: one code path for both (nanoGPT)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def infer(
    net: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp: bool = False,
    tta: bool = False,
    batch_size: int = 256,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits (N, C) float32 on CPU for uint8 images (N, 3, S, S); ``tta`` averages with the mirror image.

    ``dtype`` is the network's own (an fp16/bf16 artifact's); the input is cast to it, without autocast.
    """
    from fovea.data import norm_coefficients, normalize

    was_training = net.training
    net.eval()
    out = []
    coef = norm_coefficients(tuple(mean), tuple(std), device)
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size].to(device, non_blocking=True), tuple(mean), tuple(std), coef)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dtype)
        with autocast(device, amp):
            logits = net(x).float()
            if tta:
                logits = (logits.log_softmax(1) + net(x.flip(3)).float().log_softmax(1)) / 2
        out.append(logits)
    net.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)


def save_model(out: str | Path, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a PyTorch artifact: the weights + model.json into ``out``. ``meta`` needs architecture, classes,
    preprocessing."""
    from safetensors.torch import save_file

    if "architecture" not in meta:
        raise ValueError("model metadata needs 'architecture'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    write_meta(out, meta)
    return out


def decode_state(state: dict[str, torch.Tensor], compression: dict[str, Any], device: torch.device,
                 where: Path) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """A compressed safetensors state back to loadable tensors, and the dtype the network should compute in.

    fp16/bf16 compute in their own dtype where the device does natively (any CUDA GPU; on a CPU, the
    AVX512/AMX instructions for it), else in float32; int8 weights are dequantized to float32.
    """
    from fovea._system import hardware
    from fovea.runtime.int8 import dequantize_state

    method = compression.get("method")
    if method in ("fp16", "bf16"):
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        name = "float16" if method == "fp16" else "bfloat16"
        native = device.type == "cuda" or hardware().native(name, "cpu")
        return state, dtype if native else torch.float32
    if method in ("int8-sym", "int8-asym"):
        return dequantize_state(state), torch.float32
    raise FoveaError(f"{where}: compression {method!r} is not one this Fovea knows; upgrade fovea")


class TorchModel(Network):
    """A loaded artifact with PyTorch weights; ``net`` is the network.

    Compressed weight files load here too (``fovea compress``): fp16/bf16 weights run in their own dtype where
    the hardware does it natively (any CUDA GPU; a CPU with AVX512-BF16/AMX for bf16, AVX512-FP16/AMX-FP16 for
    fp16) and in float32 elsewhere; int8 weights are dequantized to float32 once, at load.
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from fovea.models import create_model

        super().__init__(path, device, meta, unknown)
        arch = self.meta["architecture"]
        self.net = create_model(arch["name"], len(self.classes), image_size=self.image_size, **arch.get("kwargs", {}))
        try:
            state = load_file(str(self.path / WEIGHTS))
        except (OSError, SafetensorError) as e:
            raise FoveaError(f"cannot read weights {self.path / WEIGHTS}: {e}") from e
        self.dtype = torch.float32  # the dtype the network computes in
        compression = self.meta.get("compression")
        if compression:
            state, self.dtype = decode_state(state, compression, self.device, where=self.path / WEIGHTS)
        expected = self.net.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise FoveaError(
                f"{self.path / WEIGHTS} does not match architecture {arch['name']} with {len(self.classes)} classes: "
                f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
            )
        self.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        self.net.to(self.device, self.dtype).eval()
        self.amp = self.device.type == "cuda" and self.dtype == torch.float32
        self.load_unknown(exposes_embedding=self._classifier() is not None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return infer(self.net, images, mean=self.mean, std=self.std, device=self.device, amp=self.amp, dtype=self.dtype)

    def _classifier(self) -> nn.Module | None:
        getter = getattr(self.net, "get_classifier", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def _stage_modules(self) -> list[nn.Module]:
        """The network's feature stages, whose activation statistics an unknown score may read: the stem and
        each stage of Fovea's cnn; for timm models, the modules their ``feature_info`` names."""
        stem, stages = getattr(self.net, "stem", None), getattr(self.net, "stages", None)
        if isinstance(stem, nn.Module) and isinstance(stages, nn.Sequential):
            return [stem, *stages]
        info = getattr(self.net, "feature_info", None)
        named = dict(self.net.named_modules())
        if isinstance(info, list):
            return [named[f["module"]] for f in info if isinstance(f, dict) and f.get("module") in named]
        return []

    def _views(self, x: torch.Tensor, views: int, embed: bool,
               stages: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Raw logits (V, N, C) and, when asked, the classifier's input (timm's ``pre_logits``) (V, N, D) and each
        feature stage's per-channel mean and standard deviation over positions (V, N, F), in one forward pass over
        the images and, with ``views`` 2, their mirrors."""
        batch = torch.cat([x, x.flip(3)]) if views == 2 else x
        head = self._classifier() if embed else None
        modules = self._stage_modules() if stages else []
        seen: list[torch.Tensor] = []
        stats: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(modules))}

        def grab(module: nn.Module, args: Any, out: Any) -> None:
            seen.append(args[0].detach().float().reshape(len(args[0]), -1).cpu())

        def stage(i: int) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and out.ndim == 4:  # (B, C, H, W)
                    a = out.detach().float()
                    stats[i].append(torch.cat([a.mean((2, 3)), a.std((2, 3))], 1).cpu())  # (B, 2C)
            return hook

        handles = [head.register_forward_hook(grab)] if head is not None else []
        handles += [m.register_forward_hook(stage(i)) for i, m in enumerate(modules)]
        try:
            logits = self.forward(batch).float()
        finally:
            for h in handles:
                h.remove()
        emb = torch.cat(seen).reshape(views, len(x), -1) if head is not None else None
        parts = [torch.cat(v) for v in stats.values() if v]
        stage_stats = torch.cat(parts, 1).reshape(views, len(x), -1) if parts else None
        return logits.reshape(views, len(x), -1), emb, stage_stats
