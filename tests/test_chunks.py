"""``meta_backward`` (metagrad.chunks): chunk by chunk of tasks, the gradients of the whole batch's meta-loss.

For MAML alone, every registered plug-in (``methods.available()``), all of them together, and with the MAML++
schedules: float64 gradients of every learner parameter with chunks of one task (rounded up to a plug-in's task
group), a middle size, and every forward recomputed per task, against ``meta_loss(batch).loss.backward()`` on
the whole batch (1e-10 relative); the returned values against the whole batch's. Then the automatic sizing (the
group rule and the recompute rule) and the recompute context alone.
"""

from __future__ import annotations

import pytest
import torch

from metagrad import MAML, chunks, meta_backward, methods
from metagrad import functional as fn
from tests.helpers import conv64, image_batch, mlp64, regression_batch

KEYS = methods.available()
REL = 1e-10
T = 6   # with a plug-in's groups of 4: [0, 4) and [4, 6)

# name → (plug-in keys, learner options, the iteration set_iteration reports)
CASES = {
    "maml": ([], {}, None),
    **{key: ([key], {}, None) for key in KEYS},
    "all": (KEYS, {"learn_inner_lr": "per_step"}, None),
    # MAML++ schedules: the multi-step loss at iteration 1 of 10, with per-step rates.
    "all+schedules": (KEYS, {"multi_step_loss": True, "msl_iterations": 10, "learn_inner_lr": "per_step"}, 1),
    "maml+msl": ([], {"multi_step_loss": True, "msl_iterations": 10}, 3),
    # CML's conv co-learner reads a tap (the input of Conv4's last pooling), recomputed like any forward
    "cml-conv": ([("cml", {"head": "conv"})], {}, None),
}


def build(name, first_order):
    keys, options, iteration = CASES[name]
    torch.manual_seed(1)
    learner = MAML(conv64(), inner_lr=0.4, inner_steps=2, first_order=first_order,
                   plugins=[methods.create(k[0], **k[1]) if isinstance(k, tuple) else methods.create(k) for k in keys],
                   **options).double()
    if iteration is not None:
        learner.set_iteration(iteration)
    return learner


def whole(learner, batch):
    """The unchunked training call: the output and every parameter's gradient."""
    learner.zero_grad(set_to_none=True)
    out = learner.meta_loss(batch)
    out.loss.backward()
    return out, [p.grad.clone() for p in learner.parameters()]


def chunked(learner, batch, chunk=None, recompute=False):
    learner.zero_grad(set_to_none=True)
    if recompute:
        with fn.recompute_per_task():
            out = meta_backward(learner, batch, chunk)
    else:
        out = meta_backward(learner, batch, chunk)
    return out, [p.grad.clone() for p in learner.parameters()]


def assert_rel(got, want, rel=REL):
    """Per tensor: max|a − b| / max|b| < rel (a tensor whose gradient is zero in exact arithmetic, e.g. a bias that
    BatchNorm cancels, scaled by 1e-3 of the largest gradient instead of its rounding noise)."""
    overall = max(b.abs().max().item() for b in want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = max(b.abs().max().item(), 1e-3 * overall, 1e-300)
        assert (a - b).abs().max().item() / scale < rel, (i, (a - b).abs().max().item() / scale)


def assert_same_values(out, ref):
    """The whole batch's loss, per-task and per-sample values, accuracy and diagnostics."""
    assert not out.loss.requires_grad
    for field in ("loss", "query_loss", "query_accuracy", "task_losses", "task_accuracies", "sample_losses"):
        a, b = getattr(out, field), getattr(ref, field)
        if b is None:   # regression: no accuracy
            assert a is None, field
            continue
        assert a.shape == b.shape and torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-15), field
    flat = {k: v for k, v in _flat(out.diagnostics)}
    want = {k: v for k, v in _flat(ref.diagnostics)}
    assert flat.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(torch.as_tensor(flat[k]), torch.as_tensor(v), rtol=1e-10, atol=1e-14), k


def _flat(tree, prefix=""):
    for k, v in tree.items():
        yield from (_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else [(f"{prefix}{k}", v)])


# -- every method: chunked gradients equal the whole batch's ----------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_gradients_equal_the_whole_batch(name, first_order):
    learner = build(name, first_order)
    batch = image_batch(T=T, seed=3)
    ref, want = whole(learner, batch)
    for chunk, recompute in ((1, False), (3, False), (1, True), (None, True)):
        out, got = chunked(learner, batch, chunk, recompute)
        assert_rel(got, want)
        assert_same_values(out, ref)


@pytest.mark.parametrize("key", [k for k in KEYS if k != "cxgrad"])   # CxGrad needs convolutions
def test_chunked_gradients_equal_the_whole_batch_on_regression(key):
    torch.manual_seed(1)
    learner = MAML(mlp64(), inner_lr=0.05, inner_steps=2, loss="mse", plugins=[methods.create(key)]).double()
    batch = regression_batch(T=7, seed=3)    # a plug-in's groups of 4: [0, 4) and [4, 7)
    ref, want = whole(learner, batch)
    for chunk, recompute in ((1, False), (2, False), (1, True)):
        out, got = chunked(learner, batch, chunk, recompute)
        assert_rel(got, want)
        assert_same_values(out, ref)


