"""T-Net: a meta-learned linear transform after every layer, never adapted in the inner loop.

Reference: Lee & Choi, "Gradient-Based Meta-Learning with Learned Layerwise Metric and Subspace", ICML 2018 (the
MT-Net paper; T-Net is MT-Net without the mask). Each layer computes ``T · (W x)``: ``W`` is adapted by the inner
loop as in MAML, ``T`` (identity at initialisation) is learned by the outer loop only, so the inner gradient
steps on ``W`` act in a metric the meta-learner shapes.
"""

from __future__ import annotations

import torch
from torch import nn


class Transform(nn.Module):
    """``x ↦ T x`` over the channel dimension (dim 1: a Linear's features, a conv map's channels), ``T``
    identity at initialisation. Its role is ``"outer"`` (:func:`metagrad.functional.param_roles`): meta-learned,
    never adapted."""

    meta_role = "outer"

    def __init__(self, channels: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, *rest]: mix channels, for a Linear's [N, C] output and a conv's [N, C, H, W] map alike.
        return torch.einsum("ij,nj...->ni...", self.weight, x)


class TNet(nn.Module):
    """Any model with a :class:`Transform` after each of its ``nn.Linear`` and ``nn.Conv2d`` layers.

    The model runs unchanged; each layer's output passes through its transform (forward hooks held for the
    call only, so the wrapper copies and pickles as a plain module). Parameters: the model's (``model.*``, input
    → output), then the transforms' (``transforms.<layer>.weight``). With every transform the identity this is the
    model itself; MAML adapts the model's parameters (by ``adapt``) and never the transforms.

    Args:
        model: the base network, e.g. :class:`~metagrad.models.Conv4` (its ``return_features`` passes through:
            the features are the head's input, after the transforms before it).

    Example:
        >>> from metagrad import MAML
        >>> from metagrad.models import Conv4, TNet
        >>> learner = MAML(TNet(Conv4(1, ways=5)), inner_lr=0.4)
        >>> [n for n in learner.model.state_dict() if n.startswith("transforms.")][:1]
        ['transforms.blocks_0_conv.weight']
        >>> "transforms.head.weight" in learner.adapted
        False
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        layers = self.layers()
        if not layers:
            raise ValueError(f"TNet transforms the outputs of nn.Linear and nn.Conv2d layers; "
                             f"{type(model).__name__} has none")
        # Sized, typed and placed like each layer's output (the model may already be float64 or on a GPU).
        self.transforms = nn.ModuleDict({
            key: Transform(m.out_features if isinstance(m, nn.Linear) else m.out_channels, m.weight.dtype,
                           m.weight.device) for key, m in layers.items()})

    def layers(self) -> dict[str, nn.Module]:
        """The transformed layers of the model, by transform key (the module name, dots as underscores)."""
        return {self.transform_key(name): m for name, m in self.layer_names().items()}

    def layer_names(self) -> dict[str, nn.Module]:
        """The transformed layers of the model, by module name within the model (``blocks.0.conv``)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    @staticmethod
    def transform_key(name: str) -> str:
        """The key of the transform after the layer ``name`` (``blocks.0.conv`` → ``blocks_0_conv``)."""
        return name.replace(".", "_")

    def forward(self, x: torch.Tensor, return_features: bool = False):
        hooks = [m.register_forward_hook(lambda mod, args, out, k=key: self.transforms[k](out))
                 for key, m in self.layers().items()]
        try:
            return self.model(x, return_features=True) if return_features else self.model(x)
        finally:
            for h in hooks:
                h.remove()
