"""Learning-rate schedules: values computed by hand from the formulas in the docstring of lr_at."""

from __future__ import annotations

import pytest

from fovea.training import lr_at

PEAK = 0.4


def test_onecycle_starts_at_peak_over_25() -> None:
    assert lr_at(0, 101, PEAK, "onecycle") == pytest.approx(PEAK / 25)


def test_onecycle_reaches_peak_at_end_of_warmup() -> None:
    # total 101 -> t = step / 100; warm-up is the first quarter, so step 25 is its end.
    assert lr_at(25, 101, PEAK, "onecycle") == pytest.approx(PEAK)


def test_onecycle_warmup_is_linear() -> None:
    # step 10: t = 0.1, 0.4 of the way from peak/25 to peak.
    start = PEAK / 25
    assert lr_at(10, 101, PEAK, "onecycle") == pytest.approx(start + (PEAK - start) * 0.4)


def test_onecycle_cosine_half_way_down() -> None:
    # total 201: warm-up ends at step 50; half-way through the decay (p = 0.5) is step 125,
    # where the cosine is at the mean of peak and the floor.
    end = PEAK / 1e4
    assert lr_at(125, 201, PEAK, "onecycle") == pytest.approx((PEAK + end) / 2)


def test_onecycle_ends_at_peak_over_1e4() -> None:
    assert lr_at(100, 101, PEAK, "onecycle") == pytest.approx(PEAK / 1e4)
    # Past the end it stays at the floor instead of rising again.
    assert lr_at(150, 101, PEAK, "onecycle") == pytest.approx(PEAK / 1e4)


def test_onecycle_rises_then_falls_monotonically() -> None:
    total = 97
    lrs = [lr_at(s, total, PEAK, "onecycle") for s in range(total)]
    top = max(range(total), key=lrs.__getitem__)
    assert lrs[top] == pytest.approx(PEAK, rel=1e-3)
    assert all(a < b for a, b in zip(lrs[:top], lrs[1 : top + 1])), "warm-up must increase"
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1 :])), "after the peak it must not increase"
    assert min(lrs) == pytest.approx(PEAK / 1e4)


def test_cosine_values() -> None:
    # 5 % linear warm-up from 0, then a cosine from peak down to 0.
    assert lr_at(0, 101, PEAK, "cosine") == pytest.approx(0.0)
    assert lr_at(2, 101, PEAK, "cosine") == pytest.approx(PEAK * 0.4)  # t = 0.02 = 0.4 of the warm-up
    assert lr_at(5, 101, PEAK, "cosine") == pytest.approx(PEAK)
    assert lr_at(105, 201, PEAK, "cosine") == pytest.approx(PEAK / 2)  # t = 0.525: half-way down
    assert lr_at(100, 101, PEAK, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_cosine_decreases_after_warmup() -> None:
    lrs = [lr_at(s, 101, PEAK, "cosine") for s in range(5, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_constant_is_peak_everywhere() -> None:
    assert {lr_at(s, 50, PEAK, "constant") for s in range(50)} == {PEAK}


def test_single_step_run_uses_peak() -> None:
    for kind in ("onecycle", "cosine", "constant"):
        assert lr_at(0, 1, PEAK, kind) == PEAK


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(3, 10, PEAK, "triangular")
