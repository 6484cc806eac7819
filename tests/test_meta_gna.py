"""Meta-GNA (meta_gna.md): the step-norm invariant, the neutral setting, an independent reference loop,
finite differences, gradients to every parameter, and the options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML
from metagrad.methods import MetaGNA, create
from metagrad.methods.meta_gna import NORMS
from metagrad.models import MLP
from tests.helpers import (
    DETACH,
    all_grads,
    assert_close_rel,
    assert_directional_derivative,
    assert_finite_gradients,
    ce,
    conv4,
    gna_step,
    image_batch,
    learner_meta_grad,
    mse,
    norm,
    regression_batch,
)


def mlp():
    torch.manual_seed(0)
    return MLP(1, (8, 8), 1).double()


def gna_reference(model, plugin, batch, lr, steps, loss_fn, first_order=False, per_sample=False, use_ema=False,
                  norms="code"):
    """An independent Meta-GNA learner: per task, torch.autograd, no metagrad code (regression, adapt all)."""
    theta = dict(model.named_parameters())
    names = list(theta)
    total = 0.0
    for t in range(len(batch)):
        xs, ys = batch.support_x[t], batch.support_y[t]
        fast, ema = dict(theta), None
        for s in range(steps):
            out = functional_call(model, fast, (xs,))
            gs = torch.autograd.grad(loss_fn(out, ys), [fast[n] for n in names], create_graph=not first_order)
            dirs = None
            if per_sample:
                per = ((out - ys) ** 2).mean(dim=1)
                acc = [0.0] * len(names)
                for i in range(len(per)):
                    gi = torch.autograd.grad(per[i], [fast[n] for n in names], create_graph=not first_order,
                                             retain_graph=True)
                    acc = [x + g / norm(g, DETACH[norms][1]) for x, g in zip(acc, gi)]
                dirs = [x / len(per) for x in acc]
            arbiter = plugin.arbiters[min(s, len(plugin.arbiters) - 1)]
            step, _, ema = gna_step(arbiter, [fast[n] for n in names], gs, dirs, ema, use_ema, norms)
            fast = {**fast, **{n: fast[n] - lr * d for n, d in zip(names, step)}}
        total = total + loss_fn(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    return total, torch.autograd.grad(total, list(model.parameters()) + list(plugin.parameters()))


def test_each_step_has_norm_alpha_times_factor():
    model, lr = conv4(), 0.3
    learner = MAML(model, inner_lr=lr, inner_steps=2, plugins=[MetaGNA()])
    one = image_batch(T=1, seed=2)
    xs, ys = one.support_x[0], one.support_y[0]
    fast = [learner.adapt(xs, ys, inner_steps=k, create_graph=False) for k in range(3)]
    diag = learner.evaluate(one, inner_steps=2).diagnostics
    g0 = torch.autograd.grad(ce(model(xs), ys), list(model.parameters()))
    for step in range(2):
        factors = diag[f"meta_gna.factor.step{step}"]
        for name in learner.adapted:
            moved = fast[step + 1][name] - fast[step][name]
            assert torch.allclose(moved.norm(), lr * factors[name], rtol=1e-10), (step, name)
    for name, g in zip(learner.adapted, g0):
        # Step 0 goes straight down the gradient, and the logged n_l is its norm.
        moved = fast[0][name] - fast[1][name]
        assert torch.allclose(nn.functional.cosine_similarity(moved.flatten(), g.flatten(), dim=0),
                              torch.ones((), dtype=torch.float64), atol=1e-10)
        assert torch.allclose(diag["meta_gna.grad_norm.step0"][name], g.norm(), rtol=1e-10)


def test_neutral_setting_is_plain_maml():
    model, batch = conv4(), image_batch()
    base_loss, base = learner_meta_grad(MAML(model, inner_lr=0.4, inner_steps=2), batch)
    plug = MetaGNA(normalize=False, constant_arbiter=True)
    loss, grads = learner_meta_grad(MAML(model, inner_lr=0.4, inner_steps=2, plugins=[plug]), batch)
    assert torch.allclose(loss, base_loss, rtol=1e-6)
    assert_close_rel(grads, base, 1e-6)


@pytest.mark.parametrize("options", [
    {}, {"first_order": True}, {"features": "wn_gn_ema"}, {"per_step": True}, {"per_sample": True},
    {"norms": "detached"}, {"norms": "exact"}, {"per_sample": True, "norms": "detached"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_independent_reference(options):
    first_order = options.pop("first_order", False)
    model, batch, lr = mlp(), regression_batch(), 0.05
    plug = MetaGNA(**options)
    learner = MAML(model, inner_lr=lr, inner_steps=2, loss="mse", first_order=first_order, plugins=[plug])
    loss, grads = all_grads(learner, batch)
    ref_loss, ref = gna_reference(model, plug, batch, lr, 2, mse, first_order,
                                  per_sample=plug.per_sample, use_ema=plug.features == "wn_gn_ema",
                                  norms=plug.norms)
    assert torch.allclose(loss.loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-6)


def test_conv4_no_norm_matches_reference():
    """The adapted subset (no BN affine) and classification; the reference adapts the same names."""
    model, batch, lr = conv4(), image_batch(), 0.4
    plug = MetaGNA()
    learner = MAML(model, inner_lr=lr, inner_steps=2, adapt="no_norm", plugins=[plug])
    loss, grads = all_grads(learner, batch)
    theta, names = dict(model.named_parameters()), list(learner.adapted)
    total = 0.0
    for t in range(len(batch)):
        fast = dict(theta)
        for s in range(2):
            gs = torch.autograd.grad(ce(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t]),
                                     [fast[n] for n in names], create_graph=True)
            step, _, _ = gna_step(plug.arbiters[0], [fast[n] for n in names], gs)
            fast = {**fast, **{n: fast[n] - lr * d for n, d in zip(names, step)}}
        total = total + ce(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    ref = torch.autograd.grad(total, list(model.parameters()) + list(plug.parameters()))
    assert torch.allclose(loss.loss, total, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_every_parameter_gets_a_finite_nonzero_gradient(first_order):
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=2, adapt="no_norm", first_order=first_order,
                   learn_inner_lr="per_step", plugins=[MetaGNA()]).double()
    out, grads = all_grads(learner, image_batch())
    assert torch.isfinite(out.loss)
    assert_finite_gradients(list(learner.named_parameters()), grads)


def test_finite_differences_through_two_inner_steps():
    """With every norm in the graph (norms="exact") the meta-gradient is the exact derivative; the default
    follows the authors' code (the Arbiter's input detached), checked against the reference above."""
    torch.manual_seed(1)
    model, batch = MLP(1, (6, 6), 1).double(), regression_batch(seed=5)
    learner = MAML(model, inner_lr=0.1, inner_steps=2, loss="mse", plugins=[MetaGNA(norms="exact")])
    params = list(learner.parameters())
    _, grads = all_grads(learner, batch)
    direction = [torch.randn_like(p) for p in params]
    assert_directional_derivative(lambda: learner.meta_loss(batch).loss, params, grads, direction, eps=1e-6)


@pytest.mark.parametrize("options", [{"per_step": True}, {"features": "wn_gn_ema"}, {"per_sample": True},
                                     {"normalize": False}, {"norms": "exact"}, {"norms": "detached"}],
                         ids=lambda o: next(iter(o)))
def test_options_run_on_conv4_and_get_gradients(options):
    plug = MetaGNA(**options)
    learner = MAML(conv4(), inner_lr=0.4, inner_steps=2, eval_inner_steps=3, plugins=[plug])
    out = learner.meta_loss(image_batch())
    used = list(learner.model.parameters()) + list(plug.arbiters[:2].parameters())
    grads = torch.autograd.grad(out.loss, used)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert len(plug.arbiters) == (2 if plug.per_step else 1)   # one per training step
    # Evaluation past the last (trained) Arbiter reuses it.
    assert torch.isfinite(learner.evaluate(image_batch(), inner_steps=5).loss)


@pytest.mark.parametrize("model", ["mlp", "conv4"])
def test_the_readings_of_the_norms_change_only_the_meta_gradient(model):
    """The three readings take the same steps (same loss), and differ in the meta-gradient: the divisor in
    the graph (the authors' code) against the all-detached surrogate by several percent."""
    build = (lambda: (mlp(), regression_batch(), "mse", "all")) if model == "mlp" else \
        (lambda: (conv4(), image_batch(), "cross_entropy", "no_norm"))
    out = {}
    for norms in NORMS:
        net, batch, loss, adapt = build()
        plug = MetaGNA(norms=norms)
        torch.manual_seed(3)
        learner = MAML(net, inner_lr=0.05, inner_steps=2, loss=loss, adapt=adapt, plugins=[plug]).double()
        out[norms] = learner_meta_grad(learner, batch)
    for norms in ("detached", "exact"):
        assert torch.allclose(out[norms][0], out["code"][0], rtol=1e-12)
        rel = max(((x - y).norm() / y.norm()).item() for x, y in zip(out[norms][1], out["code"][1]))
        assert rel > 1e-3, (norms, rel)


def test_registry_state_dict_and_bad_input():
    plug = create("meta_gna", features="wn_gn_ema")
    learner = MAML(mlp(), loss="mse", plugins=[plug])
    L = len(learner.adapted)
    assert plug.arbiters[0][0].weight.shape == (4 * L, 4 * L) and plug.arbiters[0][2].weight.shape == (L, 4 * L)
    assert plug.arbiters[0][0].weight.dtype == torch.float64
    assert any(k.startswith("plugins.0.arbiters.0.") for k in learner.state_dict())
    with pytest.raises(ValueError, match="features") as err:
        MetaGNA(features="norms")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown norms 'live'"):
        MetaGNA(norms="live")


def test_per_step_arbiters_past_the_training_steps_reuse_the_last_trained_one():
    """Finn's 1 training / 3 evaluation steps: one Arbiter per training step, and evaluation's later steps use
    the trained one (the reference is handed that Arbiter alone), never an untrained Arbiter."""
    model, batch, lr = mlp(), regression_batch(), 0.05
    plug = MetaGNA(per_step=True)
    learner = MAML(model, inner_lr=lr, inner_steps=1, eval_inner_steps=3, loss="mse", plugins=[plug])
    assert len(plug.arbiters) == 1
    opt = torch.optim.SGD(plug.parameters(), lr=0.5)
    learner.meta_loss(batch).loss.backward()
    opt.step()
    trained = SimpleNamespace(arbiters=[plug.arbiters[0]], parameters=plug.arbiters[0].parameters)
    ref_loss, _ = gna_reference(model, trained, batch, lr, 3, mse, first_order=True)
    assert torch.allclose(learner.evaluate(batch).loss, ref_loss.detach(), rtol=1e-10)
