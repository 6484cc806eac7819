"""Two inner-rule plug-ins in one learner: Meta-GNA with CxGrad.

The rule (seams.py): ``prepare`` chains, then ``transform`` chains on the gradient taken at the final prepared
parameters. CxGrad only prepares (Ŵ) and updates its context; Meta-GNA only transforms. So in either order
Meta-GNA normalises the gradient taken at Ŵ and its Arbiter reads w_l = ||Ŵ_l|| = γ_l for a conv weight.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metagrad import MAML
from metagrad.methods import CxGrad, MetaGNA
from tests.helpers import (
    CONVS,
    ScaleGrad,
    all_grads,
    assert_close_rel,
    ce,
    conv4,
    cx_context_start,
    cx_rescale,
    gna_step,
    image_batch,
)


def reference(model, cx, gna, batch, lr, steps, names, scale=None):
    """CxGrad then Meta-GNA per task, torch.autograd only: step from Ŵ by α·a_l·g_l/||g_l||, g taken at Ŵ.

    ``scale``: where a ×2 gradient transform sits, "before" Meta-GNA (it sees 2g) or "after" (the step doubles).
    """
    theta = dict(model.named_parameters())
    total = 0.0
    for t in range(len(batch)):
        xs, ys = batch.support_x[t], batch.support_y[t]
        c, fast = cx_context_start(model, cx.generator, theta, xs, ys, cx.context_dim, cx.context_lr), dict(theta)
        for s in range(steps):
            p = cx_rescale(cx.generator, fast, c)
            gs = torch.autograd.grad(ce(functional_call(model, p, (xs,)), ys), [p[n] for n in names] + [c],
                                     create_graph=True)
            c = c - cx.context_lr * gs[-1]
            grads = [2 * g for g in gs[:-1]] if scale == "before" else gs[:-1]
            step, _, _ = gna_step(gna.arbiters[0], [p[n] for n in names], grads)
            step = [2 * d for d in step] if scale == "after" else step
            fast = {**fast, **{n: p[n] - lr * d for n, d in zip(names, step)}}
        total = total + ce(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    params = list(model.parameters()) + list(cx.parameters()) + list(gna.parameters())
    return total, torch.autograd.grad(total, params)


def learner_vs_reference(plugins, cx, gna, batch, lr, scale=None):
    model = conv4()
    learner = MAML(model, inner_lr=lr, inner_steps=2, adapt="no_norm", plugins=plugins)
    out, grads = all_grads(learner, batch)
    ref_loss, ref = reference(model, cx, gna, batch, lr, 2, list(learner.adapted), scale)
    n = len(list(model.parameters()))
    # all_grads follows learner.parameters(): model, then the plug-ins in the order given.
    by_plugin = {id(p): g for p, g in zip(learner.parameters(), grads)}
    grads = grads[:n] + tuple(by_plugin[id(p)] for p in [*cx.parameters(), *gna.parameters()])
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-6)
    return out.loss


@pytest.mark.parametrize("gna_first", [False, True], ids=["cxgrad_then_gna", "gna_then_cxgrad"])
def test_matches_hand_written_loop_in_either_order(gna_first):
    """The pair in either order is the same learner (CxGrad only prepares, Meta-GNA only transforms). Since
    that alone runs one path in both orders, a ×2 transform is also put between them, where the order changes
    the result (Meta-GNA sees 2g, or its step doubles): each order must then match its own reference, so a core
    that ignored or reversed the order of the plug-ins would fail."""
    batch, lr = image_batch(), 0.4
    cx, gna = CxGrad(context_dim=16, context_lr=0.5), MetaGNA()
    learner_vs_reference([gna, cx] if gna_first else [cx, gna], cx, gna, batch, lr)
    scaled = [gna, ScaleGrad(2.0), cx] if gna_first else [cx, ScaleGrad(2.0), gna]
    loss = learner_vs_reference(scaled, cx, gna, batch, lr, scale="after" if gna_first else "before")
    other, _ = reference(conv4(), cx, gna, batch, lr, 2, list(MAML(conv4(), adapt="no_norm").adapted),
                         scale="before" if gna_first else "after")
    assert not torch.allclose(loss, other, rtol=1e-6)


def test_step_starts_at_norm_gamma_and_has_norm_alpha_times_factor():
    model, lr = conv4(), 0.3
    learner = MAML(model, inner_lr=lr, inner_steps=1, plugins=[CxGrad(context_dim=16), MetaGNA()])
    one = image_batch(T=1, seed=3)
    fast = learner.adapt(one.support_x[0], one.support_y[0], inner_steps=1, create_graph=False)
    diag = learner.evaluate(one, inner_steps=1).diagnostics
    gammas, factors = diag["cxgrad.gamma.step0"], diag["meta_gna.factor.step0"]
    for name, w in model.named_parameters():
        start = gammas[name] * w / w.norm() if name in CONVS else w
        assert torch.allclose((fast[name] - start).norm(), lr * factors[name], rtol=1e-10), name


@pytest.mark.parametrize("first_order", [False, True])
def test_papers_setting_runs_with_gradients_everywhere(first_order):
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=2, adapt="no_norm", first_order=first_order,
                   learn_inner_lr="per_step", plugins=[CxGrad(), MetaGNA(features="wn_gn_ema")]).double()
    out, grads = all_grads(learner, image_batch())
    assert torch.isfinite(out.loss)
    for (name, _), g in zip(learner.named_parameters(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert torch.isfinite(learner.evaluate(image_batch(seed=1)).loss)
