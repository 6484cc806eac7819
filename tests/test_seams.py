"""The plug-in seams, with small test-only plug-ins: identity defaults, composition, state, outer terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML, Plugin
from metagrad.inner_lr import FixedLR, PerStepLR
from metagrad.models import MLP
from metagrad.msl import MultiStepLoss
from tests.helpers import (
    NoFeatures,
    ScaleGrad,
    assert_close_rel,
    learner_meta_grad,
    mse,
    reference_meta_grad,
    regression_batch,
)


class Neutral(Plugin):
    """Overrides every hook with the identity: must be plain MAML."""

    def init_task(self, ctx):
        return {"seen": torch.zeros(ctx.num_tasks, dtype=torch.float64)}

    def prepare(self, params, state, ctx):
        return dict(params), {}

    def transform(self, grads, params, state, ctx):
        return dict(grads)

    def update(self, state, extra_grads, ctx):
        return state

    def outer_term(self, ctx):
        return None


class ShiftGrad(Plugin):
    """Adds a constant to every entry of the inner gradient: does not commute with ScaleGrad."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def transform(self, grads, params, state, ctx):
        return {n: g + self.shift for n, g in grads.items()}


class ScaledHead(Plugin):
    """A per-task scalar state c (reset to 0) scales the output layer: W ← (1 + c)·W before the step, and c
    takes its own gradient step, like CxGrad's context. c = 0 at the start, so the first step is plain."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def init_task(self, ctx):
        return torch.zeros(ctx.num_tasks, dtype=ctx.support_x.dtype)

    def prepare(self, params, state, ctx):
        name = ctx.adapted[-2]  # the last weight
        params = dict(params)
        params[name] = (1 + state).view(-1, 1, 1) * params[name]
        return params, {"c": state}

    def update(self, state, extra_grads, ctx):
        return state - self.lr * extra_grads["c"]


class L2Outer(Plugin):
    """An outer term: λ·mean over tasks of ||θ'||², reading the adapted parameters."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def outer_term(self, ctx):
        sq = sum(p.flatten(1).pow(2).sum(1) for p in ctx.fast_params.values())
        return self.weight * self.scale * sq.mean()


def model64():
    torch.manual_seed(0)
    return MLP(1, (8, 8), 1).double()


def test_neutral_plugin_is_plain_maml():
    batch = regression_batch()
    model = model64()
    base_loss, base = learner_meta_grad(MAML(model, inner_lr=0.05, inner_steps=2, loss="mse"), batch)
    loss, grads = learner_meta_grad(MAML(model, inner_lr=0.05, inner_steps=2, loss="mse",
                                         plugins=[Neutral(), Neutral()]), batch)
    assert torch.equal(loss, base_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, base))


@pytest.mark.parametrize("scale_first", [True, False], ids=["scale_then_shift", "shift_then_scale"])
def test_transforms_compose_in_order(scale_first):
    """×2 and +0.1 do not commute: each order must match the hand-written loop with its own chain, and the two
    chains give different losses (so a core that ignored or reversed the order would fail one of them)."""
    batch = regression_batch()
    model = model64()
    chains = {True: lambda gs: [2.0 * g + 0.1 for g in gs], False: lambda gs: [2.0 * (g + 0.1) for g in gs]}
    ref_loss, ref = reference_meta_grad(model, batch, 0.05, 2, False, mse, transform=chains[scale_first])
    other_loss, _ = reference_meta_grad(model, batch, 0.05, 2, False, mse, transform=chains[not scale_first])
    assert not torch.allclose(ref_loss, other_loss, rtol=1e-3)
    plugins = [ScaleGrad(2.0), ShiftGrad(0.1)] if scale_first else [ShiftGrad(0.1), ScaleGrad(2.0)]
    learner = MAML(model, inner_lr=0.05, inner_steps=2, loss="mse", plugins=plugins)
    loss, grads = learner_meta_grad(learner, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-8)


