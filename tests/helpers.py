"""Shared test helpers: tiny batches and models, independent reference loops (torch.autograd only, no metagrad
code), directional finite differences, and the "every parameter gets a finite gradient" check."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from metagrad import Plugin, TaskBatch
from metagrad.models import MLP, Conv4

mse, ce = nn.functional.mse_loss, nn.functional.cross_entropy
CONVS = [f"blocks.{i}.conv.weight" for i in range(4)]   # Conv4's conv weights, by name


# -- batches and models ----------------------------------------------------------------------------------------------
def regression_batch(T=3, ns=5, nq=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(*(torch.randn(T, n, 1, generator=g, dtype=dtype) for n in (ns, ns, nq, nq)))


def image_batch(T=2, ways=3, shots=1, queries=2, size=28, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).clone()
    yq = torch.arange(ways).repeat_interleave(queries).expand(T, -1).clone()
    return TaskBatch(torch.rand(T, ways * shots, 1, size, size, generator=g, dtype=dtype), ys,
                     torch.rand(T, ways * queries, 1, size, size, generator=g, dtype=dtype), yq)


def mlp64(seed=0):
    torch.manual_seed(seed)
    return MLP(1, (8, 8), 1).double()


def conv64(seed=0):
    torch.manual_seed(seed)
    return Conv4(1, ways=3, width=4, image_size=28).double()


def conv4(**kw):
    """A float64 Conv4 for 28×28 3-way tasks, seed 0; keyword arguments go to Conv4 (e.g. bias=True)."""
    torch.manual_seed(0)
    return Conv4(1, ways=3, width=4, image_size=28, **kw).double()


class NoFeatures(nn.Module):
    """A model whose forward has no ``return_features``: a plug-in that needs features must be refused on it."""

    def __init__(self, inputs: int = 4, outputs: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(inputs, outputs)

    def forward(self, x):
        return self.lin(x)


class ScaleGrad(Plugin):
    """A test plug-in: multiplies the inner gradient by a constant (equivalent to scaling α when alone)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def transform(self, grads, params, state, ctx):
        return {n: self.factor * g for n, g in grads.items()}


# -- meta-gradients -------------------------------------------------------------------------------------------------
def learner_meta_grad(learner, batch):
    """Meta-loss and its gradient w.r.t. the model's parameters."""
    out = learner.meta_loss(batch)
    return out.loss, torch.autograd.grad(out.loss, list(learner.model.parameters()))


def all_grads(learner, batch):
    """Meta-loss and its gradient w.r.t. every learner parameter (model, plug-ins, learned rates)."""
    out = learner.meta_loss(batch)
    return out, torch.autograd.grad(out.loss, list(learner.parameters()))


