"""The fast paths equal the plain per-task functional loop (float64, 1e-10 relative).

Fast paths under test: Conv4's plain forward, its registered batched forward (``metagrad.batched.conv4``): one task
with the first block fused conv+BatchNorm on unfolded patches, pooling before the ReLU, channels-last layout, and
grouped convolutions over tasks; the unbind-based task loop of ``functional.forward_batched``, MLP's bmm
``forward_batched``, and ``meta_backward`` (the meta-gradient taken chunk by chunk of tasks). The reference is
written from the layer definitions, independent of metagrad's code. Chunks for every plug-in:
tests/test_chunks.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metagrad import MAML, TaskBatch, meta_backward
from metagrad import chunks as chunks_module
from metagrad import functional as fn
from metagrad.batched import conv4 as conv4_module
from metagrad.batched import tnet as tnet_module
from metagrad.models import MLP, Conv4, TNet

REL = 1e-10


def conv4_reference(params: dict[str, torch.Tensor], x: torch.Tensor, pool: str = "max") -> torch.Tensor:
    """Conv4 from its definition: conv → BatchNorm (batch statistics) → ReLU → MaxPool, then a Linear head;
    pool="stride": stride-2 convolutions, no pooling, the last map averaged over its positions (Finn et al.)."""
    for i in range(4):
        p = f"blocks.{i}."
        x = F.conv2d(x, params[p + "conv.weight"], params.get(p + "conv.bias"), padding=1,
                     stride=2 if pool == "stride" else 1)
        x = F.batch_norm(x, None, None, params[p + "bn.weight"], params[p + "bn.bias"], training=True, eps=1e-5)
        x = torch.relu(x)
        if pool == "max":
            x = F.max_pool2d(x, 2)
    feats = x.mean((2, 3)) if pool == "stride" else x.flatten(1)
    return F.linear(feats, params["head.weight"], params["head.bias"])


def reference(forward, theta, batch, lr, steps, first_order, loss_fn, adapt=None):
    """Loss and meta-gradient of a per-task unrolled loop (no metagrad code)."""
    adapt = list(theta) if adapt is None else adapt
    total = 0.0
    for t in range(len(batch)):
        fast = dict(theta)
        for _ in range(steps):
            loss = loss_fn(forward(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
            fast = {**fast, **{n: fast[n] - lr * g for n, g in zip(adapt, grads)}}
        total = total + loss_fn(forward(fast, batch.query_x[t]), batch.query_y[t])
    total = total / len(batch)
    return total, torch.autograd.grad(total, list(theta.values()))


def assert_rel(got, want, rel=REL):
    """Per tensor: max|a − b| / max|b| < rel. Tensors whose gradient is zero in exact arithmetic (a conv bias
    that BatchNorm cancels) are scaled by 1e-3 of the largest gradient instead of their rounding noise."""
    overall = max(b.abs().max().item() for b in want)
    for n, (a, b) in enumerate(zip(got, want)):
        scale = max(b.abs().max().item(), 1e-3 * overall, 1e-300)
        err = (a - b).abs().max().item() / scale
        assert err < rel, (n, err)


def assert_same_derivatives(out, ref, inputs, weight=1.0):
    """First and second derivatives of Σ weight·out² w.r.t. ``inputs`` equal those of the reference output."""
    g = torch.autograd.grad((weight * out.square()).sum(), inputs, create_graph=True)
    gr = torch.autograd.grad((weight * ref.square()).sum(), inputs, create_graph=True)
    assert_rel(g, gr)
    h = torch.autograd.grad(sum((a * a).sum() for a in g), inputs)
    hr = torch.autograd.grad(sum((a * a).sum() for a in gr), inputs)
    assert_rel(h, hr)


def images(T=3, ways=3, shots=1, queries=2, size=28, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).clone()
    yq = torch.arange(ways).repeat_interleave(queries).expand(T, -1).clone()
    return TaskBatch(torch.rand(T, ways * shots, channels, size, size, generator=g, dtype=torch.float64), ys,
                     torch.rand(T, ways * queries, channels, size, size, generator=g, dtype=torch.float64), yq)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, with BatchNorm affine parameters away from (1, 0) so every term of the algebra is exercised."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bn." in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model


# -- Conv4's forward -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size,bias,pool", [(1, 28, False, "max"), (3, 32, False, "max"),
                                                     (1, 28, True, "max"), (1, 12, False, "none"),
                                                     (1, 28, False, "stride"), (3, 21, True, "stride")])
def test_conv4_forward_and_double_backward_match_definition(channels, size, bias, pool):
    model = randomised(Conv4(channels, ways=4, width=6, bias=bias, pool=pool, image_size=size))
    x = torch.rand(5, channels, size, size, dtype=torch.float64)
    theta = dict(model.named_parameters())
    for forward in (model, lambda x: fn.forward_single(model, theta, x)):   # plain; fused first block, pool first
        out, ref = forward(x), conv4_reference(theta, x, pool)
        assert_rel([out], [ref])
        assert_same_derivatives(out, ref, list(theta.values()))


def test_conv4_fused_block_steps_aside_for_hooks():
    model = randomised(Conv4(1, ways=3, width=4))
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    theta = dict(model.named_parameters())
    fused = fn.forward_single(model, theta, x)
    calls = []
    handle = model.blocks[0].conv.register_forward_hook(lambda *a: calls.append(1))
    hooked = fn.forward_single(model, theta, x)
    handle.remove()
    assert calls == [1]
    assert_rel([hooked], [fused])


def test_conv4_features_keep_their_meaning():
    model = randomised(Conv4(1, ways=3, width=4))
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    out, feats = model(x, return_features=True)
    assert feats.shape == (4, 4) and torch.allclose(out, model.head(feats), rtol=1e-12)


# -- the learner's fast paths against the reference loop ---------------------------------------------------------
def meta_grads(learner, batch, chunk=None):
    """The meta-loss and the model's meta-gradient: through the whole batch's graph (``chunk`` None), or by
    ``meta_backward`` with ``chunk`` tasks per chunk ("auto": sized automatically)."""
    if chunk is None:
        out = learner.meta_loss(batch)
        return out, torch.autograd.grad(out.loss, list(learner.model.parameters()))
    learner.zero_grad(set_to_none=True)
    out = meta_backward(learner, batch, None if chunk == "auto" else chunk)
    return out, [p.grad for p in learner.model.parameters()]


@pytest.mark.parametrize("chunk", [None, 1], ids=["graph", "chunks"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_conv4_meta_gradient_matches_reference_loop(chunk, first_order, steps):
    model = randomised(Conv4(1, ways=3, width=4))
    batch = images(T=3)
    learner = MAML(model, inner_lr=0.4, inner_steps=steps, first_order=first_order)
    out, grads = meta_grads(learner, batch, chunk)
    ref_loss, ref = reference(conv4_reference, dict(model.named_parameters()), batch, 0.4, steps, first_order,
                              F.cross_entropy)
    assert torch.allclose(out.loss, ref_loss, rtol=REL)
    assert_rel(grads, ref)


@pytest.mark.parametrize("adapt", ["head", "no_norm"])
def test_conv4_partial_adaptation_matches_reference_loop(adapt):
    model = randomised(Conv4(3, ways=3, width=4, image_size=32))
    batch = images(T=2, size=32, channels=3)
    learner = MAML(model, inner_lr=0.3, inner_steps=2, adapt=adapt)
    out = learner.meta_loss(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    _, ref = reference(conv4_reference, dict(model.named_parameters()), batch, 0.3, 2, False, F.cross_entropy,
                       adapt=list(learner.adapted))
    assert_rel(grads, ref)


@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_batched_meta_gradient_matches_reference_loop(first_order):
    torch.manual_seed(0)
    model = MLP(1, (16, 16), 1).double()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(*(torch.randn(5, n, 1, generator=g, dtype=torch.float64) for n in (4, 4, 6, 6)))
    learner = MAML(model, inner_lr=0.05, inner_steps=3, first_order=first_order, loss="mse")
    out = learner.meta_loss(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ref_loss, ref = reference(lambda p, x: functional_call(model, p, (x,)), dict(model.named_parameters()), batch,
                              0.05, 3, first_order, F.mse_loss)
    assert torch.allclose(out.loss, ref_loss, rtol=REL)
    assert_rel(grads, ref)


def test_forward_batched_loop_equals_per_task_calls():
    model = randomised(Conv4(1, ways=3, width=4))
    batch = images(T=3)
    theta = fn.meta_params(model)
    params = {n: torch.stack([p + 0.01 * t for t in range(3)]) for n, p in theta.items()}
    out, feats = fn.forward_per_task(model, params, batch.query_x, return_features=True)
    for t in range(3):
        o, f = functional_call(model, fn.task_slice(params, t), (batch.query_x[t],), {"return_features": True})
        assert torch.equal(out[t], o) and torch.equal(feats[t], f)
    for forward in (fn.forward_per_task, fn.forward_batched):
        with pytest.raises(ValueError, match="tasks"):
            forward(model, params, batch.query_x[:2])


@pytest.mark.parametrize("channels,size,bias,pool,group_images", [
    (1, 28, False, "max", 64), (3, 32, False, "max", 64), (1, 28, True, "max", 64), (4, 12, False, "none", 64),
    (1, 28, False, "max", 8),     # 4 images per task: groups of 2 tasks, then 1
    (1, 28, False, "stride", 64), (3, 21, True, "stride", 64),
])
def test_conv4_grouped_forward_batched_matches_per_task_definition(channels, size, bias, pool, group_images,
                                                                   monkeypatch):
    """Conv4's batched forward (grouped convolutions over tasks, per-task BN statistics) against the definition
    per task: outputs, features, and first and second derivatives w.r.t. the task-stacked parameters (its taps:
    tests/test_taps.py)."""
    monkeypatch.setattr(conv4_module, "GROUP_IMAGES", group_images)
    model = randomised(Conv4(channels, ways=3, width=5, bias=bias, pool=pool, image_size=size))
    T = 3
    g = torch.Generator().manual_seed(2)
    x = torch.rand(T, 4, channels, size, size, generator=g, dtype=torch.float64)
    params = {n: (p + 0.05 * torch.randn(T, *p.shape, generator=g, dtype=p.dtype)).requires_grad_()
              for n, p in fn.meta_params(model).items()}
    out, feats = fn.forward_batched(model, params, x, return_features=True)
    ref = torch.stack([conv4_reference(fn.task_slice(params, t), x[t], pool) for t in range(T)])
    assert out.shape == ref.shape == (T, 4, 3)
    assert_rel([out], [ref])
    assert torch.allclose(out, torch.einsum("tnf,tof->tno", feats, params["head.weight"])
                          + params["head.bias"].unsqueeze(1), rtol=1e-12)
    # Each task's loss weighted differently, so a mix-up between tasks cannot cancel out.
    w = torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1)
    assert_same_derivatives(out, ref, list(params.values()), w)


def test_conv4_grouped_forward_batched_steps_aside_for_hooks_and_checks_shapes():
    model = randomised(Conv4(1, ways=3, width=4))
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    params = {n: p.unsqueeze(0).expand(2, *p.shape) for n, p in fn.meta_params(model).items()}
    grouped = fn.forward_batched(model, params, x)
    calls = []
    handle = model.blocks[2].bn.register_forward_hook(lambda *a: calls.append(1))
    hooked = fn.forward_batched(model, params, x)
    handle.remove()
    assert calls == [1, 1]          # the per-task loop ran: once per task
    assert_rel([hooked], [grouped])
    with pytest.raises(ValueError, match=r"expected \[T, n, 1, H, W\]"):
        fn.forward_batched(model, params, x[:, :, 0])


# -- T-Net's folded forward ---------------------------------------------------------------------------------------
def tnet_reference(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T-Net on Conv4 (max-pooling) from its definition: each conv's and the head's output mixed over its
    channels by that layer's transform T (``out[:, i] = Σ_j T_ij out[:, j]``), then the block goes on as Conv4's."""
    def mix(t, y):
        return torch.einsum("ij,nj...->ni...", t, y)

    for i in range(4):
        p = f"model.blocks.{i}."
        x = mix(params[f"transforms.blocks_{i}_conv.weight"],
                F.conv2d(x, params[p + "conv.weight"], params.get(p + "conv.bias"), padding=1))
        x = F.batch_norm(x, None, None, params[p + "bn.weight"], params[p + "bn.bias"], training=True, eps=1e-5)
        x = F.max_pool2d(torch.relu(x), 2)
    feats = x.flatten(1)
    out = mix(params["transforms.head.weight"], F.linear(feats, params["model.head.weight"], params["model.head.bias"]))
    return out, feats


