"""CxGrad (cxgrad.md): conv weights enter every step with norm γ_l, the context resets per task, the neutral
setting, an independent reference loop, finite differences, gradients to every parameter, bad models."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metagrad import MAML
from metagrad.methods import CxGrad, create
from metagrad.models import MLP, Conv4
from tests.helpers import (
    CONVS,
    all_grads,
    assert_close_rel,
    assert_directional_derivative,
    assert_finite_gradients,
    ce,
    conv4,
    cx_context_start,
    cx_rescale,
    image_batch,
    learner_meta_grad,
)


def cx_reference(model, plug, batch, lr, steps, names, first_order=False):
    """An independent CxGrad learner: per task, torch.autograd, no metagrad code."""
    theta = dict(model.named_parameters())
    G, dim, c_lr = plug.generator, plug.context_dim, plug.context_lr
    total = 0.0
    for t in range(len(batch)):
        xs, ys = batch.support_x[t], batch.support_y[t]
        c, fast = cx_context_start(model, G, theta, xs, ys, dim, c_lr), dict(theta)
        for _ in range(steps):
            p = cx_rescale(G, fast, c)
            # retain_graph: the path to c runs through Ŵ's graph, which the query's backward needs.
            gs = torch.autograd.grad(ce(functional_call(model, p, (xs,)), ys), [p[n] for n in names] + [c],
                                     create_graph=not first_order, retain_graph=True)
            c = c - c_lr * gs[-1]
            fast = {**fast, **{n: p[n] - lr * g for n, g in zip(names, gs)}}
        total = total + ce(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    return total, torch.autograd.grad(total, list(model.parameters()) + list(plug.parameters()))


class NormGenerator(CxGrad):
    """G fixed to output ||W_l|| of the weights it rescales: Ŵ = W, so the learner is plain MAML."""

    def scales(self, context, params):
        norms = torch.stack([params[n].flatten(1).norm(dim=1) for n in self.conv_names], dim=1)
        # 0·c keeps the context in the graph: the core asks for its gradient (an unused input is an error).
        return norms + 0 * context.sum(dim=1, keepdim=True)


def test_conv_weights_enter_every_step_with_norm_gamma():
    model, batch, steps = conv4(), image_batch(T=2), 2
    plug = CxGrad(context_dim=16)
    learner = MAML(model, inner_lr=0.4, inner_steps=steps, plugins=[plug])
    gammas, norms = [], {n: [] for n in CONVS}
    plug.generator.register_forward_hook(lambda mod, inp, out: gammas.append(out.detach()))
    for name in CONVS:
        conv = model.get_submodule(name.rsplit(".", 1)[0])
        conv.register_forward_pre_hook(lambda mod, inp, name=name: norms[name].append(mod.weight.norm().detach()))
    out = learner.meta_loss(batch)
    T = len(batch)
    # G runs for step (A), then once per step; the model runs per task for (A), every step, and the query.
    assert len(gammas) == steps + 1 and all(g.shape == (T, 4) for g in gammas)
    for i, name in enumerate(CONVS):
        seen = torch.stack(norms[name]).view(steps + 2, T)
        for k in range(steps + 1):
            assert torch.allclose(seen[k], gammas[k][:, i], rtol=1e-10), (name, k)
        # The query uses the final W as the last step left it, not rescaled.
        assert not torch.allclose(seen[-1], gammas[-1][:, i], rtol=1e-3)
        for s in range(steps):
            assert torch.allclose(out.diagnostics[f"cxgrad.gamma.step{s}"][name], gammas[s + 1][:, i].mean())


def test_context_resets_per_task():
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=2, plugins=[CxGrad(context_dim=16)])
    batch = image_batch(T=3, seed=4)
    fwd = learner.meta_loss(batch).task_losses.detach()
    rev = learner.meta_loss(batch.select([2, 1, 0])).task_losses.detach()
    alone = learner.meta_loss(batch.select([1])).task_losses.detach()
    assert torch.allclose(fwd, rev.flip(0), rtol=1e-10)
    assert torch.allclose(fwd[1], alone[0], rtol=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
def test_neutral_generator_is_plain_maml(first_order):
    model, batch = conv4(), image_batch()
    kw = {"inner_lr": 0.4, "inner_steps": 2, "first_order": first_order}
    base_loss, base = learner_meta_grad(MAML(model, **kw), batch)
    loss, grads = learner_meta_grad(MAML(model, plugins=[NormGenerator(context_dim=8)], **kw), batch)
    assert torch.allclose(loss, base_loss, rtol=1e-6)
    assert_close_rel(grads, base, 1e-6)


@pytest.mark.parametrize("adapt,first_order", [
    ("all", False), ("no_norm", False), ("no_norm", True),
])
def test_matches_independent_reference(adapt, first_order):
    model, batch, lr = conv4(), image_batch(), 0.4
    plug = CxGrad(context_dim=16, context_lr=0.5)
    learner = MAML(model, inner_lr=lr, inner_steps=2, adapt=adapt, first_order=first_order, plugins=[plug])
    out, grads = all_grads(learner, batch)
    ref_loss, ref = cx_reference(model, plug, batch, lr, 2, list(learner.adapted), first_order)
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_every_parameter_gets_a_finite_nonzero_gradient(first_order):
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=2, adapt="no_norm", first_order=first_order,
                   learn_inner_lr="per_step", plugins=[CxGrad()]).double()
    out, grads = all_grads(learner, image_batch())
    assert torch.isfinite(out.loss)
    assert_finite_gradients(list(learner.named_parameters()), grads)


def test_finite_differences_through_two_inner_steps():
    """Step (A) is a constant by the spec (no graph), so the meta-gradient is the derivative of the meta-loss
    with the context that step (A) returns held fixed: the shifted evaluations reuse it."""
    model, batch = conv4(), image_batch(seed=6)
    plug = CxGrad(context_dim=16)
    learner = MAML(model, inner_lr=0.1, inner_steps=2, adapt="no_norm", plugins=[plug])
    start = []
    init_task = plug.init_task
    plug.init_task = lambda ctx: start.append(init_task(ctx)) or start[0]
    params = list(learner.parameters())
    _, grads = all_grads(learner, batch)
    plug.init_task = lambda ctx: start[0].clone()
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for p in params]
    # Small ε: the inner gradient jumps at ReLU / max-pool kinks, which Conv4 has many of.
    assert_directional_derivative(lambda: learner.meta_loss(batch).loss, params, grads, direction, eps=1e-7)


def test_evaluate_runs_without_a_graph_and_registry():
    plug = create("cxgrad", context_dim=8)
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=1, eval_inner_steps=3, plugins=[plug])
    ev = learner.evaluate(image_batch())
    assert not ev.loss.requires_grad and torch.isfinite(ev.loss)
    assert "cxgrad.gamma.step2" in ev.diagnostics
    assert plug.generator[2].weight.shape == (4, 8) and plug.generator[0].weight.dtype == torch.float64
    assert any(k.startswith("plugins.0.generator.") for k in learner.state_dict())


@pytest.mark.parametrize("model,kw,match", [
    (MLP(1, (8, 8), 1), {"loss": "mse"}, "Conv2d"),
    (Conv4(1, ways=3, width=4, bias=True), {}, "bias"),
    (Conv4(1, ways=3, width=4), {"adapt": "head"}, "adapt"),
], ids=["mlp", "conv_bias", "head_only"])
def test_bad_models_are_refused_in_one_line(model, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        MAML(model, plugins=[CxGrad()], **kw)
    assert "\n" not in str(err.value)
