"""Fully connected network for regression benchmarks (Finn et al. 2017: 1-40-40-1 for sinusoid)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..config import ConfigError
from .registry import register


class MLP(nn.Module):
    """Linear → ReLU → … → Linear, a plain ``nn.Module``.

    Parameters are named ``layers.{i}.weight`` / ``layers.{i}.bias`` in input → output order.

    Args:
        in_dim: input size.
        hidden: hidden layer widths.
        out_dim: output size.

    Example:
        >>> model = MLP(1, (40, 40), 1)
        >>> y, feats = model(torch.randn(10, 1), return_features=True)   # feats: input of the last Linear
        >>> y.shape, feats.shape
        (torch.Size([10, 1]), torch.Size([10, 40]))
    """

    def __init__(self, in_dim: int = 1, hidden: Sequence[int] = (40, 40), out_dim: int = 1) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        out = self.layers[-1](x)
        return (out, x) if return_features else out

    def forward_batched(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, return_features: bool = False):
        """T tasks at once: ``params[name]`` is ``[T, *shape]``, ``x`` is ``[T, N, in_dim]``.

        One batched matrix product per layer instead of T small ones; mathematically identical to calling
        :meth:`forward` per task with that task's parameters.
        """
        n = len(self.layers)
        for i in range(n):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if i < n - 1:
                x = torch.relu(h)
        return (h, x) if return_features else h


@register("mlp")
def mlp(in_shape: tuple[int, ...], out_dim: int, hidden: Sequence[int] = (40, 40)) -> MLP:
    """``model.name = "mlp"``: :class:`MLP` for vector inputs; ``model.kwargs``: hidden (the widths)."""
    if len(in_shape) != 1:
        raise ConfigError(f"model.name=mlp needs vector inputs, the inputs have shape {tuple(in_shape)}")
    hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ConfigError(f"model.kwargs.hidden: expected a non-empty list of widths >= 1, got {list(hidden)}")
    return MLP(in_shape[0], hidden, out_dim)
