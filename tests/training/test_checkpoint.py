"""Checkpoints keep the best weights across epochs without writing them again each time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fovea.training._checkpoint import load_checkpoint, save_checkpoint, snapshot


def _parts(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt, torch.Generator().manual_seed(seed)


def _save(run: Path, epoch: int, best_epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
          gen: torch.Generator, best: dict[str, torch.Tensor] | None) -> None:
    snap = snapshot(model=model, optimizer=opt, generator=gen, best=best)
    save_checkpoint(run, snap, {"epoch": epoch, "step": epoch * 10, "history": [], "best_score": 0.5,
                                "best_epoch": best_epoch, "stopped": False})


def test_best_weights_of_an_early_epoch_survive_later_checkpoints(tmp_path: Path) -> None:
    best_model, opt, gen = _parts(0)
    best = {k: v.clone() for k, v in best_model.state_dict().items()}
    _save(tmp_path, 1, 1, best_model, opt, gen, best=None)  # epoch 1 is the best: it is model.safetensors
    for epoch in (2, 3, 4):
        later, opt, gen = _parts(epoch)
        _save(tmp_path, epoch, 1, later, opt, gen, best=None)  # linked from the previous checkpoint
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-4"]

    model, opt, gen = _parts(99)
    state, restored = load_checkpoint(tmp_path, model=model, optimizer=opt, generator=gen)
    assert state["epoch"] == 4
    assert restored is not None
    for k, v in best.items():
        assert torch.equal(restored[k], v), k
    assert not torch.equal(model.state_dict()["0.weight"], best["0.weight"])  # the model is epoch 4's


def test_best_weights_are_written_when_no_checkpoint_holds_them(tmp_path: Path) -> None:
    model, opt, gen = _parts(1)
    best = {k: v + 1 for k, v in model.state_dict().items()}
    _save(tmp_path, 3, 2, model, opt, gen, best=best)
    _, restored = load_checkpoint(tmp_path, model=model, optimizer=opt, generator=gen)
    assert restored is not None and torch.equal(restored["0.bias"], best["0.bias"])


def test_missing_best_weights_are_an_error_not_a_silent_loss(tmp_path: Path) -> None:
    model, opt, gen = _parts(2)
    with pytest.raises(RuntimeError, match="best weights of epoch 2"):
        _save(tmp_path, 3, 2, model, opt, gen, best=None)


def test_packed_copy_round_trips_mixed_dtypes_and_odd_sizes() -> None:
    from fovea.training._checkpoint import pack

    tensors = {"w": torch.randn(7, 5), "h": torch.randn(3).half(), "b": torch.randn(4, 4).bfloat16().t(),
               "n": torch.tensor(12), "m": torch.rand(5) > 0.5, "d": torch.randn(3, dtype=torch.float64)}
    packed = pack(tensors, device=torch.device("cpu"))  # the byte path GPU checkpoints take
    assert len(packed.layout) == len(tensors) and not packed.extra
    out = packed.unpack()
    assert list(out) == list(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    assert len({out[k].untyped_storage().data_ptr() for k in out}) == len(out)  # safetensors needs this
