"""The mathematics of the MAML core: hand-derived gradients, an independent reference, finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML
from metagrad.models import MLP, Conv4
from tests.helpers import (
    assert_close_rel,
    assert_directional_derivative,
    image_batch,
    learner_meta_grad,
    reference_meta_grad,
    regression_batch,
)


class Scalar(nn.Module):
    """f(x) = w·x, the tiny linear model of the hand-derived test."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        return self.w * x


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_meta_gradient_by_hand(first_order):
    batch = regression_batch(T=1)
    xs, ys, xq, yq = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
    w, a = 0.7, 0.05
    learner = MAML(Scalar(w), inner_lr=a, loss="mse", first_order=first_order)
    loss, (grad,) = learner_meta_grad(learner, batch)
    # L_S(w) = mean((w xs − ys)²); w' = w − a·2·mean(xs (w xs − ys)); dw'/dw = 1 − 2a·mean(xs²)
    w1 = w - a * 2 * (xs * (w * xs - ys)).mean()
    dlq = 2 * (xq * (w1 * xq - yq)).mean()
    expected = dlq if first_order else dlq * (1 - 2 * a * (xs ** 2).mean())
    assert torch.allclose(loss, ((w1 * xq - yq) ** 2).mean(), rtol=1e-12)
    assert torch.allclose(grad, expected.reshape(1), rtol=1e-10)


def test_two_step_second_order_by_hand():
    batch = regression_batch(T=1, seed=3)
    xs, ys, xq, yq = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
    w, a = -0.3, 0.1
    learner = MAML(Scalar(w), inner_lr=a, inner_steps=2, loss="mse")
    _, (grad,) = learner_meta_grad(learner, batch)
    s2, sxy = (xs ** 2).mean(), (xs * ys).mean()
    step = lambda w: w - a * 2 * (w * s2 - sxy)
    w2 = step(step(w))
    expected = 2 * (xq * (w2 * xq - yq)).mean() * (1 - 2 * a * s2) ** 2
    assert torch.allclose(grad, expected.reshape(1), rtol=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_mlp_matches_reference(first_order, steps):
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    batch = regression_batch()
    learner = MAML(model, inner_lr=0.05, inner_steps=steps, first_order=first_order, loss="mse")
    loss, grads = learner_meta_grad(learner, batch)
    ref_loss, ref = reference_meta_grad(model, batch, 0.05, steps, first_order, nn.functional.mse_loss)
    assert torch.allclose(loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_conv4_matches_reference(first_order, steps):
    torch.manual_seed(0)
    model = Conv4(1, ways=3, width=4, image_size=28).double()
    batch = image_batch()
    learner = MAML(model, inner_lr=0.4, inner_steps=steps, first_order=first_order)
    loss, grads = learner_meta_grad(learner, batch)
    ref_loss, ref = reference_meta_grad(model, batch, 0.4, steps, first_order, nn.functional.cross_entropy)
    assert torch.allclose(loss, ref_loss, rtol=1e-10)
    assert_close_rel(grads, ref)


def test_finite_differences_through_two_inner_steps():
    torch.manual_seed(1)
    model = MLP(1, (6, 6), 1).double()
    batch = regression_batch(seed=5)
    learner = MAML(model, inner_lr=0.1, inner_steps=2, loss="mse")
    _, grads = learner_meta_grad(learner, batch)
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]
    assert_directional_derivative(lambda: learner.meta_loss(batch).loss, params, grads, direction, eps=1e-6)


def test_first_order_differs_from_second_order():
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    batch = regression_batch()
    _, second = learner_meta_grad(MAML(model, inner_lr=0.1, loss="mse"), batch)
    _, first = learner_meta_grad(MAML(model, inner_lr=0.1, loss="mse", first_order=True), batch)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(first, second))
    assert rel > 1e-3
    # First order: the meta-gradient is the query gradient at θ', applied to θ.
    fast = MAML(model, inner_lr=0.1, loss="mse").adapt(batch.support_x[0], batch.support_y[0], create_graph=False)
    fast = {n: v.detach().requires_grad_() for n, v in fast.items()}
    q = nn.functional.mse_loss(functional_call(model, fast, (batch.query_x[0],)), batch.query_y[0])
    expected = torch.autograd.grad(q, list(fast.values()))
    _, got = learner_meta_grad(MAML(model, inner_lr=0.1, loss="mse", first_order=True), batch.select([0]))
    assert_close_rel(got, expected, 1e-10)


