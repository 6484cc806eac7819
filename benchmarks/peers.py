"""One MAML meta-step, written the way each library's own examples write it, on identical tasks and weights.

Every implementation takes the same model weights and the same :class:`metagrad.TaskBatch`, leaves the
meta-gradient in ``.grad`` of its model's parameters and returns the meta-loss. The peers follow their
libraries' MAML examples (higher's ``maml-omniglot-higher.py``, learn2learn's ``maml_omniglot.py``, the
torch.func "plain loop"): one task at a time, ``backward()`` per task, so a peer holds one task's graph.

* ``loop``        a per-task loop with ``torch.func.functional_call`` and ``torch.autograd.grad``.
* ``higher``      ``higher.innerloop_ctx`` (first order: the inner gradients detached by a ``grad_callback``).
* ``learn2learn`` ``l2l.algorithms.MAML(...).clone()`` and ``adapt``.
* ``metagrad``    ``metagrad.meta_backward(MAML(...), batch)`` (task chunks, bounded memory, the default
                  training call).

The peers run the reference network (a plain ``nn.Sequential`` of Conv2d → BatchNorm2d → ReLU → MaxPool2d
blocks, or Linear → ReLU layers), loaded with metagrad's weights; ``loop+mgmodel`` runs the plain loop on
metagrad's own ``Conv4`` to separate what the model implementation gives from what the learner gives, and
``metagrad[per-task]`` runs metagrad without the model's ``forward_batched`` (tasks one at a time), and
``metagrad[graph]`` takes ``MAML(...).meta_loss(batch).loss.backward()``, the whole meta-batch's graph at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metagrad import MAML, TaskBatch, meta_backward
from metagrad.models import MLP, Conv4


@dataclass(frozen=True)
class Setup:
    """What a meta-step needs besides the tasks."""

    inner_lr: float
    inner_steps: int
    first_order: bool
    loss: str            # "cross_entropy" | "mse"

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return F.cross_entropy if self.loss == "cross_entropy" else F.mse_loss


# -- reference networks ----------------------------------------------------------------------------------------
def reference_conv4(model: Conv4) -> nn.Module:
    """The Conv4 of the MAML examples as plain layers, with ``model``'s weights."""
    layers: list[nn.Module] = []
    for block in model.blocks:
        conv = nn.Conv2d(block.conv.in_channels, block.conv.out_channels, 3, padding=1,
                         bias=block.conv.bias is not None)
        layers += [conv, nn.BatchNorm2d(conv.out_channels, eps=block.bn.eps, track_running_stats=False), nn.ReLU()]
        if isinstance(block.pool, nn.MaxPool2d):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(model.head.in_features, model.head.out_features)]
    net = nn.Sequential(*layers).to(model.head.weight)
    _copy_weights(model, net)
    return net


def reference_mlp(model: MLP) -> nn.Module:
    layers: list[nn.Module] = []
    for i, lin in enumerate(model.layers):
        layers.append(nn.Linear(lin.in_features, lin.out_features))
        if i < len(model.layers) - 1:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers).to(model.layers[0].weight)
    _copy_weights(model, net)
    return net


def reference_model(model: nn.Module) -> nn.Module:
    return reference_conv4(model) if isinstance(model, Conv4) else reference_mlp(model)


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    a, b = list(src.parameters()), list(dst.parameters())
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b)), "parameter orders differ"
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)


