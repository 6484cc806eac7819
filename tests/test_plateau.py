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
    assert plateau(curve([0.9, 0.95, 0.97, 0.968])).reached            # a dip within the threshold
    assert plateau(curve([0.9, 0.95, 0.97, 0.968])).status == "at plateau"


def test_a_fall_over_the_last_quarter_is_not_a_plateau():
    # Meta-GNA α 0.01 × 5 seed 1 (issue 21): 98.04% at 6,000 → 93.55% at 8,000, a fall of 4.49 points
    p = plateau(curve([0.95] * 11 + [0.9804, 0.9823, 0.9850, 0.9837, 0.9355]))
    assert (p.start, p.end) == (6000, 8000) and p.gain == pytest.approx(-0.0449)
    assert not p.reached and p.status == "fell"
    assert plateau(curve([1.0, 0.5, 0.40, 0.45], key="val_mse")).status == "fell"   # an error that grew 12.5%
    assert plateau(curve([0.90, 0.93, 0.95, 0.96])).status == "still gaining"


def test_errors_use_a_relative_gain():
    p = plateau(curve([1.0, 0.5, 0.40, 0.39], key="val_mse"))
    assert p.metric == "mse" and p.gain == pytest.approx(0.025) and not p.reached
    assert plateau(curve([1.0, 0.5, 0.40, 0.396], key="val_mse")).reached


def test_too_few_validations_give_no_verdict():
    assert plateau(curve([0.9])) is None and plateau([]) is None
    assert plateau(curve([0.9, 0.95], every=1000)) is None     # no validation near 0.75·N
