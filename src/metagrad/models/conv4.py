"""The four-block convolutional backbone of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metagrad.functional import check_task_dims, forward_per_task

from ..config import POOLS

BN_EPS = 1e-5


class ConvBlock(nn.Module):
    """Conv2d 3×3 → BatchNorm2d (batch statistics always) → ReLU → MaxPool2d(2); with ``pool="stride"`` the
    convolution has stride 2 and nothing pools, with ``pool="none"`` neither."""

    def __init__(self, in_channels: int, width: int, bias: bool, pool: str) -> None:
        super().__init__()
        stride = 2 if pool == "stride" else 1
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=bias)
        # Batch statistics in training and evaluation alike: the convention of every MAML code base.
        self.bn = nn.BatchNorm2d(width, eps=BN_EPS, affine=True, track_running_stats=False)
        self.pool = pool

    def pre_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The block's activation before its pooling."""
        return torch.relu(self._normalised(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``pre_pool`` then pooling, computed in a faster but mathematically identical order.

        Pooling comes before the ReLU (max-pooling commutes with a monotone function, exactly, in floating point
        too), so the ReLU and its backward touch a quarter of the elements.
        """
        return _pool_relu(self._normalised(x), self.pool)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm(conv(x)). A block with few input channels and no conv bias (the first block) fuses the two
        into one matrix product, ``_conv_bn_fused``, unless a forward hook watches the modules."""
        if self.conv.bias is None and self.conv.in_channels * 9 <= _FUSE_MAX_K and not _hooked(self.conv, self.bn):
            return _conv_bn_fused(x, self.conv.weight, self.bn.weight, self.bn.bias, self.bn.eps,
                                  self.conv.stride[0])
        x = self.conv(x)
        if x.device.type == "cpu":
            # BatchNorm in NCHW: the channels-last CPU kernel sums each channel naively (float32 loses ~3 digits
            # over 10⁴ pixels, and second-order MAML amplifies that); the NCHW one sums in cascade.
            x = x.contiguous()
        return self.bn(x)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches these modules (then they are called as modules, not fused)."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks) or any(
        mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


# Largest in_channels·3·3 for which the first block is computed as one product on unfolded patches
# (Omniglot: 9, RGB: 27); wider inputs use the convolution kernel.
_FUSE_MAX_K = 32

# Conv4's pooling choices (see Conv4).

# Conv4.forward_batched: how many images (tasks × images per task) one grouped computation takes at most.
GROUP_IMAGES = 64


def _conv_bn_fused(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                   eps: float, stride: int = 1) -> torch.Tensor:
    """BatchNorm(conv3x3(x)) with batch statistics, as one ``addmm`` on the unfolded input patches ``U``.

    With y = U·w per pixel, BatchNorm's statistics are mean(y) = mean(U)·w and var(y) = wᵀ·Cov(U)·w, so
    they come from the small [k, k] patch covariance instead of the [N, C_out, H, W] output, and the
    normalisation folds into the product: BN(y) = (U − mean U)·(w·s) + β, s = γ/√(var(y)+ε). Exact
    algebra (only the rounding order differs), every op twice differentiable. The result is laid out
    channels-last (``[N, H, W, C]`` in memory), the layout in which the CPU kernels of the following
    BatchNorm and pooling layers are fastest; mkldnn convolutions keep it.
    """
    n, c = x.shape[:2]
    k = weight.shape[-1]
    h, w_ = _out_size(x.shape[2], k, stride), _out_size(x.shape[3], k, stride)
    u = F.unfold(x, k, padding=k // 2, stride=stride).transpose(1, 2).reshape(n * h * w_, c * k * k)   # [P, K]
    # Statistics in float64 at least: neighbouring pixels are strongly correlated, so wᵀ·Cov(U)·w cancels
    # (float32 loses ~4 digits on Omniglot); the [K, K] algebra costs nothing.
    acc = torch.promote_types(x.dtype, torch.float64)
    uc = u.to(acc)
    uc = uc - uc.mean(0)
    cov = (uc.t() @ uc) / u.shape[0]                                                   # [K, K], biased
    wf = weight.flatten(1)                                                             # [O, K]
    w64 = wf.to(acc)
    scale = (gamma.to(acc) * torch.rsqrt(((w64 @ cov) * w64).sum(1) + eps)).to(x.dtype)
    # Centred patches: BN(y) = (U − mean U)·(w·s) + β; centring here (not after the product) keeps the
    # backward free of the large cancelling terms an uncentred Uᵀ·G would bring. A row-major [K, O] weight makes
    # autograd take its gradient as Ucᵀ·G, several times faster than (Gᵀ·Uc)ᵀ.
    y = torch.addmm(beta, uc.to(x.dtype), (wf * scale.unsqueeze(1)).t().contiguous())  # [P, O]
    return y.view(n, h, w_, -1).permute(0, 3, 1, 2)


def _conv_bn_fused_tasks(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         eps: float, stride: int = 1) -> torch.Tensor:
    """``_conv_bn_fused`` for T tasks at once: ``x`` ``[T, n, C, H, W]``, ``weight`` ``[T, O, C, k, k]``,
    ``gamma``/``beta`` ``[T, O]``; statistics per task, batched products. Returns ``[T·n, O, H, W]``,
    channels-last in memory."""
    t, n, c = x.shape[:3]
    k = weight.shape[-1]
    h, w_ = _out_size(x.shape[3], k, stride), _out_size(x.shape[4], k, stride)
    u = F.unfold(x.flatten(0, 1), k, padding=k // 2, stride=stride)                   # [T·n, K, H·W]
    u = u.transpose(1, 2).reshape(t, n * h * w_, c * k * k)                            # [T, P, K]
    acc = torch.promote_types(x.dtype, torch.float64)
    uc = u.to(acc)
    uc = uc - uc.mean(1, keepdim=True)
    cov = (uc.transpose(1, 2) @ uc) / u.shape[1]                                       # [T, K, K], biased
    wf = weight.flatten(2)                                                             # [T, O, K]
    w64 = wf.to(acc)
    scale = (gamma.to(acc) * torch.rsqrt(((w64 @ cov) * w64).sum(2) + eps)).to(x.dtype)
    y = torch.baddbmm(beta.unsqueeze(1), uc.to(x.dtype), (wf * scale.unsqueeze(2)).transpose(1, 2).contiguous())
    return y.view(t * n, h, w_, -1).permute(0, 3, 1, 2)


def _out_size(size: int, k: int, stride: int) -> int:
    """Output height (or width) of a k×k convolution with padding k // 2."""
    return (size + 2 * (k // 2) - k) // stride + 1


def _pool_relu(x: torch.Tensor, pool: str) -> torch.Tensor:
    """A block's tail: max-pooling before the ReLU (see ``ConvBlock.forward``)."""
    if pool == "max":
        if x.device.type == "cpu":   # the CPU max-pooling kernel is ~10× faster channels-last
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(x, 2)
    return torch.relu(x)


class Conv4(nn.Module):
    """Four conv blocks, then flatten → Linear(width·s·s, ways); a plain ``nn.Module``.

    ``pool="stride"`` is Finn et al.'s Omniglot network (their code's default for Omniglot): 3×3 convolutions of
    stride 2 instead of max-pooling, and the last map averaged over its positions → Linear(width, ways).

    ``named_parameters()`` order: per block ``conv.weight, [conv.bias], bn.weight, bn.bias``; then
    ``head.weight, head.bias``.

    ``forward(x, return_features="map")`` returns ``(output, map)``, ``map`` the last block's activation before
    its pooling, ``[N, *self.map_shape]`` (CML's conv co-learner reads it).

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
                s = _out_size(s, 3, 2)
        if s < 1:
            raise ValueError(f"Conv4: image_size {image_size} is too small for four 2× poolings")
        self.feature_dim = width if pool == "stride" else width * s * s
        # Shape of the last block's map before its pooling, for forward(x, return_features="map") (CML's conv head).
        pre = image_size // 8 if pool == "max" else s
        self.map_shape = (width, pre, pre)
        self.head = nn.Linear(self.feature_dim, ways)
        self.width, self.pool, self.has_bias = width, pool, bias

    def forward(self, x: torch.Tensor, return_features: bool | str = False):
        if return_features == "map":
            return self._forward_map(x)
        for block in self.blocks:
            x = block(x)
        feats = self._features(x)
        out = self.head(feats)
        return (out, feats) if return_features else out

    def forward_batched(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                        return_features: bool | str = False):
        """T tasks at once: ``params[name]`` is ``[T, *shape]``, ``x`` is ``[T, n, C, H, W]``.

        The tasks' feature maps are laid side by side along the channels, ``[n, T·C, H, W]``, so each block is
        one grouped convolution (``groups=T``) and one batch normalisation over T·C channels, whose statistics
        are per task and channel exactly as in :meth:`forward`; the first block's fused product and the head are
        batched matrix products. Mathematically identical to :meth:`forward` per task (float64 tests), with
        far fewer, larger operator calls: 1.4x faster for a second-order meta-step with few images per task
        (docs/performance.md). A task's values do not depend on the other tasks; its second derivatives agree
        across task counts to rounding only (a grouped convolution's double backward runs group by group).
        Tasks are grouped ``GROUP_IMAGES // n`` at a time (n images per task): grouped convolutions pay on a
        CPU for small per-task batches (the support set, a few queries) and lose to one call per task for large
        ones, which run as :meth:`forward` per task, as does a single task. Falls back to the per-task loop
        while a forward hook watches a block.
        """
        blocks = list(self.blocks)
        if _hooked(self, self.head, *blocks, *(m for b in blocks for m in (b.conv, b.bn))):
            return forward_per_task(self, params, x, return_features)
        if x.dim() != 5 or x.shape[2] != blocks[0].conv.in_channels:
            raise ValueError(f"Conv4.forward_batched: x of shape {list(x.shape)} does not fit: expected "
                             f"[T, n, {blocks[0].conv.in_channels}, H, W]")
        t, n = x.shape[:2]
        check_task_dims(params, t)
        g = max(1, GROUP_IMAGES // max(n, 1))
        if t == 1 or g == 1:
            return forward_per_task(self, params, x, return_features)
        if t <= g:
            return self._forward_grouped(params, x, return_features)
        g = -(-t // -(-t // g))            # pieces of equal size: 16 tasks with g = 12 run as 8 + 8
        parts = [self._forward_grouped({k: v[s:s + g] for k, v in params.items()}, x[s:s + g], return_features)
                 for s in range(0, t, g)]
        if return_features:
            return torch.cat([o for o, _ in parts]), torch.cat([f for _, f in parts])
        return torch.cat(parts)

    def _forward_grouped(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                         return_features: bool | str = False):
        """``forward_batched`` as one grouped computation over all the tasks of ``x``."""
        blocks = list(self.blocks)
        t, n = x.shape[:2]
        fmap, z = None, None
        for i, block in enumerate(blocks):
            pre = f"blocks.{i}."
            w = params[pre + "conv.weight"]
            if i == 0 and block.conv.bias is None and block.conv.in_channels * 9 <= _FUSE_MAX_K:
                y = _conv_bn_fused_tasks(x, w, params[pre + "bn.weight"], params[pre + "bn.bias"], block.bn.eps,
                                         block.conv.stride[0])
                y = _pool_relu(y, block.pool)                                          # [T·n, O, h, w]
                # NCHW for every T (for T = 1 the reshape alone would keep the channels-last strides, and the
                # convolution kernel, hence the rounding, would depend on the number of tasks).
                z = y.reshape(t, n, *y.shape[1:]).transpose(0, 1).reshape(n, -1, *y.shape[2:]).contiguous()
                continue
            if z is None:
                z = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])         # [n, T·C, H, W]
            bias = params.get(pre + "conv.bias")
            z = F.conv2d(z, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                         stride=block.conv.stride, padding=1, groups=t)
            if z.device.type == "cpu":
                z = z.contiguous()   # NCHW batch normalisation: see ConvBlock._normalised
            z = F.batch_norm(z, None, None, params[pre + "bn.weight"].reshape(-1), params[pre + "bn.bias"].reshape(-1),
                             True, 0.0, block.bn.eps)
            if return_features == "map" and i == len(blocks) - 1:
                fmap = torch.relu(z)
            z = _pool_relu(z, block.pool)
        feats = self._features(z).reshape(n, t, -1).transpose(0, 1)                    # [T, n, F]
        out = torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))
        if return_features == "map":
            return out, fmap.reshape(n, t, -1, *fmap.shape[2:]).transpose(0, 1)
        return (out, feats) if return_features else out

    def _forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, map)``: map is the last block's activation before its pooling, ``[N, *map_shape]``."""
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        fmap = last.pre_pool(x)
        x = F.max_pool2d(fmap, 2) if last.pool == "max" else fmap
        return self.head(self._features(x)), fmap

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input from the last block's output ``[N, C, s, s]``: flattened, or averaged over the
        positions for ``pool="stride"`` (Finn et al.'s Omniglot network)."""
        return x.mean((2, 3)) if self.pool == "stride" else x.flatten(1)
