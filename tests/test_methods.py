"""Every registered plug-in (``metagrad.methods.available()``): finite, non-zero gradients for every parameter of
model and plug-in; its neutral setting is plain MAML; it composes with every other plug-in, each getting a gradient.

One model and batch every plug-in accepts: a bias-free Conv4 with batch-statistics BN and features (CxGrad,
TRLearner, CML), four tasks (TRLearner relates tasks). Two-process equality is tests/test_distributed.py's.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from metagrad import MAML, methods
from tests.helpers import assert_finite_gradients, conv64, image_batch

# Each plug-in's neutral keyword arguments, from its docstring / spec, or None where it has none.
NEUTRAL: dict[str, dict | None] = {
    "meta_gna": {"normalize": False, "constant_arbiter": True},   # plain SGD (meta_gna.md, neutral check)
    "trlearner": {"weight": 0.0},                                 # the term is skipped
    "cml": {"weight": 0.0},                                       # the term is skipped
    "cxgrad": None,   # none: its neutral check overrides `scales` (tests/test_cxgrad.py, NormGenerator)
}
KEYS = methods.available()


def learner_with(plugins, first_order=False, learn_inner_lr="fixed"):
    return MAML(conv64(), inner_lr=0.4, inner_steps=2, first_order=first_order, learn_inner_lr=learn_inner_lr,
                plugins=plugins).double()


def meta_grads(learner, batch):
    out = learner.meta_loss(batch)
    named = list(learner.named_parameters())
    return out, named, torch.autograd.grad(out.loss, [p for _, p in named], allow_unused=True)


def test_every_plugin_has_its_neutral_setting_listed():
    assert sorted(NEUTRAL) == KEYS, "list a new plug-in's neutral keyword arguments (or None) in NEUTRAL"


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("key", KEYS)
def test_every_parameter_gets_a_finite_nonzero_gradient(key, first_order):
    # Learned per-step rates too: they must get a gradient alongside the plug-in.
    learner = learner_with([methods.create(key)], first_order, learn_inner_lr="per_step")
    out, named, grads = meta_grads(learner, image_batch(T=4))
    assert torch.isfinite(out.loss)
    assert_finite_gradients(named, grads)


@pytest.mark.parametrize("key", [k for k in KEYS if NEUTRAL.get(k) is not None])
def test_neutral_setting_is_plain_maml(key):
    batch = image_batch(T=4)
    base_out, base_named, base = meta_grads(MAML(conv64(), inner_lr=0.4, inner_steps=2), batch)
    out, named, grads = meta_grads(learner_with([methods.create(key, **NEUTRAL[key])]), batch)
    assert torch.allclose(out.loss, base_out.loss, rtol=1e-10)
    n = len(base)
    assert [m for m, _ in named[:n]] == [m for m, _ in base_named]
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(grads[:n], base))
    # The plug-in's own parameters take no part: no gradient at all, or an exact zero.
    assert all(g is None or not g.any() for g in grads[n:])


@pytest.mark.parametrize("first, second", list(itertools.permutations(KEYS, 2)))
def test_composes_with_every_other_plugin(first, second):
    learner = learner_with([methods.create(first), methods.create(second)])
    out, named, grads = meta_grads(learner, image_batch(T=4))
    assert torch.isfinite(out.loss)
    assert_finite_gradients(named, grads)
