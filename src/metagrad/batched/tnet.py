"""T-Net's task-batched forward: each transform folded into the weights of the layer it follows.

Registered for :class:`~metagrad.models.TNet` (Lee & Choi, ICML 2018). A transformed layer computes
``T·(W x + b) = (T·W) x + T·b`` (``T`` mixing its output channels), so T-Net equals its wrapped model run with the
weights ``T·W`` and biases ``T·b``: the wrapped model's own batched forward (Conv4's grouped kernel) runs all
tasks at once, instead of the module's forward with a hook per layer, task by task. Exact algebra, only the
rounding order differs (float64 tests in tests/test_batched.py); the gradients reach ``W`` and ``T`` through the
products. Folded only where that algebra is known to hold: a wrapped model with a registered batched forward
(which runs each transformed layer as that module) and no grouped convolution (there ``T·W`` would mix the
groups). Anything else, or a model watched by a forward hook, runs the module's forward per task.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import functional as fn
from ..models.tnet import TNet


def tnet_taps(model: TNet) -> set[str]:
    """Every module of the wrapped model (``model.<name>``): its input is the same in the folded model."""
    return {f"model.{name}" for name, _ in model.model.named_modules() if name}


def foldable(model: TNet) -> bool:
    """Whether :func:`fold` gives the wrapped model's forward T-Net's outputs (see the module docstring)."""
    return fn.batched_forward_of(model.model) is not None and all(
        getattr(m, "groups", 1) == 1 for m in model.layer_names().values())


def fold(model: TNet, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped model's task-batched parameters with every transform folded in: ``W ↦ T·W``, ``b ↦ T·b``
    (``[T, *shape]`` in, ``[T, *shape]`` out, named as in the wrapped model)."""
    out = {n[len("model."):]: p for n, p in params.items() if n.startswith("model.")}
    for name in model.layer_names():
        t = params[f"transforms.{model.transform_key(name)}.weight"]                 # [T, O, O]
        w = out[f"{name}.weight"]                                                      # [T, O, ...]
        out[f"{name}.weight"] = (t @ w.flatten(2)).view_as(w)
        if f"{name}.bias" in out:
            out[f"{name}.bias"] = (t @ out[f"{name}.bias"].unsqueeze(-1)).squeeze(-1)
    return out


@fn.register_batched(TNet, taps=tnet_taps)
def tnet_forward_batched(model: TNet, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                         return_features: bool = False, tap: str | None = None):
    """T tasks of a T-Net: ``params[name]`` is ``[T, *shape]``, ``x`` ``[T, n, ...]``; the wrapped model's batched
    forward on :func:`fold`'s parameters, else the module's forward per task. ``tap`` (``model.<name>``): returns
    ``(output, the input of that module)``, as the generic path does."""
    if fn.hooked(model) or not foldable(model):
        return fn.forward_per_task(model, params, x, return_features, tap)
    fn.check_task_dims(params, x.shape[0])
    folded = fold(model, params)
    if tap is not None:
        return fn.forward_batched(model.model, folded, x, tap=tap[len("model."):])
    return fn.forward_batched(model.model, folded, x, return_features)


__all__ = ["fold", "foldable", "tnet_forward_batched", "tnet_taps"]
