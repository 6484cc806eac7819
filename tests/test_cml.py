"""CML: the co-learner never changes adaptation, neutrality, an independent reference, finite differences, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML, Plugin, methods
from metagrad.methods.cml import CML
from tests.helpers import (
    assert_close_rel,
    assert_directional_derivative,
    conv64,
    grads_of,
    image_batch,
    mlp64,
    ref_adapt,
    regression_batch,
)

F = nn.functional


def conv4_map_by_hand(p, x):
    """The last block's pre-pool map of Conv4 (bias-free), written with torch.nn.functional only."""
    for i in range(4):
        b = f"blocks.{i}"
        x = F.conv2d(x, p[f"{b}.conv.weight"], padding=1)
        x = torch.relu(F.batch_norm(x, None, None, p[f"{b}.bn.weight"], p[f"{b}.bn.bias"], training=True, eps=1e-5))
        if i < 3:
            x = F.max_pool2d(x, 2)
    return x


def co_learner_by_hand(head, q, feats):
    """φ from the plug-in's tensors ``q`` (by name), with torch.nn.functional only."""
    if head == "mlp":
        return F.linear(torch.relu(F.linear(feats, q["0.weight"], q["0.bias"])), q["2.weight"], q["2.bias"])
    x = feats
    for conv, bn in (("0", "1"), ("3", "4")):
        x = F.conv2d(x, q[f"{conv}.weight"], padding=1)
        x = torch.relu(F.batch_norm(x, None, None, q[f"{bn}.weight"], q[f"{bn}.bias"], training=True, eps=1e-5))
    return F.linear(F.max_pool2d(x, 2).flatten(1), q["8.weight"], q["8.bias"])


def reference_cml(model, batch, co, *, head, lr, steps, first_order, weight):
    """MAML + CML per task, with no metagrad code."""
    cls = batch.is_classification
    loss_fn = F.cross_entropy if cls else F.mse_loss
    theta = dict(model.named_parameters())
    total = 0.0
    for t in range(len(batch)):
        fast = ref_adapt(model, theta, batch.support_x[t], batch.support_y[t], lr, steps, first_order, loss_fn)
        out, feats = functional_call(model, fast, (batch.query_x[t],), {"return_features": True})
        if head == "conv":
            feats = conv4_map_by_hand(fast, batch.query_x[t])
        co_out = co_learner_by_hand(head, dict(co.named_parameters()), feats)
        total = total + loss_fn(out, batch.query_y[t]) + weight * loss_fn(co_out, batch.query_y[t])
    return total / len(batch)


CASES = [("mse", "mlp"), ("cross_entropy", "mlp"), ("cross_entropy", "conv")]


def setup(kind, seed=0, T=4):
    if kind == "mse":
        return mlp64(seed), regression_batch(T=T, seed=seed), 0.05
    return conv64(seed), image_batch(T=T, seed=seed), 0.4


# -- the defining invariant ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, head", CASES)
def test_co_learner_never_changes_adaptation_or_predictions(kind, head):
    model, batch, lr = setup(kind)
    steps = 2 if kind == "mse" else 1
    plain = MAML(model, inner_lr=lr, inner_steps=steps, loss=kind)
    plug = CML(head=head)
    learner = MAML(model, inner_lr=lr, inner_steps=steps, loss=kind, plugins=[plug])
    # CML is an outer term only: it overrides no inner-rule hook.
    assert all(getattr(CML, h) is getattr(Plugin, h) for h in ("init_task", "prepare", "transform", "update"))
    for t in (0, 2):
        a = plain.adapt(batch.support_x[t], batch.support_y[t])
        b = learner.adapt(batch.support_x[t], batch.support_y[t])
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert torch.equal(plain.predict(a, batch.query_x[t]), learner.predict(b, batch.query_x[t]))
    p_out, c_out = plain.meta_loss(batch), learner.meta_loss(batch)
    assert torch.equal(p_out.query_loss, c_out.query_loss) and torch.equal(p_out.task_losses, c_out.task_losses)
    assert c_out.loss.item() > c_out.query_loss.item()
    p_ev, c_ev = plain.evaluate(batch), learner.evaluate(batch)
    assert torch.equal(p_ev.query_loss, c_ev.query_loss) and torch.equal(p_ev.loss, c_ev.loss)
    if kind == "cross_entropy":
        assert torch.equal(p_ev.query_accuracy, c_ev.query_accuracy)
        acc = c_out.diagnostics["cml.accuracy"]
        assert 0 <= acc.item() <= 1
    with_terms = learner.evaluate(batch, outer_terms=True)
    assert torch.allclose(with_terms.loss, c_out.loss.detach(), rtol=1e-12)


