"""--time: the epochs follow the speed measured on this machine, and the schedule ends on time; --mode scratch
never fetches weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fovea
from fovea.errors import FoveaError
from fovea.training import lr_at
from fovea.training._callbacks import TimeBudget
from fovea.training._config import DEFAULT_CPU_TIME, TrainConfig, resolve


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(budget: TimeBudget, clock: Clock, *, step_s: Any, val_s: float = 1.0, steps: int = 15,
             epochs: int = 60) -> SimpleNamespace:
    """Drive the callback as the loop does, on a fake clock: ``step_s(epoch)`` seconds per training step."""
    fit = SimpleNamespace(cfg=SimpleNamespace(epochs=epochs, batch_size=128), history=[], steps_per_epoch=steps,
                          epoch=0, step=0, val=[0] * 1000, val_seconds=0.0)
    budget.before_fit(fit)  # type: ignore[arg-type]
    while fit.epoch < fit.cfg.epochs:
        for _ in range(steps):
            clock.t += step_s(fit.epoch)
            fit.step += 1
            budget.after_batch(fit)  # type: ignore[arg-type]
        clock.t += val_s
        fit.val_seconds = val_s
        fit.history.append({"epoch": fit.epoch + 1})
        budget.after_epoch(fit)  # type: ignore[arg-type]
        fit.epoch += 1
    return fit


def test_the_plan_fills_the_budget_and_ends_before_the_deadline() -> None:
    clock = Clock()
    finish = 10.0
    budget = TimeBudget(deadline=200.0, cap=None, finish=lambda fit, fwd: finish, clock=clock)
    fit = simulate(budget, clock, step_s=lambda e: 0.4)  # 7 s per epoch
    assert fit.cfg.epochs == len(fit.history)  # the schedule's length is what ran: it ended, not cut off
    assert clock.t + finish <= 200.0  # training and the end of the run fit
    assert clock.t + finish > 200.0 - 7.0  # and the budget is used: less than one epoch is left over
    assert len(fit.history) == 27  # (200 - 10) // 7


def test_a_machine_that_slows_down_shortens_the_run() -> None:
    clock = Clock()
    budget = TimeBudget(deadline=200.0, cap=None, finish=lambda fit, fwd: 10.0, clock=clock)
    fit = simulate(budget, clock, step_s=lambda e: 0.4 if e < 5 else 0.8)  # twice as slow from epoch 6
    assert fit.cfg.epochs == len(fit.history) < 27
    assert clock.t + 10.0 <= 200.0 + 13.0  # over by at most the one epoch in which it slowed down (13 s)


def test_a_run_out_of_time_still_ends_on_an_annealing_epoch() -> None:
    """When the budget runs out mid-plan, the last epoch runs on the shortened plan, so its schedule ends."""
    clock = Clock()
    plans: list[int] = []  # the plan each epoch started on

    class Recording(TimeBudget):
        def before_epoch(self, fit: Any) -> None:
            plans.append(int(fit.cfg.epochs))

    budget = Recording(deadline=200.0, cap=None, finish=lambda fit, fwd: 10.0, clock=clock)
    fit = SimpleNamespace(cfg=SimpleNamespace(epochs=60, batch_size=128), history=[], steps_per_epoch=15,
                          epoch=0, step=0, val=[0] * 1000, val_seconds=0.0)
    budget.before_fit(fit)  # type: ignore[arg-type]
    while fit.epoch < fit.cfg.epochs:
        budget.before_epoch(fit)
        for _ in range(15):
            clock.t += 0.4 if fit.epoch < 5 else 20.0  # from epoch 6 one epoch eats the whole budget
            fit.step += 1
            budget.after_batch(fit)  # type: ignore[arg-type]
        clock.t += 1.0
        fit.val_seconds = 1.0
        fit.history.append({"epoch": fit.epoch + 1})
        budget.after_epoch(fit)  # type: ignore[arg-type]
        fit.epoch += 1
    assert plans[1] == 27 and len(fit.history) == 7  # planned 27; out of time after the 6th
    assert plans[-1] == len(fit.history) == fit.cfg.epochs  # the 7th ran on the plan it ended: lr at its end


def test_a_cap_limits_the_epochs_and_a_tiny_budget_still_trains_one() -> None:
    clock = Clock()
    fit = simulate(TimeBudget(200.0, 5, lambda fit, fwd: 10.0, clock=clock), clock, step_s=lambda e: 0.4)
    assert len(fit.history) == fit.cfg.epochs == 5
    clock = Clock()
    fit = simulate(TimeBudget(3.0, None, lambda fit, fwd: 10.0, clock=clock), clock, step_s=lambda e: 0.4)
    assert len(fit.history) == fit.cfg.epochs == 1


def test_the_default_budget_applies_on_a_cpu_without_epochs() -> None:
    def run(device: str, **kw: Any) -> TrainConfig:
        return resolve(TrainConfig(data="d", model="cnn", **kw), device_type=device, n_train=2000, source="fovea",
                       native_size=64, cpu_bf16=False)[0]

    assert run("cpu").time == DEFAULT_CPU_TIME and run("cpu").epochs == 60  # 60: the most the budget may run
    assert run("cpu", epochs=7).time is None  # a fixed number of epochs: no budget
    assert run("cuda").time is None
    assert run("cpu", time=30.0).time == 30.0


def test_a_time_budget_sets_the_epochs_and_the_schedule_ends(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, model="cnn", image_size=32, time=12.0, extra={"widths": (8, 16, 16, 16)},
                      out=str(tmp_path / "run"), progress=False)
    config = json.loads((run / "train_config.json").read_text())
    history = list(csv.DictReader((run / "history.csv").open()))
    # what the budget planned is what ran: as many epochs as fit in 12 s on this machine (1 on a loaded 2-core
    # machine, 129 on an idle one: with --time and no --epochs the budget alone decides)
    assert config["epochs"] == len(history) >= 1
    steps = int(history[-1]["epoch"]) * (80 // config["batch_size"])
    last = lr_at(steps - 1, steps, config["lr"], "onecycle")
    assert float(history[-1]["lr"]) == pytest.approx(last, rel=1e-6)  # the one-cycle schedule's own end
    assert json.loads((run / "model.json").read_text())["training"]["epochs"] == len(history)


def test_time_must_be_positive() -> None:
    with pytest.raises(FoveaError, match="--time"):
        TrainConfig(data="d", time=0).validate()


def test_scratch_never_fetches_weights(tiny_pets: Path, tmp_path: Path) -> None:
    """A timm architecture trained --mode scratch starts from random weights: no download (none is possible here)."""
    run = fovea.train(tiny_pets, model="resnet18", mode="scratch", epochs=1, image_size=32,
                      out=str(tmp_path / "r18"), progress=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["training"]["pretrained"] is False and meta["transfer"]["mode"] == "scratch"
    for given, match in (({"pretrained": True}, "--pretrained"), ({"weights": str(run)}, "--weights")):
        with pytest.raises(FoveaError, match=f"--mode scratch starts from random weights, so {match}"):
            fovea.train(tiny_pets, model="resnet18", mode="scratch", epochs=1, out=str(tmp_path / "x"), **given)