def test_adapt_in_training_mode_keeps_the_path_to_theta_in_first_order():
    """First order treats the inner gradients as constants, but θ' = θ − α·g still depends on θ: the gradient of
    a query loss at adapt()'s θ' is the first-order meta-gradient. Eval mode returns no graph."""
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    batch = regression_batch()
    learner = MAML(model, inner_lr=0.1, inner_steps=2, loss="mse", first_order=True)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert all(v.requires_grad for v in fast.values())
    query = nn.functional.mse_loss(learner.predict(fast, batch.query_x[0]), batch.query_y[0])
    got = torch.autograd.grad(query, list(model.parameters()))
    _, expected = reference_meta_grad(model, batch.select([0]), 0.1, 2, True, nn.functional.mse_loss)
    assert_close_rel(got, expected, 1e-10)
    learner.eval()
    assert not any(v.requires_grad for v in learner.adapt(batch.support_x[0], batch.support_y[0]).values())


def test_anil_adapts_only_the_head():
    torch.manual_seed(0)
    model = Conv4(1, ways=3, width=4).double()
    learner = MAML(model, inner_lr=0.4, inner_steps=2, adapt="head")
    assert learner.adapted == ("head.weight", "head.bias")
    batch = image_batch()
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    for n, p in model.named_parameters():
        same = torch.equal(fast[n], p)
        assert same != n.startswith("head."), n
    _, grads = learner_meta_grad(learner, batch)
    _, ref = reference_meta_grad(model, batch, 0.4, 2, False, nn.functional.cross_entropy,
                                 adapt=["head.weight", "head.bias"])
    assert_close_rel(grads, ref)


def test_no_norm_skips_batchnorm_affine():
    learner = MAML(Conv4(1, ways=3, width=4), adapt="no_norm")
    assert not any(".bn." in n for n in learner.adapted)
    assert "blocks.0.conv.weight" in learner.adapted and "head.bias" in learner.adapted


def test_evaluate_and_adapt_agree_with_meta_loss():
    torch.manual_seed(0)
    model = Conv4(1, ways=3, width=4).double()
    learner = MAML(model, inner_lr=0.4, inner_steps=2)
    batch = image_batch(T=3)
    train = learner.meta_loss(batch)
    ev = learner.evaluate(batch)
    assert not ev.loss.requires_grad
    assert torch.allclose(train.task_losses.detach(), ev.task_losses, rtol=1e-10)
    assert torch.allclose(train.query_accuracy, ev.query_accuracy)
    for t in range(3):
        fast = learner.adapt(batch.support_x[t], batch.support_y[t])
        logits = learner.predict(fast, batch.query_x[t])
        assert torch.allclose(nn.functional.cross_entropy(logits, batch.query_y[t]), ev.task_losses[t], rtol=1e-10)
    zero = learner.evaluate(batch, inner_steps=0)
    plain = nn.functional.cross_entropy(model(batch.query_x[0]), batch.query_y[0])
    assert torch.allclose(zero.task_losses[0], plain.detach(), rtol=1e-10)


def test_deterministic():
    def run():
        torch.manual_seed(0)
        learner = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, loss="mse")
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        for i in range(3):
            opt.zero_grad()
            learner.meta_loss(regression_batch(seed=i, dtype=torch.float32)).loss.backward()
            opt.step()
        return [p.detach().clone() for p in learner.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="adapt"):
        MAML(MLP(), adapt="some")
    with pytest.raises(ValueError, match="loss"):
        MAML(MLP(), loss="hinge")
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(MLP(), inner_lr=0.0)
