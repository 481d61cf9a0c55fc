"""Checkpoints that describe themselves, with no pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``ckpt-EPOCH`` holding model, optimizer and RNG tensors plus ``state.json``;
``checkpoint.json`` points at the newest complete one and is replaced atomically, so a ``kill -9`` at any
moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

POINTER = "checkpoint.json"


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def snapshot(
    *, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
    best: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Copy everything a checkpoint needs to host memory now, so it can be written later on another thread."""
    opt_tensors, opt_rest = _optimizer_split(optimizer)
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state().cpu()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": _host(model.state_dict()), "optimizer": _host(opt_tensors), "optimizer_rest": opt_rest,
            "rng": rng, "best": _host(best) if best is not None else None}


def save_checkpoint(run: Path, snap: dict[str, Any], state: dict[str, Any]) -> None:
    epoch = state["epoch"]
    folder = run / f"ckpt-{epoch}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_file(snap["model"], str(folder / "model.safetensors"))
    save_file(snap["optimizer"], str(folder / "optimizer.safetensors"))
    save_file(snap["rng"], str(folder / "rng.safetensors"))
    if snap["best"] is not None and state["best_epoch"] != epoch:  # else best == model.safetensors
        save_file(snap["best"], str(folder / "best.safetensors"))
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
