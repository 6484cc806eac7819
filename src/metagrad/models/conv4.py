"""The four-block convolutional backbone of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from .registry import register

BN_EPS = 1e-5
POOLS = ("max", "stride", "none")


class ConvBlock(nn.Module):
    """Conv2d 3×3 → BatchNorm2d (batch statistics always) → ReLU → MaxPool2d(2); with ``pool="stride"`` the
    convolution has stride 2 and nothing pools, with ``pool="none"`` neither (``self.pool`` is then an identity).

    Each step is a module, so a forward (pre-)hook on one reads its input: ``blocks.{i}.pool``'s input is block
    i's map before its pooling.
    """

    def __init__(self, in_channels: int, width: int, bias: bool, pool: str) -> None:
        super().__init__()
        stride = 2 if pool == "stride" else 1
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=bias)
        # Batch statistics in training and evaluation alike: the convention of every MAML code base.
        self.bn = nn.BatchNorm2d(width, eps=BN_EPS, affine=True, track_running_stats=False)
        self.relu = nn.ReLU()
        self.pool: nn.Module = nn.MaxPool2d(2) if pool == "max" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


def out_size(size: int, k: int, stride: int) -> int:
    """Output height (or width) of a k×k convolution with padding k // 2."""
    return (size + 2 * (k // 2) - k) // stride + 1


class Conv4(nn.Module):
    """Four conv blocks, then flatten → Linear(width·s·s, ways); a plain ``nn.Module``.

    ``pool="stride"`` is Finn et al.'s Omniglot network (their code's default for Omniglot): 3×3 convolutions of
    stride 2 instead of max-pooling, and the last map averaged over its positions → Linear(width, ways).

    ``named_parameters()`` order: per block ``conv.weight, [conv.bias], bn.weight, bn.bias``; then
    ``head.weight, head.bias``.

    Every step of a block is a module (``blocks.{i}.conv``, ``.bn``, ``.relu``, ``.pool``), so an intermediate
    activation is read with a hook on the module it enters, e.g. ``functional.forward_batched(model, params, x,
    tap="blocks.3.pool")`` for the last block's map before its pooling.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for the ImageNet-style sets).
        ways: output classes.
        width: filters per block (32, 48, 64 or 128 in the literature).
        bias: conv bias (off by default: batch normalisation follows every conv).
        pool: "max" (MaxPool2d(2) per block), "stride" (stride-2 convolutions, spatial mean at the end) or
            "none" (stride-free; then s = image_size).
        image_size: input height = width, to size the head.

    Example:
        >>> model = Conv4(in_channels=1, ways=5, width=64, image_size=28)
        >>> logits, feats = model(torch.randn(25, 1, 28, 28), return_features=True)
        >>> logits.shape, feats.shape
        (torch.Size([25, 5]), torch.Size([25, 64]))
    """

    def __init__(self, in_channels: int = 1, ways: int = 5, width: int = 64, bias: bool = False,
                 pool: str = "max", image_size: int = 28) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Conv4 pool must be one of {', '.join(map(repr, POOLS))}, got {pool!r}")
        self.blocks = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else width, width, bias, pool) for i in range(4)
        )
        s = image_size
        if pool == "max":
            for _ in range(4):
                s //= 2
        elif pool == "stride":
            for _ in range(4):
                s = out_size(s, 3, 2)
        if s < 1:
            raise ValueError(f"Conv4: image_size {image_size} is too small for four 2× poolings")
        self.feature_dim = width if pool == "stride" else width * s * s
        self.head = nn.Linear(self.feature_dim, ways)
        self.width, self.pool, self.has_bias = width, pool, bias

    def forward(self, x: torch.Tensor, return_features: bool = False):
        for block in self.blocks:
            x = block(x)
        feats = self.features_of(x)
        out = self.head(feats)
        return (out, feats) if return_features else out

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input from the last block's output ``[N, C, s, s]``: flattened, or averaged over the
        positions for ``pool="stride"`` (Finn et al.'s Omniglot network)."""
        return x.mean((2, 3)) if self.pool == "stride" else x.flatten(1)


@register("conv4")
def conv4(in_shape: tuple[int, ...], out_dim: int, width: int = 64, bias: bool = False, pool: str = "max") -> Conv4:
    """``model.name = "conv4"``: :class:`Conv4` for ``[C, H, W]`` images; ``model.kwargs``: width, bias, pool."""
    if len(in_shape) != 3:
        raise ConfigError(f"model.name=conv4 needs [C, H, W] images, the inputs have shape {tuple(in_shape)}")
    if pool not in POOLS:
        raise ConfigError(f"model.kwargs.pool: expected one of {', '.join(POOLS)}, got {pool!r}")
    if width < 1:
        raise ConfigError(f"model.kwargs.width: must be >= 1, got {width}")
    return Conv4(in_shape[0], out_dim, width, bias, pool, image_size=in_shape[-1])
