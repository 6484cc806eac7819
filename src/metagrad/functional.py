"""Parameter dictionaries and functional forwards: how the learner runs a plain module with other weights.

Fast parameters carry a leading task dimension: ``params[name]`` is ``[T, *shape]``. A model with a
``forward_batched`` method runs all T tasks in one computation; any other module runs per task through
``torch.func.functional_call`` and the outputs are stacked.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def meta_params(model: nn.Module) -> Params:
    """The model's parameters θ by name, in ``named_parameters()`` (input → output) order."""
    return dict(model.named_parameters())


def expand_tasks(params: Mapping[str, torch.Tensor], T: int) -> Params:
    """θ → ``[T, *shape]`` views, one copy per task (no memory; gradients flow back summed)."""
    return {n: p.unsqueeze(0).expand(T, *p.shape) for n, p in params.items()}


def task_slice(params: Mapping[str, torch.Tensor], t: int) -> Params:
    """The parameters of task ``t`` from a task-batched dictionary."""
    return {n: p[t] for n, p in params.items()}


def supports_features(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``return_features``."""
    return "return_features" in inspect.signature(model.forward).parameters


def forward_batched(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                    return_features: bool = False):
    """Run T tasks: ``params[name]`` is ``[T, *shape]`` and ``x`` is ``[T, N, *x_shape]``.

    Returns ``[T, N, *out]`` (and ``[T, N, d]`` features when asked). Buffers come from the module.
    """
    kwargs = {"return_features": True} if return_features else {}
    if hasattr(model, "forward_batched"):
        return model.forward_batched(params, x, **kwargs)
    outs = [functional_call(model, task_slice(params, t), (x[t],), kwargs) for t in range(x.shape[0])]
    if return_features:
        return torch.stack([o for o, _ in outs]), torch.stack([f for _, f in outs])
    return torch.stack(outs)


def forward_single(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                   return_features: bool = False):
    """Run one task with the (un-batched) parameters ``params``."""
    kwargs = {"return_features": True} if return_features else {}
    return functional_call(model, dict(params), (x,), kwargs)