def randomised_tnet(bias: bool = False, seed: int = 0) -> TNet:
    """A float64 T-Net on Conv4 with its transforms off the identity (so folding them in is exercised)."""
    net = TNet(randomised(Conv4(1, ways=3, width=5, bias=bias), seed)).double()
    with torch.no_grad():
        for t in net.transforms.values():
            t.weight.add_(0.3 * torch.randn_like(t.weight))
    return net


@pytest.mark.parametrize("bias", [False, True])
def test_tnet_folded_forward_batched_matches_definition(bias):
    """T-Net's registered forward (transforms folded into the weights, Conv4's grouped kernel) against the
    definition per task: outputs, features, a tap, and first and second derivatives w.r.t. every parameter,
    the transforms included."""
    net = randomised_tnet(bias)
    T = 3
    g = torch.Generator().manual_seed(3)
    x = torch.rand(T, 4, 1, 28, 28, generator=g, dtype=torch.float64)
    params = {n: (p + 0.05 * torch.randn(T, *p.shape, generator=g, dtype=p.dtype)).requires_grad_()
              for n, p in fn.meta_params(net).items()}
    assert tnet_module.foldable(net)
    out, feats = fn.forward_batched(net, params, x, return_features=True)
    ref = [tnet_reference(fn.task_slice(params, t), x[t]) for t in range(T)]
    assert_rel([out, feats], [torch.stack([o for o, _ in ref]), torch.stack([f for _, f in ref])])
    w = torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1)
    assert_same_derivatives(out, torch.stack([o for o, _ in ref]), list(params.values()), w)
    _, fmap = fn.forward_batched(net, params, x, tap="model.blocks.3.pool")
    _, want = fn.forward_per_task(net, params, x, tap="model.blocks.3.pool")     # the module's hooked forward
    assert_rel([fmap], [want])
    one = fn.forward_single(net, fn.task_slice(params, 1), x[1])
    assert_rel([one], [ref[1][0]])


