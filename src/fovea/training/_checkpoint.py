"""Checkpoints that describe themselves, with no pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``ckpt-EPOCH`` holding model, optimizer and RNG tensors plus ``state.json``;
``checkpoint.json`` points at the newest complete one and is replaced atomically, so a ``kill -9`` at any
moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

POINTER = "checkpoint.json"


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's tensors (left where they are) and its JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


@dataclass
class Packed:
    """Tensors copied to the host as one byte buffer; ``unpack()`` (on the writer thread) splits them."""

    data: torch.Tensor  # uint8, on the host
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]  # name, dtype, shape, offset, bytes
    extra: dict[str, torch.Tensor]  # tensors that were on the host already (e.g. Adam's step counts), cloned

    def unpack(self) -> dict[str, torch.Tensor]:
        # clone() per tensor: its own storage (safetensors refuses shared ones) at offset 0 (so the dtype
        # view is aligned).
        out = {k: self.data[o:o + n].clone().view(dtype).reshape(shape) for k, dtype, shape, o, n in self.layout}
        return {**out, **self.extra}


def pack(tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> Packed:
    """Gather tensors into one buffer on their device, then copy it to the host in one transfer.

    A state dict is ~100-300 tensors; copying each to the host on its own synchronises every time, and
    together with the host-side copies that cost ~0.13 s per checkpoint for resnet18 on the H200 (most
    of an epoch of pets at 224 px).
    """
    if device is None:  # the accelerator they live on
        device = next((v.device for v in tensors.values() if v.device.type != "cpu"), torch.device("cpu"))
    on_device = {k: v for k, v in tensors.items() if v.device == device}
    if any(v.device.type != "cpu" for k, v in tensors.items() if k not in on_device):
        raise ValueError("pack() takes tensors on one accelerator (and the host)")
    extra = {k: v.detach().clone().contiguous() for k, v in tensors.items() if k not in on_device}
    items = [(k, v.detach().contiguous()) for k, v in on_device.items()]
    layout, offset = [], 0
    for k, v in items:
        nbytes = v.numel() * v.element_size()
        layout.append((k, v.dtype, tuple(v.shape), offset, nbytes))
        offset += nbytes
    if not items:
        return Packed(torch.zeros(0, dtype=torch.uint8), [], extra)
    flat = torch.cat([v.reshape(-1).view(torch.uint8) for _, v in items])
    return Packed(flat.cpu(), layout, extra)


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | Packed:
    """Copy to host memory now. GPU tensors (on one device) are packed; CPU ones are simply cloned."""
    devices = {v.device for v in tensors.values() if v.device.type != "cpu"}
    if len(devices) == 1:
        return pack(tensors)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _tensors(x: dict[str, torch.Tensor] | Packed) -> dict[str, torch.Tensor]:
    return x.unpack() if isinstance(x, Packed) else x


def snapshot(
    *, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
    best: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Copy everything a checkpoint needs to host memory now, so it can be written later on another thread.

    ``best`` is None when the newest checkpoint on disk already holds the best weights (they are then
    linked, not written again).
    """
    opt_tensors, opt_rest = _optimizer_split(optimizer)
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state().cpu()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": _host(model.state_dict()), "optimizer": _host(opt_tensors), "optimizer_rest": opt_rest,
            "rng": rng, "best": _host(best) if best is not None else None}


def _best_file(folder: Path, best_epoch: int) -> Path | None:
    """Where checkpoint ``folder`` keeps the weights of epoch ``best_epoch``, if it has them."""
    state_file = folder / "state.json"
    if not state_file.exists():
        return None
    if json.loads(state_file.read_text())["epoch"] == best_epoch:
        return folder / "model.safetensors"
    return folder / "best.safetensors" if (folder / "best.safetensors").exists() else None


def save_checkpoint(run: Path, snap: dict[str, Any], state: dict[str, Any]) -> None:
    epoch, best_epoch = state["epoch"], state["best_epoch"]
    folder = run / f"ckpt-{epoch}"
    previous = run / json.loads((run / POINTER).read_text())["folder"] if (run / POINTER).exists() else None
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_file(_tensors(snap["model"]), str(folder / "model.safetensors"))
    save_file(_tensors(snap["optimizer"]), str(folder / "optimizer.safetensors"))
    save_file(snap["rng"], str(folder / "rng.safetensors"))
    if best_epoch and best_epoch != epoch:  # else best == model.safetensors (or there is no best yet)
        source = _best_file(previous, best_epoch) if previous is not None and previous != folder else None
        if source is not None:
            try:
                os.link(source, folder / "best.safetensors")  # the same bytes as last epoch: no second write
            except OSError:
                shutil.copyfile(source, folder / "best.safetensors")
        elif snap["best"] is not None:
            save_file(_tensors(snap["best"]), str(folder / "best.safetensors"))
        else:
            raise RuntimeError(f"checkpoint {folder}: best weights of epoch {best_epoch} are neither given nor on disk")
    (folder / "state.json").write_text(json.dumps({**state, "optimizer": snap["optimizer_rest"]}, default=float))
    tmp = run / (POINTER + ".tmp")
    tmp.write_text(json.dumps({"folder": folder.name, "epoch": epoch}))
    os.replace(tmp, run / POINTER)
    for old in run.glob("ckpt-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    run: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and RNGs in place; returns (state, best weights or None)."""
    pointer = json.loads((run / POINTER).read_text())
    folder = run / pointer["folder"]
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    optimizer.load_state_dict(_optimizer_join(load_file(str(folder / "optimizer.safetensors")), state.pop("optimizer")))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"].to(generator.get_state().device))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    best_file = folder / "best.safetensors"
    if best_file.exists():
        best = load_file(str(best_file))
    elif state.get("best_epoch") == state["epoch"]:
        best = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        best = None
    return state, best


def has_checkpoint(run: Path) -> bool:
    return (run / POINTER).exists()


def remove_checkpoints(run: Path) -> None:
    for old in run.glob("ckpt-*"):
        shutil.rmtree(old, ignore_errors=True)
    (run / POINTER).unlink(missing_ok=True)
