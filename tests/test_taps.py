"""Taps: ``functional.forward_batched(model, params, x, tap=name)`` returns the input of a named submodule.

The generic path (any model) hooks the module while each task runs and returns the captured input through the
per-task function; Conv4's grouped kernel computes the taps it knows itself. Both must give the same values and
first and second derivatives (float64, 1e-10), also through an inner step (second-order MAML).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metagrad import functional as fn
from metagrad.batched import conv4 as conv4_module
from metagrad.models import MLP, Conv4

REL = 1e-10


def assert_rel(got, want, rel=REL):
    """Per tensor: max|a − b| / max|b| < rel (a tensor whose exact values are zero, such as the gradient of a conv
    bias that BatchNorm cancels, is scaled by 1e-3 of the largest instead)."""
    overall = max(b.abs().max().item() for b in want)
    for n, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (n, a.shape, b.shape)
        scale = max(b.abs().max().item(), 1e-3 * overall, 1e-300)
        err = (a - b).abs().max().item() / scale
        assert err < rel, (n, err)


def randomised_conv4(channels=1, size=28, bias=False, pool="max", width=5, seed=0):
    torch.manual_seed(seed)
    model = Conv4(channels, ways=3, width=width, bias=bias, pool=pool, image_size=size).double()
    with torch.no_grad():   # BatchNorm affine parameters away from (1, 0): every term of the algebra counts
        for n, p in model.named_parameters():
            if ".bn." in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model


def pre_pool_by_hand(p, x, block, pool="max"):
    """Conv4's block ``block`` map before its pooling, from the layer definitions (no metagrad code)."""
    for i in range(block + 1):
        b = f"blocks.{i}."
        x = F.conv2d(x, p[b + "conv.weight"], p.get(b + "conv.bias"), padding=1, stride=2 if pool == "stride" else 1)
        x = torch.relu(F.batch_norm(x, None, None, p[b + "bn.weight"], p[b + "bn.bias"], training=True, eps=1e-5))
        if i < block and pool == "max":
            x = F.max_pool2d(x, 2)
    return x