@pytest.mark.parametrize("kind, head", CASES)
def test_weight_zero_is_plain_maml(kind, head):
    model, batch, lr = setup(kind)
    base_out, base = grads_of(MAML(model, inner_lr=lr, loss=kind), batch)
    out, grads = grads_of(MAML(model, inner_lr=lr, loss=kind, plugins=[CML(weight=0.0, head=head)]), batch)
    assert torch.equal(out.loss, base_out.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads[:len(base)], base))
    assert all(g is None for g in grads[len(base):])   # the co-learner is untouched


# -- the mathematics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind, head", CASES)
def test_matches_independent_reference(kind, head, first_order):
    model, batch, lr = setup(kind, seed=1)
    steps = 2 if kind == "mse" else 1
    plug = CML(weight=0.7, head=head)
    learner = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss=kind, plugins=[plug])
    out, grads = grads_of(learner, batch)
    ref = reference_cml(model, batch, plug.co_learner, head=head, lr=lr, steps=steps, first_order=first_order,
                        weight=0.7)
    ref_grads = torch.autograd.grad(ref, list(learner.parameters()))
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert_close_rel(grads, ref_grads, 1e-6)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_second_order_reaches_theta_through_the_inner_update():
    # The co-learner's gradient on θ differs between second and first order: it also flows through ∇L_S in θ'.
    model, batch, lr = setup("mse", seed=2)
    co_grads = []
    for first_order in (False, True):
        torch.manual_seed(5)   # the same co-learner initialisation in both learners
        learner = MAML(model, inner_lr=lr, first_order=first_order, loss="mse", plugins=[CML()])
        out = learner.meta_loss(batch)
        co_grads.append(torch.autograd.grad(out.loss - out.query_loss, list(model.parameters())))
    assert max((a - b).abs().max().item() for a, b in zip(*co_grads)) > 1e-6


@pytest.mark.parametrize("kind, head", CASES)
def test_finite_differences(kind, head):
    model, batch, lr = setup(kind, seed=3, T=3)
    learner = MAML(model, inner_lr=lr, loss=kind, plugins=[CML(head=head)])
    _, grads = grads_of(learner, batch)
    params = list(learner.parameters())
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    # Conv4: a ReLU or max-pool switch makes the inner gradient, hence θ', jump; keep the steps small.
    eps = 1e-6 if kind == "mse" else 1e-7
    assert_directional_derivative(lambda: learner.meta_loss(batch).loss, params, grads, direction, eps)


# -- model extension, registry, errors --------------------------------------------------------------------------------
def test_conv4_feature_map():
    model = conv64()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    out, fmap = model(x, return_features="map")
    assert fmap.shape == (5, *model.map_shape) == (5, 4, 3, 3)
    assert torch.equal(out, model(x))
    assert torch.allclose(fmap, conv4_map_by_hand(dict(model.named_parameters()), x), rtol=1e-12)


def test_registry_and_state():
    plug = methods.create("cml", weight=0.5, head="conv")
    assert isinstance(plug, CML) and plug.weight == 0.5 and not plug.needs_features
    learner = MAML(conv64(), plugins=[plug])
    assert any(k.startswith("plugins.0.co_learner.") for k in learner.state_dict())
    ids = {id(p) for p in learner.parameters()}
    assert all(id(p) in ids for p in plug.co_learner.parameters())
    assert all(p.dtype == torch.float64 for p in plug.co_learner.parameters())
    assert methods.create("cml").needs_features


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="head='conv' needs a model exposing its last feature map"):
        MAML(mlp64(), loss="mse", plugins=[CML(head="conv")])
    with pytest.raises(ValueError, match="unknown CML head"):
        CML(head="resnet")
    with pytest.raises(ValueError, match="weight"):
        CML(weight=-1.0)

    class NoFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    # A plug-in that needs features on a model without return_features is refused by the core.
    with pytest.raises(ValueError, match="needs features.*return_features"):
        MAML(NoFeatures(), plugins=[CML()])