def test_tnet_meta_gradient_matches_reference_loop():
    """MAML on T-Net (second order, two inner steps, the transforms never adapted) through the folded forward
    against the per-task unrolled loop on the definition."""
    net = randomised_tnet()
    batch = images(T=3)
    learner = MAML(net, inner_lr=0.4, inner_steps=2)
    out, grads = meta_grads(learner, batch)
    theta = dict(net.named_parameters())
    adapt = [n for n in theta if not n.startswith("transforms.")]
    ref_loss, ref = reference(lambda p, x: tnet_reference(p, x)[0], theta, batch, 0.4, 2, False, F.cross_entropy,
                              adapt)
    assert torch.allclose(out.loss, ref_loss, rtol=REL)
    assert_rel(grads, ref)


def test_tnet_runs_per_task_where_folding_does_not_hold(monkeypatch):
    """A hook on the T-Net, a wrapped model with no registered batched forward (MLP), or a grouped convolution:
    the module's own forward runs per task (its hooks fire), with the same outputs."""
    net = randomised_tnet()
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    params = {n: p.unsqueeze(0).expand(2, *p.shape) for n, p in fn.meta_params(net).items()}
    folded = fn.forward_batched(net, params, x)
    calls = []
    handle = net.model.blocks[1].bn.register_forward_hook(lambda *a: calls.append(1))
    hooked = fn.forward_batched(net, params, x)
    handle.remove()
    assert calls == [1, 1]
    assert_rel([hooked], [folded])
    assert not tnet_module.foldable(TNet(MLP(3, (4,), 2)))

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    monkeypatch.setitem(fn._BATCHED, Grouped, lambda model, params, x, return_features=False:
                        fn.forward_per_task(model, params, x, return_features))
    assert fn.batched_forward_of(Grouped()) is not None
    assert not tnet_module.foldable(TNet(Grouped()))


