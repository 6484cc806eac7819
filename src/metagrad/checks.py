"""Input checks of the learner: fail loudly, saying what to do, instead of a broadcast or a device-side assert.

The learner's arguments and plug-ins are checked when it is built. Inputs are checked once per call, on the
first forward of the support set and on the query forward, so a model that does not take the inputs, or
targets that do not fit its outputs, raise a ``ValueError`` naming the tensor at fault.

Example:
    >>> out = forward_checked(view, params, support_x, support_y, "support")   # the model's output, checked
    >>> check_targets("cross_entropy", out, query_y, "query")
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ADAPT
from .functional import Params, supports_features
from .losses import LOSSES
from .seams import LearnerView, Plugin

# Words of torch's shape-mismatch errors: only those become "does not fit the model" errors.
SHAPE_WORDS = ("shape", "size", "mat1", "channels", "dimension", "Expected")


def learner_options(adapt: str, loss: str, inner_steps: int, eval_inner_steps: int | None) -> None:
    """The learner's own arguments."""
    if adapt not in ADAPT:
        raise ValueError(f"unknown adapt mode {adapt!r}: use one of {', '.join(ADAPT)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 0):
        raise ValueError("inner_steps must be >= 1 and eval_inner_steps >= 0")


def model_norms(model: nn.Module) -> None:
    """Refuse normalisation layers that track running statistics: MAML's reference code normalises with the
    batch's statistics in the inner loop and at the query, and running statistics (mixed over every task's data)
    would replace them in eval mode, silently (a custom CNN fell from 76.6% to 30.8% that way)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            raise ValueError(f"{type(model).__name__}.{name} is a {type(m).__name__} that tracks running statistics: "
                             f"build it with track_running_stats=False (MAML normalises with each task's batch "
                             f"statistics, in evaluation too; docs/own-model.md)")


def attach(plugin: Plugin, view: LearnerView) -> None:
    """Attach ``plugin`` to the learner ``view`` describes; refuse a non-plug-in, one that does not support this
    learner (``Plugin.learners``), or one needing features the model cannot give (checked after ``attach``, which may decide ``needs_features`` from the model)."""
    if not isinstance(plugin, Plugin):
        raise TypeError(f"plugins must be metagrad.seams.Plugin instances, got {type(plugin).__name__}")
    if view.host not in plugin.learners:
        raise ValueError(f"plug-in {plugin.name!r} does not run on {view.host}: {plugin.refusal} (it supports "
                         f"{', '.join(plugin.learners)})")
    plugin.attach(view)
    # A host that knows its feature size gives the features itself (ProtoNet: the embedding).
    if plugin.needs_features and view.feature_dim is None and not supports_features(view.model):
        raise ValueError(f"plug-in {plugin.name!r} needs features, but {type(view.model).__name__}.forward has no "
                         "return_features argument: add forward(x, return_features=False) → (out, feats)")


def forward_checked(view: LearnerView, params: Params, x: torch.Tensor, y: torch.Tensor, which: str) -> torch.Tensor:
    """The model's output on ``x``; an input the model cannot take, or targets ``y`` that do not fit, raise."""
    try:
        out = view.forward(params, x)
    except (RuntimeError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, torch.OutOfMemoryError) or not any(w in text for w in SHAPE_WORDS):
            raise
        raise ValueError(f"{which}_x of shape {list(x.shape)} does not fit {type(view.model).__name__} "
                         f"(inputs are [T, N, *x_shape]): {text[:200]}") from e
    check_targets(view.loss_kind, out, y, which)
    return out


def check_targets(loss_kind: str, out: torch.Tensor, y: torch.Tensor, which: str) -> None:
    """Targets against the model's output: dtype and shape, and class ids within 0..ways-1 (one sync)."""
    if loss_kind == "cross_entropy":
        if y.is_floating_point():
            raise ValueError(f"{which}_y is {y.dtype}: cross-entropy needs int64 class ids 0..ways-1 "
                             "(float targets are regression: use loss='mse')")
        if y.shape != out.shape[:-1]:
            raise ValueError(f"{which}_y has shape {list(y.shape)} but the model's output is {list(out.shape)}: "
                             "expected class ids of shape [T, N]")
        if y.numel():
            low, high = (int(v) for v in torch.aminmax(y))
            if low < 0 or high >= out.shape[-1]:
                raise ValueError(f"{which}_y holds class ids {low}..{high} but the model has {out.shape[-1]} "
                                 f"outputs: labels must lie in 0..{out.shape[-1] - 1} (build the model with "
                                 "as many outputs as ways)")
    elif not y.is_floating_point() or y.shape != out.shape:
        raise ValueError(f"{which}_y is {y.dtype} {list(y.shape)} but the model's output is {list(out.shape)}: "
                         "mse needs float targets of the same shape [T, N, out_dim]")