def test_state_with_extras_matches_hand_written_loop():
    batch = regression_batch()
    model = model64()
    lr, c_lr, steps = 0.05, 0.3, 3
    learner = MAML(model, inner_lr=lr, inner_steps=steps, loss="mse", plugins=[ScaledHead(c_lr)])
    loss, grads = learner_meta_grad(learner, batch)
    theta = dict(model.named_parameters())
    total = 0
    for t in range(len(batch)):
        fast, c = dict(theta), torch.zeros((), dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            c = c if c.requires_grad else c.requires_grad_()
            w = (1 + c) * fast["layers.2.weight"]
            p = {**fast, "layers.2.weight": w}
            names = list(theta)
            sl = nn.functional.mse_loss(functional_call(model, p, (batch.support_x[t],)), batch.support_y[t])
            gs = torch.autograd.grad(sl, [p[n] for n in names] + [c], create_graph=True)
            fast = {n: p[n] - lr * g for n, g in zip(names, gs)}
            c = c - c_lr * gs[-1]
        total = total + nn.functional.mse_loss(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    ref = torch.autograd.grad(total, list(theta.values()))
    assert torch.allclose(loss, total, rtol=1e-10)
    assert_close_rel(grads, ref)


def test_outer_term_is_added_and_trained():
    batch = regression_batch()
    model = model64()
    plain = MAML(model, inner_lr=0.05, loss="mse").meta_loss(batch)
    plug = L2Outer(0.01)
    out = MAML(model, inner_lr=0.05, loss="mse", plugins=[plug]).meta_loss(batch)
    assert torch.allclose(out.query_loss, plain.query_loss)
    assert out.loss.item() > plain.loss.item()
    out.loss.backward()
    assert plug.scale.grad is not None and torch.isfinite(plug.scale.grad)


def test_plugin_parameters_are_learner_parameters_and_state_dict():
    plug = L2Outer(0.1)
    learner = MAML(model64(), loss="mse", plugins=[plug])
    ids = {id(p) for p in learner.parameters()}
    assert id(plug.scale) in ids
    assert any(k.startswith("plugins.0.") for k in learner.state_dict())


def test_features_required_but_missing():
    class NeedsFeatures(Plugin):
        needs_features = True

    with pytest.raises(ValueError, match="return_features"):
        MAML(NoFeatures(1, 1), loss="mse", plugins=[NeedsFeatures()])


def test_non_plugin_is_refused():
    with pytest.raises(TypeError, match="Plugin"):
        MAML(MLP(), plugins=[nn.Linear(1, 1)])


@pytest.mark.parametrize("mode", ["per_step", "per_element"])
def test_learned_inner_rates_start_at_plain_maml_and_learn(mode):
    batch = regression_batch()
    model = model64()
    base_loss, base = learner_meta_grad(MAML(model, inner_lr=0.05, inner_steps=2, loss="mse"), batch)
    learner = MAML(model, inner_lr=0.05, inner_steps=2, loss="mse", learn_inner_lr=mode).double()
    out = learner.meta_loss(batch)
    grads = torch.autograd.grad(out.loss, list(learner.parameters()))
    n = len(base)
    # The learned rates are created in float32 (α = 0.05 is not exact there), hence 1e-6, not 1e-10.
    assert torch.allclose(out.loss, base_loss, rtol=1e-6)
    assert_close_rel(grads[:n], base, 1e-6)
    rate_grads = grads[n:]
    assert len(rate_grads) == len(learner.adapted)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in rate_grads)


@pytest.mark.parametrize("mode", ["per_step", "per_element"])
def test_learned_inner_rates_are_those_of_each_step_and_entry(mode):
    """Distinct rates per step (LSLR) or per entry (Meta-SGD) against the hand-written loop: a core that read
    ``rate[0]`` at every step, or one rate per tensor, would fail."""
    batch = regression_batch()
    model = model64()
    learner = MAML(model, inner_lr=0.05, inner_steps=3, loss="mse", learn_inner_lr=mode).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in learner.inner_lr.rates.values():
            r.copy_(0.02 + 0.06 * torch.rand(r.shape, generator=g, dtype=r.dtype))
    rates = {n: learner.inner_lr.rates[n.replace(".", "__")] for n in learner.adapted}
    lr = (lambda n, s: rates[n][s]) if mode == "per_step" else (lambda n, s: rates[n])
    out = learner.meta_loss(batch)
    wrt = list(rates.values())
    grads = torch.autograd.grad(out.loss, list(model.parameters()) + wrt)
    ref_loss, ref = reference_meta_grad(model, batch, lr, 3, False, mse, wrt=wrt)
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-8)