# -- meta_backward's chunks against the whole batch's graph ---------------------------------------------------------
@pytest.mark.parametrize("T", [3, 4])
@pytest.mark.parametrize("first_order", [False, True])
def test_one_chunk_is_the_whole_graph_bit_for_bit(T, first_order):
    """One chunk of all T tasks: the graph's computation, so the graph's bits. (Chunks of other sizes run Conv4's
    grouped convolutions with other group counts, whose double backward rounds differently: the next test.)"""
    model = randomised(Conv4(1, ways=3, width=4))
    batch = images(T=T)
    learner = MAML(model, inner_lr=0.4, inner_steps=2, first_order=first_order)
    (whole, wg), (chunked, cg) = meta_grads(learner, batch), meta_grads(learner, batch, chunk=T)
    assert torch.equal(chunked.loss, whole.loss) and torch.equal(chunked.task_losses, whole.task_losses)
    assert torch.equal(chunked.sample_losses, whole.sample_losses)
    assert torch.equal(chunked.task_accuracies, whole.task_accuracies)
    assert all(torch.equal(a, b) for a, b in zip(cg, wg))
    assert not chunked.loss.requires_grad


@pytest.mark.parametrize("chunk", [1, 2, "auto"])
def test_chunks_give_the_same_meta_gradient(chunk, monkeypatch):
    model = randomised(Conv4(1, ways=3, width=4))
    batch = images(T=5)
    learner = MAML(model, inner_lr=0.4, inner_steps=2)
    whole, want = meta_grads(learner, batch)
    if chunk == "auto":   # a budget below one task's graph: one task per chunk
        monkeypatch.setitem(chunks_module.CHUNK_BYTES, "cpu", 1)
    out, got = meta_grads(learner, batch, chunk)
    assert_rel(got, want, 1e-12)
    assert torch.allclose(out.loss, whole.loss, rtol=1e-14)
    assert set(out.diagnostics) >= {"support_loss", "inner_grad_norm"}
    assert torch.allclose(out.diagnostics["support_loss"], whole.diagnostics["support_loss"], rtol=1e-12)