def adapted(model, x, y, T, lr=0.3, seed=1):
    """Per-task parameters ``[T, *shape]`` after one second-order inner step from task-perturbed θ, and θ."""
    g = torch.Generator().manual_seed(seed)
    theta = fn.meta_params(model)
    start = {n: p + 0.05 * torch.randn(T, *p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}
    loss = F.cross_entropy(fn.forward_per_task(model, start, x).flatten(0, 1), y.flatten())
    grads = torch.autograd.grad(loss, list(start.values()), create_graph=True)
    return {n: p - lr * gr for (n, p), gr in zip(start.items(), grads)}, list(theta.values())


def derivatives(values, inputs, weights):
    """First and second derivatives of Σ_k Σ weight·value_k² w.r.t. ``inputs``."""
    total = sum((weights.view(-1, *[1] * (v.dim() - 1)) * v.square()).sum() for v in values)
    g = torch.autograd.grad(total, inputs, create_graph=True)
    return list(g) + list(torch.autograd.grad(sum((a * a).sum() for a in g), inputs, retain_graph=True))


# -- Conv4: the kernel's taps against the generic hooked path ----------------------------------------------------
@pytest.mark.parametrize("channels,size,bias,pool,group_images", [
    (1, 28, False, "max", 64), (3, 32, True, "max", 64),
    (1, 28, False, "max", 8),      # 4 images per task: groups of 2 tasks, then 1
    (1, 28, False, "max", 1),      # one task at a time (the kernel's per-task path)
    (1, 28, False, "stride", 64), (4, 12, False, "none", 64),
])
@pytest.mark.parametrize("tap", ["blocks.0.pool", "blocks.2.pool", "blocks.3.pool", "head"])
def test_conv4_kernel_taps_equal_the_generic_path_through_an_inner_step(channels, size, bias, pool, group_images,
                                                                         tap, monkeypatch):
    monkeypatch.setattr(conv4_module, "GROUP_IMAGES", group_images)
    model = randomised_conv4(channels, size, bias, pool)
    T, n = 3, 4
    g = torch.Generator().manual_seed(2)
    x = torch.rand(T, n, channels, size, size, generator=g, dtype=torch.float64)
    y = torch.arange(n).remainder(3).expand(T, n)
    params, theta = adapted(model, x, y, T)
    assert tap in conv4_module.conv4_taps(model)
    out, got = fn.forward_batched(model, params, x, tap=tap)                 # the kernel
    ref_out, want = fn.forward_per_task(model, params, x, tap=tap)           # hooks on the module
    assert got.shape == want.shape and got.shape[:2] == (T, n)
    assert_rel([out, got], [ref_out, want])
    assert torch.equal(out, fn.forward_batched(model, params, x))            # the tap leaves the output as it is
    # Each task weighted differently, so a mix-up between tasks cannot cancel out; through θ' to θ.
    w = torch.arange(1, T + 1, dtype=torch.float64)
    assert_rel(derivatives([out, got], theta, w), derivatives([ref_out, want], theta, w))


@pytest.mark.parametrize("block", [0, 3])
def test_conv4_block_tap_is_the_map_before_its_pooling(block):
    model = randomised_conv4()
    x = torch.rand(2, 5, 1, 28, 28, dtype=torch.float64)
    params = fn.expand_tasks(fn.meta_params(model), 2)
    _, fmap = fn.forward_batched(model, params, x, tap=f"blocks.{block}.pool")
    want = torch.stack([pre_pool_by_hand(fn.meta_params(model), x[t], block) for t in range(2)])
    assert fmap.shape == want.shape == (2, 5, 5, 28 >> block, 28 >> block)
    assert_rel([fmap], [want])


def test_forward_batched_runs_known_taps_in_the_kernel_and_others_generically(monkeypatch):
    model = randomised_conv4(width=4)
    x = torch.rand(3, 4, 1, 28, 28, dtype=torch.float64)
    params = fn.expand_tasks(fn.meta_params(model), 3)
    generic = fn.tapped

    def no_hooks(*a, **k):
        raise AssertionError("the generic path ran")

    monkeypatch.setattr(fn, "tapped", no_hooks)
    fn.forward_batched(model, params, x, tap="blocks.3.pool")               # the kernel: no hook
    with pytest.raises(AssertionError, match="generic path"):
        fn.forward_batched(model, params, x, tap="blocks.3.bn")             # not the kernel's: hooks
    monkeypatch.setattr(fn, "tapped", generic)
    _, after_bn = fn.forward_batched(model, params, x, tap="blocks.3.relu")  # the input of the ReLU: BN's output
    _, fmap = fn.forward_batched(model, params, x, tap="blocks.3.pool")
    assert_rel([fmap], [torch.relu(after_bn)])                               # the kernel rounds its own way
    with pytest.raises(ValueError, match="conv4_forward_batched: unknown tap 'blocks.3.relu'"):
        conv4_module.conv4_forward_batched(model, params, x, tap="blocks.3.relu")


def test_conv4_kernel_taps_step_aside_for_hooks():
    model = randomised_conv4(width=4)
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    params = fn.expand_tasks(fn.meta_params(model), 2)
    fast = fn.forward_batched(model, params, x, tap="blocks.3.pool")
    calls = []
    handle = model.blocks[3].pool.register_forward_hook(lambda *a: calls.append(1))
    hooked = fn.forward_batched(model, params, x, tap="blocks.3.pool")
    handle.remove()
    assert calls == [1, 1]          # the module's own forward ran, once per task
    assert_rel(list(hooked), list(fast))


# -- the generic path: any model ----------------------------------------------------------------------------------
def mlp_params(T=3, seed=0):
    torch.manual_seed(seed)
    model = MLP(2, (6, 5), 3).double()
    g = torch.Generator().manual_seed(seed)
    params = {n: (p + 0.1 * torch.randn(T, *p.shape, generator=g, dtype=p.dtype)).requires_grad_()
              for n, p in fn.meta_params(model).items()}
    return model, params, torch.randn(T, 7, 2, generator=g, dtype=torch.float64)


def test_generic_tap_on_any_model():
    model, params, x = mlp_params()
    out, h = fn.forward_batched(model, params, x, tap="layers.2")          # the input of the last Linear
    assert torch.equal(out, fn.forward_per_task(model, params, x))
    for t in range(3):
        o, feats = functional_call(model, fn.task_slice(params, t), (x[t],), {"return_features": True})
        assert torch.equal(out[t], o) and torch.equal(h[t], feats)
    _, inputs = fn.forward_batched(model, params, x, tap="layers.0")        # the model's input itself
    assert torch.equal(inputs, x)
    # Differentiable like any output: the tapped input's gradient reaches the earlier layers' parameters.
    grads = torch.autograd.grad(h.square().sum(), [params["layers.0.weight"], params["layers.2.weight"]],
                                allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None


def test_tapped_function_maps_over_tasks_with_vmap():
    """The captured input leaves through the function's return value, so torch.func.vmap maps it like the output."""
    model, params, x = mlp_params()
    for tap in ("layers.1", "layers.2"):
        out, h = vmap(fn.tapped(model, tap))(params, x)
        want_out, want_h = fn.forward_per_task(model, params, x, tap=tap)
        assert_rel([out, h], [want_out, want_h], 1e-14)
    model = randomised_conv4(width=4)
    xs = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    params = {n: p + 0.01 * torch.arange(2, dtype=p.dtype).view(-1, *[1] * p.dim())
              for n, p in fn.meta_params(model).items()}
    out, fmap = vmap(fn.tapped(model, "blocks.3.pool"))(params, xs)
    assert_rel([out, fmap], list(fn.forward_batched(model, params, xs, tap="blocks.3.pool")))


def test_bad_taps_are_refused_in_one_line():
    model, params, x = mlp_params()
    with pytest.raises(ValueError, match="tap 'layers.7': MLP has no such submodule"):
        fn.forward_batched(model, params, x, tap="layers.7")
    with pytest.raises(ValueError, match="return_features or tap, not both"):
        fn.forward_batched(model, params, x, return_features=True, tap="layers.2")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(self.lin(x))

    twice = Twice().double()
    with pytest.raises(ValueError, match="ran 2 times in one forward of Twice"):
        fn.forward_batched(twice, fn.expand_tasks(fn.meta_params(twice), 3), x, tap="lin")
