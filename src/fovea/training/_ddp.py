"""Distributed data-parallel training: `torchrun --nproc-per-node N -m fovea train DATA …` (and --nnodes).

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; PyTorch's
``DistributedDataParallel`` all-reduces the gradients (NCCL on GPUs, gloo on CPUs). Fovea adds what a run needs
around it: each process takes its share of every global batch of the same shuffled order (``Batches(shard=…)``),
so ``--batch-size`` is the global batch and the learning rate the one chosen for it; rank 0 alone evaluates,
writes checkpoints, history, the artifact and the report, and its decisions (the epochs a time budget plans, an
early stop) reach the others by broadcast, so every process runs the same number of steps.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fovea.errors import FoveaError
from fovea.training._fit import Callback, Fit

log = logging.getLogger("fovea.training")


@dataclass(frozen=True)
class Group:
    """This process's place in a distributed run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def join(device: str) -> Group:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a plain run gets ``Group()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FoveaError("--device cuda, but this machine has no CUDA GPU")
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))  # rank 0 decodes while the others wait
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_rank() != 0:
        logging.getLogger("fovea").setLevel(logging.WARNING)  # rank 0 tells the story; the others only warn
    return Group(dist.get_rank(), dist.get_world_size(), local_rank,
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), backend)


def device_of(group: Group, device: torch.device) -> torch.device:
    return torch.device("cuda", group.local_rank) if group.active and device.type == "cuda" else device


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def share(group: Group, value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    if not group.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Distributed(Callback):
    """Wraps the trained module in DistributedDataParallel (again whenever the set of trainable parameters changes,
    as when fine-tuning unfreezes the body: DDP registers its hooks on the parameters that train when it is built)
    and hands rank 0's plan to every process: the epochs (a time budget re-plans during the first epoch and after
    each) and the stop flag. Goes last in the callbacks, after those that decide."""

    def __init__(self, group: Group, module: nn.Module, device: torch.device) -> None:
        self.group, self.module, self.device = group, module, device
        self._trainable: tuple[bool, ...] = ()
        self.net: nn.Module = module

    def wrap(self) -> None:
        trainable = tuple(p.requires_grad for p in self.module.parameters())
        if trainable != self._trainable:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.module, device_ids=ids)
            self._trainable = trainable

    def before_fit(self, fit: Fit) -> None:
        self.wrap()

    def before_epoch(self, fit: Fit) -> None:
        self.wrap()

    def _sync(self, fit: Fit) -> None:
        plan = torch.tensor([int(fit.cfg.epochs or 1), int(fit.stop)], dtype=torch.int64,
                            device=self.device if self.group.backend == "nccl" else "cpu")
        dist.broadcast(plan, src=0)
        fit.cfg.epochs, fit.stop = int(plan[0]), bool(plan[1])

    def after_batch(self, fit: Fit) -> None:
        if fit.epoch == 0:  # a time budget plans during the first epoch, from rank 0's timings
            self._sync(fit)

    def after_epoch(self, fit: Fit) -> None:
        self._sync(fit)
