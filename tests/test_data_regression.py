"""Regression benchmarks: seeded disjoint streams, the fixed-pool variant (torchmeta's Harmonic(num_tasks=5000)),
and named arguments only."""

from __future__ import annotations

import pytest
import torch

from metagrad import data


def make(name="harmonic", split="train", **kw):
    return data.create(name, split, shots=5, queries=15, meta_batch_size=32, seed=0, **kw)


def functions(bench, batches=20):
    """The distinct task functions met in the first batches, identified by their parameters."""
    seen = set()
    for i in range(batches):
        p, _ = bench._tasks(i)
        flat = torch.cat([v.flatten(1) for v in p.values()], dim=1)
        seen |= {tuple(row.tolist()) for row in flat}
    return seen


@pytest.mark.parametrize("name", ["sinusoid", "harmonic"])
def test_streams_are_seeded_and_disjoint(name):
    a, b = make(name).batch(4), make(name).batch(4)
    assert torch.equal(a.query_y, b.query_y) and a.query_x.shape == (32, 15, 1)
    assert not functions(make(name), 5) & functions(make(name, "test"), 5)


def test_harmonic_targets_follow_the_formula():
    bench = make()
    p, _ = bench._tasks(0)
    batch = bench.batch(0)
    t = 3
    a, b, w = p["a"][t, :, 0], p["b"][t, :, 0], p["omega"][t, 0, 0]
    xs = batch.support_x[t, :, 0]
    want = a[0] * torch.sin(w * xs + b[0]) + a[1] * torch.sin(2 * w * xs + b[1])
    assert torch.allclose(batch.support_y[t, :, 0], want)
    assert 5 <= w <= 7 and abs(xs.mean() - p["mu"][t, 0, 0]) < 3


def test_a_pool_holds_its_tasks_and_draws_fresh_inputs():
    bench = make(pool=50)
    seen = functions(bench, 40)                        # 1280 tasks drawn from a pool of 50
    assert len(seen) <= 50 and len(seen) > 40
    # Inputs are drawn afresh each time a function is used (torchmeta draws them per task instance).
    _, x0 = bench._tasks(0)
    assert not torch.equal(x0, bench._tasks(1)[1])
    # Per-split pools are disjoint; a shared pool makes test tasks training tasks.
    assert not functions(make(pool=50), 40) & functions(make(split="test", pool=50), 40)
    shared_train, shared_test = make(pool=50, shared_pool=True), make(split="test", pool=50, shared_pool=True)
    assert functions(shared_train, 40) == functions(shared_test, 40)
    assert not torch.equal(shared_train.batch(0).query_y, shared_test.batch(0).query_y)


def test_unknown_or_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="image_size"):
        data.create("sinusoid", "train", image_size=7)
    with pytest.raises(ValueError, match="pool must be >= 1"):
        make(pool=-1)
    with pytest.raises(ValueError, match="shared_pool"):
        make(shared_pool=True)
