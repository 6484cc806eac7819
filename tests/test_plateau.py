"""The plateau criterion on validation curves: under 0.5 points of accuracy (2% of an error) gained over the last
quarter of the steps."""

from __future__ import annotations

import pytest

from metagrad.plateau import plateau


def curve(values, every=500, key="val_accuracy"):
    return [{"iteration": every * (i + 1), key: v} for i, v in enumerate(values)] + [{"iteration": 7, "loss": 1.0}]


def test_a_climbing_curve_has_not_reached_its_plateau():
    p = plateau(curve([0.90, 0.93, 0.95, 0.96]))          # 2,000 steps: 1,500 → 2,000 gained a point
    assert (p.start, p.end) == (1500, 2000) and p.gain == pytest.approx(0.01) and not p.reached


def test_a_flat_last_quarter_has():
    p = plateau(curve([0.90, 0.93, 0.95, 0.96, 0.965, 0.968, 0.969, 0.970]))   # 3,000 → 4,000: +0.4 points
    assert (p.start, p.end) == (3000, 4000) and p.reached
    assert plateau(curve([0.9, 0.95, 0.97, 0.968])).reached            # a dip is no gain


def test_errors_use_a_relative_gain():
    p = plateau(curve([1.0, 0.5, 0.40, 0.39], key="val_mse"))
    assert p.metric == "mse" and p.gain == pytest.approx(0.025) and not p.reached
    assert plateau(curve([1.0, 0.5, 0.40, 0.396], key="val_mse")).reached


def test_too_few_validations_give_no_verdict():
    assert plateau(curve([0.9])) is None and plateau([]) is None
    assert plateau(curve([0.9, 0.95], every=1000)) is None     # no validation near 0.75·N