def test_gradients_add_to_those_already_there():
    learner = build("all", False)
    batch = image_batch(T=T, seed=3)
    _, want = whole(learner, batch)
    meta_backward(learner, batch, chunk=1)
    meta_backward(learner, batch, chunk=2)
    assert_rel([p.grad for p in learner.parameters()], [3 * g for g in want])


# -- automatic sizing: the group rule and the recompute rule ----------------------------------------------------------
def spied(learner):
    """Record every chunk meta_backward runs: (tasks, whether its forwards are recomputed)."""
    seen = []
    run = learner.meta_loss

    def meta_loss(batch, first_order=None):
        seen.append((len(batch), fn._RECOMPUTE.get()))
        return run(batch, first_order)

    learner.meta_loss = meta_loss
    return seen


@pytest.mark.parametrize("name", list(CASES))
def test_a_tiny_budget_gives_one_group_per_chunk(name, monkeypatch):
    learner = build(name, False)
    batch = image_batch(T=T, seed=3)
    ref, want = whole(learner, batch)
    monkeypatch.setitem(chunks.CHUNK_BYTES, "cpu", 1)
    seen = spied(learner)
    out, got = chunked(learner, batch)
    assert_rel(got, want)
    assert_same_values(out, ref)
    if name in ("maml", "maml+msl") or all(p.task_group_size == 1 for p in learner.plugins):
        assert seen == [(1, False)] * T    # one task per chunk: nothing to recompute
    else:
        # Groups of 4: the first one's count passes the budget, so it is stopped and run again recomputed, as
        # every later group is.
        assert seen == [(4, False), (4, True), (2, True)]


def test_chunks_fill_the_budget_with_whole_groups(monkeypatch):
    learner = build("trlearner", False)
    batch = image_batch(T=13, seed=3)   # groups [0,4) [4,8) [8,13)
    ref, want = whole(learner, batch)
    seen = spied(learner)
    out, got = chunked(learner, batch)   # the default budget holds this tiny model's whole batch
    assert seen == [(4, False), (9, False)]
    counting, saved = chunks._saved_bytes()
    with counting:
        learner.meta_loss(batch.select(slice(0, 4)))
    per_task = saved[0] / 4
    seen.clear()
    monkeypatch.setitem(chunks.CHUNK_BYTES, "cpu", int(per_task * 8.5))    # two groups fit, not three
    out, got = chunked(learner, batch)
    assert seen == [(4, False), (4, False), (5, False)]
    assert_rel(got, want)
    assert_same_values(out, ref)


def test_bad_arguments_are_refused():
    learner = build("maml", False)
    with pytest.raises(ValueError, match="chunk"):
        meta_backward(learner, image_batch(T=2), chunk=0)
    with pytest.raises(ValueError, match="no task"):
        meta_backward(learner, image_batch(T=2).select(slice(0, 0)))


# -- the recompute context --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", [False, True])
def test_recomputed_forwards_are_the_same_function(features):
    """Outputs and first and second derivatives w.r.t. task-stacked parameters, task by task recomputed."""
    model = conv64()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 4, 1, 28, 28, generator=g, dtype=torch.float64)
    params = {n: (p + 0.05 * torch.randn(3, *p.shape, generator=g, dtype=p.dtype)).requires_grad_()
              for n, p in fn.meta_params(model).items()}
    w = torch.arange(1, 4, dtype=torch.float64).view(3, 1, 1)   # tasks weighted differently: no mix-up cancels

    def derivatives(recompute):
        with fn.recompute_per_task() if recompute else torch.enable_grad():
            out = fn.forward_batched(model, params, x, features)
        outs = out if features else (out,)
        loss = sum((w * o.square()).sum() for o in outs)
        g1 = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        g2 = torch.autograd.grad(sum((a * a).sum() for a in g1), list(params.values()))
        return [o.detach() for o in outs], g1, g2

    for got, want in zip(derivatives(True), derivatives(False)):
        assert_rel(got, want)


def test_recompute_holds_less_graph():
    """Inside the context, a meta-loss keeps fewer saved tensors outside its checkpoints (the forwards' are
    recomputed in the backward)."""
    from tests.test_batched import held_saved_bytes

    learner = build("all", False)
    batch = image_batch(T=4, queries=5, seed=3)
    held = {}
    for recompute in (False, True):
        probe, alive, _ = held_saved_bytes()
        with probe, fn.recompute_per_task() if recompute else torch.enable_grad():
            out = learner.meta_loss(batch)
        held[recompute] = alive()
        out.loss.backward()
    assert held[True] < held[False] / 2, held