# -- the meta-steps ----------------------------------------------------------------------------------------------
class Impl:
    """A meta-step of one library on its own copy of the model (``model``), with Adam on its parameters."""

    name = "impl"

    def __init__(self, model: nn.Module, setup: Setup, meta_lr: float = 1e-3) -> None:
        self.model, self.setup = model, setup
        self.opt = torch.optim.Adam(self.params(), meta_lr)

    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def meta_gradient(self, batch: TaskBatch) -> torch.Tensor:   # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, batch: TaskBatch, update: bool = True) -> float:
        """One meta-step: zero the grads, the meta-gradient, an Adam update (``update``). Returns the loss."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.meta_gradient(batch)
        if update:
            self.opt.step()
        return float(loss)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.params()]


class Loop(Impl):
    """The plain per-task loop (torch.func.functional_call), backward per task."""

    name = "loop"

    def meta_gradient(self, batch):
        s, lf, T = self.setup, self.setup.loss_fn(), len(batch)
        theta = dict(self.model.named_parameters())
        total = 0.0
        for t in range(T):
            fast = theta
            for _ in range(s.inner_steps):
                loss = lf(functional_call(self.model, fast, (batch.support_x[t],)), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not s.first_order)
                fast = {n: p - s.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            q = lf(functional_call(self.model, fast, (batch.query_x[t],)), batch.query_y[t]) / T
            q.backward()
            total += q.detach()
        return total


class Higher(Impl):
    """higher.innerloop_ctx with a differentiable SGD, backward per task (higher's MAML example)."""

    name = "higher"

    def __init__(self, model, setup, meta_lr=1e-3):
        super().__init__(model, setup, meta_lr)
        import higher

        self.higher = higher
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=setup.inner_lr)

    def meta_gradient(self, batch):
        s, lf, T = self.setup, self.setup.loss_fn(), len(batch)
        callback = (lambda gs: [g.detach() for g in gs]) if s.first_order else None
        total = 0.0
        for t in range(T):
            with self.higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(s.inner_steps):
                    diffopt.step(lf(fnet(batch.support_x[t]), batch.support_y[t]), grad_callback=callback)
                q = lf(fnet(batch.query_x[t]), batch.query_y[t]) / T
                q.backward()
            total += q.detach()
        return total


class Learn2Learn(Impl):
    """learn2learn's MAML wrapper: clone, adapt, backward per task (learn2learn's MAML example)."""

    name = "learn2learn"

    def __init__(self, model, setup, meta_lr=1e-3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn as l2l
        self.maml = l2l.algorithms.MAML(model, lr=setup.inner_lr, first_order=setup.first_order)
        super().__init__(model, setup, meta_lr)

    def meta_gradient(self, batch):
        s, lf, T = self.setup, self.setup.loss_fn(), len(batch)
        total = 0.0
        for t in range(T):
            learner = self.maml.clone()
            for _ in range(s.inner_steps):
                learner.adapt(lf(learner(batch.support_x[t]), batch.support_y[t]))
            q = lf(learner(batch.query_x[t]), batch.query_y[t]) / T
            q.backward()
            total += q.detach()
        return total


class Metagrad(Impl):
    """metagrad's learner: ``meta_backward`` (task chunks), or with ``graph`` one meta-loss for the whole
    meta-batch and one backward."""

    name = "metagrad"

    def __init__(self, model, setup, meta_lr=1e-3, graph=False, **options):
        self.learner = MAML(model, inner_lr=setup.inner_lr, inner_steps=setup.inner_steps,
                            first_order=setup.first_order, loss=setup.loss, **options)
        self.graph = graph
        super().__init__(model, setup, meta_lr)

    def params(self):
        return list(self.learner.parameters())

    def meta_gradient(self, batch):
        if not self.graph:
            return meta_backward(self.learner, batch).loss
        out = self.learner.meta_loss(batch)
        out.loss.backward()
        return out.loss.detach()


def per_task(model: nn.Module) -> nn.Module:
    """``model`` without a batched forward: metagrad then runs the tasks one ``functional_call`` at a time (the
    ablation of Conv4's grouped and MLP's batched forwards). A subclass: a batched forward registered for a model
    type (metagrad.batched) serves that exact type only."""

    class PerTask(type(model)):
        @property
        def forward_batched(self):   # hasattr() is then False; other attribute lookups are untouched
            raise AttributeError("forward_batched")

    PerTask.__name__ = type(model).__name__
    model.__class__ = PerTask
    return model


def available() -> dict[str, bool]:
    """Which peer libraries import here."""
    found = {}
    for name, mod in (("higher", "higher"), ("learn2learn", "learn2learn")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(mod)
            found[name] = True
        except Exception:   # noqa: BLE001 - any import failure means "not available"
            found[name] = False
    return found


def build(name: str, model: nn.Module, setup: Setup) -> Impl:
    """Implementation ``name`` on its own copy of ``model``'s weights (same dtype)."""
    import copy

    if name == "metagrad":
        return Metagrad(copy.deepcopy(model), setup)
    if name == "metagrad[graph]":
        impl = Metagrad(copy.deepcopy(model), setup, graph=True)
        impl.name = name
        return impl
    if name == "metagrad[per-task]":
        impl = Metagrad(per_task(copy.deepcopy(model)), setup)
        impl.name = name
        return impl
    if name == "loop+mgmodel":
        impl = Loop(copy.deepcopy(model), setup)
        impl.name = name
        return impl
    ref = reference_model(model)
    cls = {"loop": Loop, "higher": Higher, "learn2learn": Learn2Learn}[name]
    return cls(ref, setup)
