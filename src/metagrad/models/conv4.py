"""The four-block convolutional backbone of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5


class ConvBlock(nn.Module):
    """Conv2d 3×3 → BatchNorm2d (batch statistics always) → ReLU → MaxPool2d(2)."""

    def __init__(self, in_channels: int, width: int, bias: bool, pool: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=bias)
        # Batch statistics in training and evaluation alike: the convention of every MAML code base.
        self.bn = nn.BatchNorm2d(width, eps=BN_EPS, affine=True, track_running_stats=False)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool == "max" else x


class Conv4(nn.Module):
    """Four conv blocks, then flatten → Linear(width·s·s, ways); a plain ``nn.Module``.

    ``named_parameters()`` order: per block ``conv.weight, [conv.bias], bn.weight, bn.bias``; then
    ``head.weight, head.bias``.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for the ImageNet-style sets).
        ways: output classes.
        width: filters per block (32, 48, 64 or 128 in the literature).
        bias: conv bias (off by default: batch normalisation follows every conv).
        pool: "max" (MaxPool2d(2) per block) or "none" (stride-free; then s = image_size).
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
        if pool not in ("max", "none"):
            raise ValueError(f"Conv4 pool must be 'max' or 'none', got {pool!r}")
        self.blocks = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else width, width, bias, pool) for i in range(4)
        )
        s = image_size
        if pool == "max":
            for _ in range(4):
                s //= 2
        if s < 1:
            raise ValueError(f"Conv4: image_size {image_size} is too small for four 2× poolings")
        self.feature_dim = width * s * s
        self.head = nn.Linear(self.feature_dim, ways)
        self.width, self.pool, self.has_bias = width, pool, bias

    def forward(self, x: torch.Tensor, return_features: bool = False):
        for block in self.blocks:
            x = block(x)
        feats = x.flatten(1)
        out = self.head(feats)
        return (out, feats) if return_features else out