def test_chunks_with_learned_inner_rates_match_the_graph():
    """Tensors every task shares (learned per-step rates) sum their chunks' gradients."""
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    g = torch.Generator().manual_seed(2)
    batch = TaskBatch(*(torch.randn(3, n, 1, generator=g, dtype=torch.float64) for n in (5, 5, 7, 7)))
    learner = MAML(model, inner_lr=0.05, inner_steps=2, loss="mse", learn_inner_lr="per_step").double()
    want = torch.autograd.grad(learner.meta_loss(batch).loss, list(learner.parameters()))
    learner.zero_grad(set_to_none=True)
    meta_backward(learner, batch, chunk=2)
    assert_rel([p.grad for p in learner.parameters()], want, 1e-12)


def held_saved_bytes():
    """A saved_tensors_hooks context, a function giving the bytes of saved tensors still held by a graph, and one
    giving the most they held at once while the context was active."""
    import weakref

    alive: dict[int, int] = {}
    peak = [0]

    def pack(t):
        box = _Box(t.detach())   # detached: holding a saved output would keep its node alive (a cycle)
        key = id(box)
        alive[key] = t.untyped_storage().nbytes()
        peak[0] = max(peak[0], sum(alive.values()))
        weakref.finalize(box, alive.pop, key, None)
        return box

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t), lambda: sum(alive.values()), \
        lambda: peak[0]


class _Box:
    def __init__(self, t):
        self.t = t


def test_chunks_hold_one_chunk_of_graph():
    """The most graph autograd holds at once: one task's with chunks of one task, every task's with the whole
    batch's graph; and nothing once meta_backward returns."""
    model = randomised(Conv4(1, ways=3, width=8))
    batch = images(T=6, queries=5)
    learner = MAML(model, inner_lr=0.4)
    probe, alive, _ = held_saved_bytes()
    with probe:
        out = learner.meta_loss(batch)
    whole = alive()
    out.loss.backward()
    probe, alive, peak = held_saved_bytes()
    with probe:
        meta_backward(learner, batch, chunk=1)
    assert alive() == 0
    assert whole > 1e6 and peak() < whole / 3, (peak(), whole)