def grads_of(learner, batch):
    """Meta-loss and its gradient w.r.t. every trainable learner parameter (None where unused)."""
    out = learner.meta_loss(batch)
    params = [p for p in learner.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


def assert_close_rel(a, b, rel=1e-5):
    for x, y in zip(a, b):
        scale = max(y.abs().max().item(), 1e-12)
        assert (x - y).abs().max().item() / scale < rel


def assert_finite_gradients(named: Sequence[tuple[str, torch.Tensor]], grads: Sequence[torch.Tensor | None],
                            may_vanish: Callable[[str], bool] = lambda name: False) -> None:
    """Every parameter gets a finite gradient, and a non-zero one unless ``may_vanish(name)``.

    ``grads`` from ``torch.autograd.grad(..., allow_unused=True)``: None (no path at all) counts as zero.
    """
    assert len(named) == len(grads) and named
    for (name, _), g in zip(named, grads):
        if g is None:
            assert may_vanish(name), f"{name}: no gradient"
            continue
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert may_vanish(name) or g.abs().sum() > 0, f"{name}: zero gradient"


# -- independent reference loops ------------------------------------------------------------------------------------
def ref_adapt(model, theta, x, y, lr, steps, first_order, loss_fn):
    """One task's inner loop on all parameters, by hand (torch.autograd only)."""
    fast = dict(theta)
    for _ in range(steps):
        loss = loss_fn(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    return fast


def reference_meta_grad(model, batch, lr, steps, first_order, loss_fn, adapt=None, transform=None, wrt=()):
    """An independent MAML: a per-task unrolled loop with torch.autograd, no metagrad code.

    ``lr``: α, or a function ``(name, step) → α`` (learned rates). ``transform``: a function of the list of
    inner gradients (in ``adapt`` order) returning the ones the step uses. ``wrt``: more tensors (e.g. rates)
    to differentiate the meta-loss by, after θ.
    """
    theta = dict(model.named_parameters())
    adapt = list(theta) if adapt is None else adapt
    rate = lr if callable(lr) else (lambda name, step: lr)
    total = 0.0
    for t in range(len(batch)):
        fast = dict(theta)
        for s in range(steps):
            loss = loss_fn(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
            grads = grads if transform is None else transform(list(grads))
            fast = {**fast, **{n: fast[n] - rate(n, s) * g for n, g in zip(adapt, grads)}}
        total = total + loss_fn(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    total = total / len(batch)
    return total, torch.autograd.grad(total, list(theta.values()) + list(wrt))


# Meta-GNA: which norms are detached (the Arbiter's input, the divisor of the step) under each reading.
DETACH = {"code": (True, False), "detached": (True, True), "exact": (False, False)}


def norm(t, detach=True):
    return t.norm().detach() if detach else t.norm()


def gna_step(arbiter, weights, grads, directions=None, ema=None, use_ema=False, norms="code"):
    """One task's Meta-GNA steps (before α), written out from the spec; returns (steps, factors, new ema).

    The default, "code", is the authors' code: the Arbiter reads ``torch.norm(g).detach()``, the step is
    ``g / torch.norm(g)`` on the create_graph gradient (its norm in the graph)."""
    arbiter_detach, divisor_detach = DETACH[norms]
    w = torch.stack([x.norm() for x in weights])
    n = torch.stack([norm(g, arbiter_detach) for g in grads])
    feats = torch.cat([w, n])
    if use_ema:
        ema = feats if ema is None else 0.1 * feats + 0.9 * ema
        feats = torch.cat([feats, ema])
    z = (feats - feats.mean()) / (feats.std() + 1e-12)
    a = arbiter(z)
    directions = grads if directions is None else directions
    return [a[i] * d / norm(d, divisor_detach) for i, d in enumerate(directions)], a, ema


def cx_rescale(generator, params, c):
    """CxGrad's Ŵ_l = γ_l·W_l/||W_l|| with γ = G(c), one task, written out from the spec."""
    gamma = generator(c)
    return {**params, **{n: gamma[i] * params[n] / params[n].norm() for i, n in enumerate(CONVS)}}


def cx_context_start(model, generator, theta, xs, ys, dim, lr):
    """CxGrad's step (A): c = 0, one context step at θ with no graph; returns a fresh leaf."""
    c = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    p = cx_rescale(generator, {n: v.detach() for n, v in theta.items()}, c)
    (g,) = torch.autograd.grad(ce(functional_call(model, p, (xs,)), ys), [c])
    return (c - lr * g).detach().requires_grad_()


# -- finite differences ---------------------------------------------------------------------------------------------
def directional_difference(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           direction: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """``(loss(θ + ε·d) − loss(θ − ε·d)) / 2ε``, the parameters moved in place and put back afterwards."""

    def shifted(sign: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        try:
            return loss().detach()
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)

    return (shifted(1.0) - shifted(-1.0)) / (2 * eps)


def assert_directional_derivative(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                                  grads: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], eps: float,
                                  rel: float = 1e-6) -> None:
    """The analytic gradient, projected on ``direction``, equals the central difference of ``loss``."""
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    numeric = directional_difference(loss, params, direction, eps)
    assert abs(numeric - analytic) / abs(analytic) < rel, (numeric.item(), analytic.item())


# ------------------------------------------------------------------------------------------ run directories
def one_line_error(capsys, *pieces: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("metagrad: warning:")]
    assert len(lines) == 1 and lines[0].startswith("metagrad: error: "), err
    assert "Traceback" not in err and all(p in lines[0] for p in pieces), err
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


class Hung(BaseException):
    """Raised by :func:`deadline`: no ``except Exception`` (nor the command line's OSError handler) takes it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise Hung(f"still waiting after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
