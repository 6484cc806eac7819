"""The plateau criterion: has a run stopped improving on validation?

A run has reached its plateau at step N when its validation metric gained less than ``points`` (accuracy, 0.5
percentage points by default) or ``relative`` (an error such as MSE, 2% of its value) over the last quarter of
the steps: from the validation point nearest 0.75·N to the one at N. Validation tasks are fixed (``eval.seed``)
and shared by every validation of a run, so the difference is free of task-sampling noise between the two
points. The criterion reads ``metrics.jsonl`` only: budgets are chosen on validation tasks, never on test ones.

Example:
    >>> p = plateau(read_metrics("runs/issue21-finn/omniglot-5w1s-plateau/maml/seed0"))
    >>> p.reached, p.gain          # e.g. (False, 0.012): train longer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

POINTS = 0.005      # accuracy: under 0.5 percentage points gained over the last quarter
RELATIVE = 0.02     # an error: under 2% of its value lost over the last quarter


@dataclass(frozen=True)
class Plateau:
    """The validation metric at 0.75·N and at N and what it gained in between (positive: improved)."""

    metric: str         # "accuracy" | "mse"
    start: int          # the validation step nearest 0.75·N
    end: int            # N, the last validation step
    before: float
    after: float
    gain: float         # accuracy: after − before; an error: (before − after) / before
    reached: bool


def plateau(metrics: Sequence[dict[str, Any]], points: float = POINTS, relative: float = RELATIVE) -> Plateau | None:
    """The criterion on a run's logged validations (None without one within 0.125·N of 0.75·N)."""
    for key, metric in (("val_accuracy", "accuracy"), ("val_mse", "mse")):
        curve = sorted((int(m["iteration"]), float(m[key])) for m in metrics if key in m and "iteration" in m)
        if curve:
            break
    else:
        return None
    end, after = curve[-1]
    start, before = min(curve[:-1], key=lambda p: abs(p[0] - 0.75 * end), default=(end, after))
    if abs(start - 0.75 * end) > 0.125 * end:     # no validation near 0.75·N: no verdict
        return None
    if metric == "accuracy":
        gain = after - before
        return Plateau(metric, start, end, before, after, gain, gain < points)
    gain = (before - after) / max(abs(before), 1e-12)
    return Plateau(metric, start, end, before, after, gain, gain < relative)


__all__ = ["POINTS", "RELATIVE", "Plateau", "plateau"]
