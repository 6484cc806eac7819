"""What every learner shares: the output of ``meta_loss`` / ``evaluate``, the protocol, and the registry.

Learners are peers (MAML, ProtoNet). Training, evaluation, :func:`~metagrad.chunks.meta_backward`, distributed
training and studies call only this protocol::

    out = learner.meta_loss(batch, first_order=None)   # differentiable MetaLossOutput (training mode)
    out = learner.evaluate(batch, inner_steps=None)     # the same fields, detached
    learner.set_iteration(it)                           # the plug-ins' schedules
    learner.plugins                                     # nn.ModuleList of plug-ins (their task groups)
    type(learner).inner_loop                            # whether ``inner_steps`` means anything to it
    learner.inner_steps, learner.eval_inner_steps       # its step counts in training and evaluation (0 without)

and, where they apply, ``adapt(support_x, support_y)`` → the adapted model of one task, ``predict(fast, x)``.
A learner registers itself under a key (``@register("protonet")``); a plug-in lists the keys it supports
(:attr:`metagrad.seams.Plugin.learners`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from ..seams import map_tensors
from ..tasks import TaskBatch

_REGISTRY: dict[str, type[nn.Module]] = {}


@dataclass
class MetaLossOutput:
    """What a learner's ``meta_loss`` and ``evaluate`` return."""

    loss: torch.Tensor                         # query loss + every plug-in's outer term (the multi-step loss's too)
    query_loss: torch.Tensor                   # mean query loss (after the last inner step), alone
    query_accuracy: torch.Tensor | None        # classification only
    task_losses: torch.Tensor                  # [T] query loss per task
    task_accuracies: torch.Tensor | None       # [T]
    sample_losses: torch.Tensor                # [T, N_q] per-sample query losses, detached (diagnostics)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def detached(self) -> MetaLossOutput:
        """The same values, out of the graph."""
        return MetaLossOutput(*(map_tensors(torch.Tensor.detach, getattr(self, f.name)) for f in fields(self)))


class Learner(Protocol):
    """The protocol the rest of the package calls (see the module docstring)."""

    name: str
    inner_loop: bool
    inner_steps: int
    eval_inner_steps: int
    plugins: nn.ModuleList

    def meta_loss(self, batch: TaskBatch, first_order: bool | None = None) -> MetaLossOutput: ...

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None,
                 outer_terms: bool = False) -> MetaLossOutput: ...

    def set_iteration(self, iteration: int) -> None: ...


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: a learner available by key (``metagrad list learners``, config ``learner``)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"learner {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def available() -> list[str]:
    """Registered learner keys, sorted."""
    return sorted(_REGISTRY)


def learner_class(name: str) -> type[nn.Module]:
    """The learner class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown learner {name!r}: choose one of {', '.join(available())}")
    return _REGISTRY[name]
