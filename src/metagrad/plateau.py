"""The plateau criterion: has a run stopped changing on validation?

A run has reached its plateau at step N when its validation metric moved by less than ``points`` (accuracy, 0.5
percentage points by default) or ``relative`` (an error such as MSE, 2% of its value) over the last quarter of
the steps, from the validation point nearest 0.75·N to the one at N, **in either direction**: a run still gaining
that much is "still gaining", and one that lost that much "fell" (e.g. a late instability); neither is at its
plateau, and the report says which. Validation tasks are fixed (``eval.seed``)
and shared by every validation of a run, so the difference is free of task-sampling noise between the two
points. The criterion reads ``metrics.jsonl`` only: budgets are chosen on validation tasks, never on test ones.

Example:
    >>> p = plateau(read_metrics("runs/issue21-finn/omniglot-5w1s-plateau/maml/seed0"))
    >>> p.reached, p.gain, p.status    # e.g. (False, 0.012, "still gaining"): train longer
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
    reached: bool       # |gain| under the threshold

    @property
    def status(self) -> str:
        """``at plateau``, ``still gaining`` or ``fell``."""
        return "at plateau" if self.reached else "still gaining" if self.gain > 0 else "fell"


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
        return Plateau(metric, start, end, before, after, gain, abs(gain) < points)
    gain = (before - after) / max(abs(before), 1e-12)
    return Plateau(metric, start, end, before, after, gain, abs(gain) < relative)


__all__ = ["POINTS", "RELATIVE", "Plateau", "plateau"]
