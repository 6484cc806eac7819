"""metagrad.stats: the seed is the unit of replication. Simulations show the comparison holds its size when two
methods are equal (the pooled-interval rule of the old report does not) and finds a large consistent effect;
the t statistics agree with scipy's own tests; Holm's adjustment against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from metagrad.stats import compare, holm

SEEDS, TASKS = 3, 600


def simulate(rng, effect=0.0, seed_sd=0.01, task_sd=0.05, noise_sd=0.06):
    """Per-task accuracies of two methods ``[seeds, tasks]`` on shared tasks, as trained models give them:
    a task difficulty both methods share, a per-seed offset of each trained model (what does not average out
    over tasks), and per-task noise. ``effect`` is the true difference of the means (a − b)."""
    task = 0.9 + task_sd * rng.standard_normal(TASKS)
    a = task + effect + seed_sd * rng.standard_normal((SEEDS, 1)) + noise_sd * rng.standard_normal((SEEDS, TASKS))
    b = task + seed_sd * rng.standard_normal((SEEDS, 1)) + noise_sd * rng.standard_normal((SEEDS, TASKS))
    return a, b


def pooled_p(a, b):
    """The old report's rule as a test: significant (p = 0) when the pooled 95% intervals do not overlap."""
    def interval(x):
        return x.mean(), 1.96 * x.std() / math.sqrt(x.shape[1])

    (ma, ha), (mb, hb) = interval(a), interval(b)
    return 0.0 if abs(ma - mb) > ha + hb else 1.0


def false_positive_rate(p_of, datasets=1000, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return np.mean([p_of(*simulate(rng, **kw)) < 0.05 for _ in range(datasets)])


@pytest.mark.parametrize("seed_sd", [0.005, 0.01, 0.02])
def test_no_true_effect_flags_at_most_about_five_percent(seed_sd):
    rate = false_positive_rate(lambda a, b: compare(a, b).p, seed_sd=seed_sd)
    # 1000 datasets: a true 5% gives 0.05 ± 0.007 (sd), so 0.08 is more than 4 sd above it.
    assert rate <= 0.08, rate
    assert rate >= 0.02, rate       # not a test that never rejects


def test_the_pooled_interval_fails_the_same_simulation():
    """The rule the report used before: three seeds count as if they averaged out over 600 tasks."""
    rate = false_positive_rate(pooled_p, seed_sd=0.01)
    assert rate > 0.10, rate


def test_detects_a_large_consistent_effect():
    rng = np.random.default_rng(1)
    hits = [compare(*simulate(rng, effect=0.05, seed_sd=0.005)) for _ in range(300)]
    assert np.mean([h.p < 0.05 for h in hits]) >= 0.95
    assert np.mean([h.low <= 0.05 <= h.high for h in hits]) >= 0.9      # and its interval covers the truth
    assert all(h.diff > 0 for h in hits)


def test_interval_covers_the_true_difference_at_its_level():
    rng = np.random.default_rng(2)
    cover = [(r.low <= 0.02 <= r.high) for r in (compare(*simulate(rng, effect=0.02)) for _ in range(1000))]
    assert 0.92 <= np.mean(cover) <= 0.98


def test_equals_scipy_paired_and_welch_tests_on_per_seed_means():
    rng = np.random.default_rng(3)
    a, b = simulate(rng, effect=0.01)
    r = compare(a, b)
    ref = sps.ttest_rel(a.mean(axis=1), b.mean(axis=1))
    assert math.isclose(r.p, ref.pvalue, rel_tol=1e-9)
    assert math.isclose(r.diff, a.mean() - b.mean(), rel_tol=1e-12)
    assert r.low < r.diff < r.high and r.test.startswith("paired")
    b4 = np.vstack([b, b[:1] + 0.003])                        # 4 seeds against 3: unpaired
    w = compare(a, b4)
    ref = sps.ttest_ind(a.mean(axis=1), b4.mean(axis=1), equal_var=False)
    assert math.isclose(w.p, ref.pvalue, rel_tol=1e-9) and w.test.startswith("Welch")


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_one_sided_tests_equal_scipys(alternative):
    rng = np.random.default_rng(5)
    for effect in (0.01, -0.01, 0.0):
        a, b = simulate(rng, effect=effect)
        r = compare(a, b, alternative=alternative)
        ref = sps.ttest_rel(a.mean(axis=1), b.mean(axis=1), alternative=alternative)
        assert math.isclose(r.p, ref.pvalue, rel_tol=1e-9) and r.alternative == alternative
        two = compare(a, b)
        assert (r.low, r.high) == (two.low, two.high)              # the interval stays two-sided
        b4 = np.vstack([b, b[:1] + 0.003])
        w = compare(a, b4, alternative=alternative)
        ref = sps.ttest_ind(a.mean(axis=1), b4.mean(axis=1), equal_var=False, alternative=alternative)
        assert math.isclose(w.p, ref.pvalue, rel_tol=1e-9)
    with pytest.raises(ValueError, match="alternative must be one of"):
        compare(a, b, alternative="bigger")


def test_paired_tasks_do_not_inflate_the_interval_by_task_difficulty():
    """Shared task difficulty cancels: the interval depends on the seed spread, not on how hard tasks vary."""
    rng = np.random.default_rng(4)
    easy = compare(*simulate(rng, effect=0.01, task_sd=0.0))
    rng = np.random.default_rng(4)
    hard = compare(*simulate(rng, effect=0.01, task_sd=0.3))
    assert math.isclose(easy.high - easy.low, hard.high - hard.low, rel_tol=1e-9)


def test_one_seed_gives_no_interval_and_bad_shapes_are_refused():
    r = compare(np.ones((1, 5)), np.zeros((1, 5)))
    assert r.diff == 1.0 and math.isnan(r.p) and math.isnan(r.low)
    same = compare(np.ones((3, 5)), np.ones((3, 5)))
    assert same.p == 1.0 and same.low == same.high == 0.0
    with pytest.raises(ValueError, match="same tasks"):
        compare(np.ones((3, 5)), np.ones((3, 6)))
    with pytest.raises(ValueError, match="non-finite"):
        compare(np.full((3, 5), np.nan), np.ones((3, 5)))


def test_holm_against_hand_worked_values():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(holm([0.5, 0.9]), [1.0, 1.0])
    out = holm([0.01, float("nan"), 0.02])
    assert math.isnan(out[1]) and np.allclose([out[0], out[2]], [0.02, 0.02])
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.5])


def test_holm_controls_the_family_wise_error():
    rng = np.random.default_rng(5)
    families = [holm(rng.uniform(size=20)) for _ in range(2000)]          # 20 true null hypotheses each
    assert np.mean([min(f) < 0.05 for f in families]) <= 0.06
