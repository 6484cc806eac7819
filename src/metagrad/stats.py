"""Statistics for comparing methods: the seed is the unit of replication, test tasks are paired.

Two methods scored on the same test tasks in the same order give arrays ``a``, ``b`` of shape ``[seeds, tasks]``
(per-task accuracy or MSE, one row per training seed). Task-to-task variation is shared by both methods and
cancels in the paired per-task differences; what does not average out over tasks is the seed-to-seed variation
of a trained model, so the interval is set by the spread of the per-seed mean differences:

    d_s = mean_t (a[s, t] − b[s, t])                      one number per seed (seeds matched by index)
    diff = mean_s d_s,   se = sd_s(d_s) / √S,   t = diff / se  with S − 1 degrees of freedom

which is the paired t-test on the per-seed means (Student, the seeds of the two methods paired by their
``train.seed``: the same initial network and training task stream). When the two methods have different
numbers of seeds the seeds cannot be paired and Welch's test on the per-seed means is used instead. With one
seed there is no estimate of the seed spread: ``p``, ``low`` and ``high`` are NaN.

Pooling all seed × task scores into one interval (``1.96 · sd / √tasks``) lets the task count, not the seed
count, set the width: with three seeds and a realistic seed spread it flags a difference in far more than 5%
of comparisons between equal methods. ``tests/test_stats.py`` shows both by simulation.

A family of comparisons is corrected with Holm's step-down method (Holm, "A simple sequentially rejective
multiple test procedure", Scand. J. Statist. 1979), which controls the family-wise error rate at any
dependence between the tests.

Example:
    >>> r = compare(scores_method, scores_maml)        # [3, 600] each
    >>> print(f"{r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}], p = {r.p:.3f}")
    >>> holm([0.01, 0.04, 0.03])                        # [0.03, 0.06, 0.06]
    >>> compare(scores_method, scores_maml, alternative="greater").p   # one-sided: H1 mean(a) > mean(b)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True)
class Comparison:
    """The difference ``mean(a) − mean(b)`` with its two-sided 95% interval and the p-value of the chosen
    alternative (two-sided unless asked)."""

    diff: float
    low: float
    high: float
    p: float
    seeds: int          # seeds of a (and of b when paired)
    tasks: int          # test tasks per seed
    test: str           # "paired t on per-seed means" | "Welch t on per-seed means" | "one seed"
    alternative: str = "two-sided"    # of p: "two-sided", "greater" (mean(a) > mean(b)) or "less"


def _as_2d(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"compare: {name} must be a non-empty [seeds, tasks] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"compare: {name} holds non-finite scores")
    return arr


def _t_result(diff: float, se: float, df: float, seeds: int, tasks: int, test: str,
              alternative: str = "two-sided") -> Comparison:
    sign = {"two-sided": 0.0, "greater": 1.0, "less": -1.0}[alternative]
    if se == 0.0:   # every seed gave the same difference
        p = 1.0 if diff == 0.0 or sign * diff < 0 else 0.0
        return Comparison(diff, diff, diff, p, seeds, tasks, test, alternative)
    q = float(sps.t.ppf(0.5 + LEVEL / 2, df))
    t = diff / se
    p = float(2 * sps.t.sf(abs(t), df)) if sign == 0.0 else float(sps.t.sf(sign * t, df))
    return Comparison(diff, diff - q * se, diff + q * se, p, seeds, tasks, test, alternative)


def seed_interval(seed_means: Sequence[float]) -> tuple[float, float]:
    """Mean of per-seed means and the half-width of its 95% t-interval (NaN with one seed)."""
    x = np.asarray(seed_means, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(sps.t.ppf(0.5 + LEVEL / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def compare(a: object, b: object, paired: bool | None = None, alternative: str = "two-sided") -> Comparison:
    """Compare two methods' per-task scores ``[seeds, tasks]`` on the same tasks in the same order.

    Returns ``diff`` (mean of a minus mean of b), its 95% interval ``low``..``high`` and the two-sided ``p``:
    the paired t-test on the per-seed means of the paired per-task differences when both have the same
    number of seeds, else Welch's t-test on the per-seed means (see the module docstring). ``paired=False``
    forces Welch (seeds that are not matched, e.g. different ``train.seed`` values). ``alternative="greater"``
    gives the one-sided p of H1: mean(a) > mean(b) (``"less"`` the other side), as scipy's ``alternative``; the
    interval stays two-sided.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"compare: alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"compare: a and b must score the same tasks, got {a.shape[1]} and {b.shape[1]} per seed")
    tasks = a.shape[1]
    ma, mb = a.mean(axis=1), b.mean(axis=1)            # per-seed means
    diff = float(ma.mean() - mb.mean())
    if a.shape[0] == b.shape[0] and paired is not False:
        s = a.shape[0]
        if s < 2:
            return Comparison(diff, math.nan, math.nan, math.nan, s, tasks, "one seed", alternative)
        d = (a - b).mean(axis=1)                       # per-seed mean of the paired per-task differences
        se = float(d.std(ddof=1) / math.sqrt(s))
        return _t_result(diff, se, s - 1, s, tasks, "paired t on per-seed means", alternative)
    if min(a.shape[0], b.shape[0]) < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, a.shape[0], tasks, "one seed", alternative)
    va, vb = ma.var(ddof=1) / len(ma), mb.var(ddof=1) / len(mb)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(ma) - 1) + vb**2 / (len(mb) - 1)) if se > 0 else 1.0
    return _t_result(diff, se, df, a.shape[0], tasks, "Welch t on per-seed means", alternative)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order; NaN entries stay NaN and are not counted.

    Sorted ascending, ``p_(i)`` becomes ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))`` (1-based ``j``, ``m`` the
    number of non-NaN p-values). Rejecting where the adjusted p is below 0.05 keeps the probability of any
    false claim in the family below 5%.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError("holm: p-values must lie in [0, 1]")
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


__all__ = ["Comparison", "compare", "holm", "seed_interval"]
