"""CML: the co-learner never changes adaptation, neutrality, an independent reference, finite differences, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML, Plugin, methods
from metagrad import functional as fn
from metagrad.methods.cml import CML, conv_tap
from metagrad.models import Conv4
from tests.helpers import (
    NoFeatures,
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


# -- where the conv head reads the model, registry, errors ------------------------------------------------------------
def test_conv_head_reads_the_input_of_the_last_pooling_module():
    model = conv64()
    assert conv_tap(model) == ("blocks.3.pool", 4)
    plug = CML(head="conv")
    MAML(model, plugins=[plug])
    assert plug.tap == "blocks.3.pool" and CML().tap is None
    x = torch.rand(2, 5, 1, 28, 28, dtype=torch.float64)
    _, fmap = fn.forward_batched(model, fn.expand_tasks(fn.meta_params(model), 2), x, tap=plug.tap)
    assert fmap.shape == (2, 5, 4, 3, 3)
    for t in range(2):
        assert torch.allclose(fmap[t], conv4_map_by_hand(dict(model.named_parameters()), x[t]), rtol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_head_gradients_through_conv4s_kernel_equal_the_generic_hook(first_order, monkeypatch):
    """Conv4's grouped kernel computes the tap itself; with the kernel not knowing it, a hook on the module reads
    it per task. The loss and every meta-gradient agree (float64, 1e-10)."""
    model, batch, lr = setup("cross_entropy", seed=4, T=5)
    results = []
    for known in (True, False):
        if not known:
            monkeypatch.setitem(fn._TAPS, Conv4, lambda m: ())
        torch.manual_seed(6)
        learner = MAML(model, inner_lr=lr, inner_steps=2, first_order=first_order, plugins=[CML(head="conv")])
        results.append(grads_of(learner, batch))
    (out, grads), (ref_out, ref_grads) = results
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-10, atol=0)
    assert_close_rel(grads, ref_grads, 1e-10)


class SmallCNN(nn.Module):
    """Not a Conv4: pooling modules inside an nn.Sequential, average pooling last."""

    def __init__(self, readout: nn.Module | None = None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), readout or nn.AvgPool2d(2))
        self.head = nn.Linear(4 if readout is not None else 4 * 3 * 3, 3)

    def forward(self, x, return_features=False):
        feats = self.features(x).flatten(1)
        out = self.head(feats)
        return (out, feats) if return_features else out


def test_conv_head_on_another_model_reads_its_last_pooling_input():
    torch.manual_seed(0)
    model = SmallCNN().double()
    assert conv_tap(model) == ("features.5", 4)
    batch = image_batch(T=3, size=12)
    plug = CML(weight=0.5, head="conv")
    learner = MAML(model, inner_lr=0.3, plugins=[plug])
    out, grads = grads_of(learner, batch)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # The co-learner's term, by hand: φ on each task's adapted map before the average pooling.
    q, terms = dict(plug.co_learner.named_parameters()), []
    for t in range(3):
        fast = learner.adapt(batch.support_x[t], batch.support_y[t])
        fmap = functional_call(model.features[:5], {k[len("features."):]: v for k, v in fast.items()
                                                    if k.startswith("features.")}, (batch.query_x[t],))
        terms.append(F.cross_entropy(co_learner_by_hand("conv", q, fmap), batch.query_y[t]))
    assert torch.allclose(out.loss - out.query_loss, 0.5 * torch.stack(terms).mean(), rtol=1e-10)


def test_a_model_without_a_fitting_pooling_module_is_refused():
    for model, loss in ((mlp64(), "mse"), (Conv4(1, ways=3, width=4, pool="stride").double(), "cross_entropy")):
        with pytest.raises(ValueError, match="head='conv' reads the input of the model's last 2-D pooling module.*"
                                             "use head='mlp'"):
            MAML(model, loss=loss, plugins=[CML(head="conv")])
    # A pooling that does not halve the map (a global mean): found, but its map does not fit the co-learner.
    torch.manual_seed(0)
    learner = MAML(SmallCNN(nn.AdaptiveAvgPool2d(1)).double(), inner_lr=0.3, plugins=[CML(head="conv")])
    with pytest.raises(ValueError, match=r"map at 'features.5' has shape \[4, 6, 6\].*use head='mlp'"):
        learner.meta_loss(image_batch(T=2, size=12))


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
    with pytest.raises(ValueError, match="head='conv' reads the input of the model's last 2-D pooling module"):
        MAML(mlp64(), loss="mse", plugins=[CML(head="conv")])
    with pytest.raises(ValueError, match="unknown CML head"):
        CML(head="resnet")
    with pytest.raises(ValueError, match="weight"):
        CML(weight=-1.0)

    # A plug-in that needs features on a model without return_features is refused by the core.
    with pytest.raises(ValueError, match="needs features.*return_features"):
        MAML(NoFeatures(), plugins=[CML()])