def test_per_step_rates_past_the_training_steps_reuse_the_last_trained_one():
    """Finn's 1 training / 3 evaluation steps: evaluation must not use the initial rate of an untrained step."""
    batch = regression_batch()
    model = model64()
    learner = MAML(model, inner_lr=0.05, inner_steps=1, eval_inner_steps=3, loss="mse",
                   learn_inner_lr="per_step").double()
    assert all(r.shape == (1,) for r in learner.inner_lr.rates.values())   # one rate per training step
    opt = torch.optim.SGD(learner.inner_lr.parameters(), lr=0.5)
    learner.meta_loss(batch).loss.backward()
    opt.step()
    trained = {n: learner.inner_lr.rates[n.replace(".", "__")][0].item() for n in learner.adapted}
    assert all(v != 0.05 for v in trained.values())
    ref_loss, _ = reference_meta_grad(model, batch, lambda n, s: trained[n], 3, True, mse)
    assert torch.allclose(learner.evaluate(batch).loss, ref_loss.detach(), rtol=1e-10)


def step_query_losses(model, batch, lr, steps):
    """Mean query loss over tasks after each inner step (second order), by hand."""
    theta = dict(model.named_parameters())
    per_step = [0.0] * steps
    for t in range(len(batch)):
        fast = dict(theta)
        for s in range(steps):
            loss = mse(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
            per_step[s] = per_step[s] + mse(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    return [v / len(batch) for v in per_step]


def test_multi_step_loss_weights():
    learner = MAML(model64(), inner_steps=4, loss="mse", multi_step_loss=True, msl_iterations=100)
    msl = learner.plugins[-1]
    assert isinstance(msl, MultiStepLoss) and msl.weights(4) is None   # no iteration told yet: off
    learner.set_iteration(0)
    w0 = msl.weights(4)
    assert torch.allclose(w0, torch.full((4,), 0.25, dtype=w0.dtype))
    learner.set_iteration(50)
    w = msl.weights(4)
    assert abs(w.sum().item() - 1) < 1e-6 and w[-1] > w[0]
    learner.set_iteration(100)
    assert msl.weights(4) is None


@pytest.mark.parametrize("iteration", [0, 50, 100])
def test_multi_step_loss_is_the_weighted_sum_of_the_step_query_losses(iteration):
    """The loss and its gradient against Σ_s w_s·L_Q(θ_s), weights by hand: uniform at iteration 0; halfway
    (50 of 100) 1/4 → 0.03/4 for the first three, 1 minus their sum for the last; the last step alone at 100."""
    batch = regression_batch()
    model = model64()
    learner = MAML(model, inner_lr=0.05, inner_steps=4, loss="mse", multi_step_loss=True, msl_iterations=100)
    weights = {0: [0.25] * 4, 50: [0.12875] * 3 + [1 - 3 * 0.12875], 100: [0, 0, 0, 1]}[iteration]
    ref_loss = sum(w * q for w, q in zip(weights, step_query_losses(model, batch, 0.05, 4)))
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    learner.set_iteration(iteration)
    out = learner.meta_loss(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref, 1e-8)


def test_multi_step_loss_needs_annealing_iterations():
    with pytest.raises(ValueError, match="msl_iterations >= 1"):
        MAML(model64(), inner_steps=2, loss="mse", multi_step_loss=True)


def test_first_order_annealing():
    """The training loop decides the order (``train.first_order_at``): first order (its hand-written loop) for
    the first 10 iterations, second order from the 10th on; ``meta_loss(first_order=...)`` takes it, and the
    learner's own ``first_order`` is the default."""
    from metagrad.config import MAMLConfig
    from metagrad.train import first_order_at

    batch = regression_batch()
    model = model64()
    _, fo = reference_meta_grad(model, batch, 0.1, 1, True, mse)
    _, so = reference_meta_grad(model, batch, 0.1, 1, False, mse)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(fo, so)) > 1e-3
    learner = MAML(model, inner_lr=0.1, loss="mse")
    got = torch.autograd.grad(learner.meta_loss(batch).loss, list(model.parameters()))
    assert_close_rel(got, so, 1e-10)                              # the learner's order: second
    mc = MAMLConfig(first_order_iterations=10)
    for iteration, want in ((0, fo), (9, fo), (10, so), (50, so)):
        got = torch.autograd.grad(learner.meta_loss(batch, first_order=first_order_at(mc, iteration)).loss,
                                  list(model.parameters()))
        assert_close_rel(got, want, 1e-10)
    assert all(first_order_at(MAMLConfig(first_order=True, first_order_iterations=10), i) for i in (0, 10, 50))


def test_an_inner_rate_rule_given_as_an_object_equals_its_mode():
    """``inner_lr`` may be an InnerLR rule itself; plain MAML holds a FixedLR, so the core never branches on it."""
    batch = regression_batch()
    model = model64()
    assert isinstance(MAML(model, loss="mse").inner_lr, FixedLR)
    names = [n for n, _ in model.named_parameters()]
    by_mode = MAML(model, inner_lr=0.05, inner_steps=2, loss="mse", learn_inner_lr="per_step").double()
    by_rule = MAML(model, inner_lr=PerStepLR(names, 0.05, steps=2), inner_steps=2, loss="mse").double()
    assert torch.equal(by_mode.meta_loss(batch).loss, by_rule.meta_loss(batch).loss)


class Recorder(Plugin):
    """Keeps what ``attach`` and the contexts hand it (test-only: plug-ins keep no such state)."""

    def attach(self, view):
        self.seen = {"attach": view}

    def init_task(self, ctx):
        self.seen["inner"] = ctx.view

    def outer_term(self, ctx):
        self.seen["outer"] = ctx.view


def test_plugins_see_a_learner_view_not_the_learner():
    """``attach`` and both contexts get a frozen LearnerView of the learner's model, names, counts and loss."""
    import dataclasses

    from metagrad.seams import LearnerView

    batch = regression_batch()
    model = model64()
    rec = Recorder()
    learner = MAML(model, inner_lr=0.05, inner_steps=2, eval_inner_steps=3, loss="mse", adapt="head",
                   plugins=[rec])
    learner.meta_loss(batch)
    views = rec.seen
    assert set(views) == {"attach", "inner", "outer"}
    for view in views.values():
        assert isinstance(view, LearnerView) and not isinstance(view, MAML)
        assert view.model is model and view.adapted == learner.adapted
        assert (view.adapt_mode, view.loss_kind, view.inner_steps, view.eval_inner_steps) == ("head", "mse", 2, 3)
        assert all(view.meta_params()[n] is p for n, p in model.named_parameters())
        params = {n: p.unsqueeze(0).expand(len(batch), *p.shape) for n, p in model.named_parameters()}
        out = view.forward(params, batch.support_x)
        assert torch.equal(out, learner.forward_batched(params, batch.support_x))
        assert torch.equal(view.loss(out, batch.support_y), learner.loss_of(out, batch.support_y))
        with pytest.raises(dataclasses.FrozenInstanceError):
            view.loss_kind = "cross_entropy"


def test_no_plugin_reads_the_learner_and_seams_imports_no_maml():
    """Plug-ins read the view only (no ``.learner``, no ``MAML``), and ``seams`` does not import ``maml``."""
    import ast
    from pathlib import Path

    import metagrad

    root = Path(metagrad.__file__).parent
    for path in sorted((root / "methods").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr == "learner"), f"{path.name}: .learner"
            assert not (isinstance(node, ast.Name) and node.id == "MAML"), f"{path.name}: names MAML"
            if isinstance(node, ast.ImportFrom):
                assert "maml" not in (node.module or "").split("."), f"{path.name} imports maml"
    seams = ast.parse((root / "seams.py").read_text(encoding="utf-8"))
    for node in ast.walk(seams):
        if isinstance(node, ast.ImportFrom):
            assert "maml" not in (node.module or "").split(".") and all(a.name != "maml" for a in node.names)
        elif isinstance(node, ast.Import):
            assert all("maml" not in a.name.split(".") for a in node.names)
