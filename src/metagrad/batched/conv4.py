"""Conv4's task-batched forward: grouped convolutions over tasks and a fused first block (CPU kernels).

Registered for :class:`~metagrad.models.Conv4`; :func:`metagrad.functional.forward_batched` and
:func:`~metagrad.functional.forward_single` run a Conv4 through it. Mathematically identical to the module's
own forward per task (float64 tests in tests/test_batched.py); only the rounding order differs. It knows the
taps ``blocks.{i}.pool`` (block i's map before its pooling) and ``head`` (the flat features); any other tap runs
the generic hooked path of :func:`~metagrad.functional.forward_batched`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import check_task_dims, forward_per_task, hooked, register_batched
from ..models.conv4 import Conv4, out_size

# How many images (tasks × images per task) one grouped computation takes at most.
GROUP_IMAGES = 64

# Largest in_channels·3·3 for which the first block is computed as one product on unfolded patches
# (Omniglot: 9, RGB: 27); wider inputs use the convolution kernel.
_FUSE_MAX_K = 32


def conv4_taps(model: Conv4) -> set[str]:
    """The taps this kernel computes itself: each block's map before its pooling, and the head's input."""
    return {"head", *(f"blocks.{i}.pool" for i in range(len(model.blocks)))}


def _tap_block(model: Conv4, tap: str | None) -> int | None:
    """The index of the block whose pre-pooling map ``tap`` names (None: no block tap)."""
    return None if tap is None or tap == "head" else int(tap.split(".")[1])


@register_batched(Conv4, taps=conv4_taps)
def conv4_forward_batched(model: Conv4, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                          return_features: bool = False, tap: str | None = None):
    """T tasks at once: ``params[name]`` is ``[T, *shape]``, ``x`` is ``[T, n, C, H, W]``.

    The tasks' feature maps are laid side by side along the channels, ``[n, T·C, H, W]``, so each block is
    one grouped convolution (``groups=T``) and one batch normalisation over T·C channels, whose statistics
    are per task and channel exactly as in ``Conv4.forward``; the first block's fused product and the head are
    batched matrix products. Mathematically identical to the module's forward per task (float64 tests), with
    far fewer, larger operator calls: 1.4x faster for a second-order meta-step with few images per task
    (docs/performance.md). A task's values do not depend on the other tasks; its second derivatives agree
    across task counts to rounding only (a grouped convolution's double backward runs group by group).
    Tasks are grouped ``GROUP_IMAGES // n`` at a time (n images per task): grouped convolutions pay on a
    CPU for small per-task batches (the support set, a few queries) and lose to one call per task for large
    ones, which run per task (still with the fused first block), as does a single task. While a forward hook
    watches the model or one of its layers, the module's own forward runs per task, so the hooks fire.
    ``tap`` (one of :func:`conv4_taps`): returns ``(output, the input of that module)``, as the generic path does.
    """
    blocks = list(model.blocks)
    if tap is not None and tap not in conv4_taps(model):
        raise ValueError(f"conv4_forward_batched: unknown tap {tap!r} (known: {sorted(conv4_taps(model))}); "
                         "use functional.forward_batched, which runs any other tap generically")
    if hooked(model):
        return forward_per_task(model, params, x, return_features, tap)
    if x.dim() != 5 or x.shape[2] != blocks[0].conv.in_channels:
        raise ValueError(f"Conv4.forward_batched: x of shape {list(x.shape)} does not fit: expected "
                         f"[T, n, {blocks[0].conv.in_channels}, H, W]")
    t, n = x.shape[:2]
    check_task_dims(params, t)
    g = max(1, GROUP_IMAGES // max(n, 1))
    if t == 1 or g == 1:
        return _per_task(model, params, x, return_features, tap)
    if t <= g:
        return _forward_grouped(model, params, x, return_features, tap)
    g = -(-t // -(-t // g))            # pieces of equal size: 16 tasks with g = 12 run as 8 + 8
    parts = [_forward_grouped(model, {k: v[s:s + g] for k, v in params.items()}, x[s:s + g], return_features, tap)
             for s in range(0, t, g)]
    if return_features or tap is not None:
        return torch.cat([o for o, _ in parts]), torch.cat([f for _, f in parts])
    return torch.cat(parts)


# -- one task at a time ------------------------------------------------------------------------------------------
def _per_task(model: Conv4, params: Mapping[str, torch.Tensor], x: torch.Tensor, return_features: bool,
              tap: str | None):
    """``functional.forward_per_task`` with :func:`_forward_one` in place of the module's forward."""
    # One unbind per tensor, not a select per task (see functional.forward_per_task).
    names, slices = list(params), [p.unbind(0) for p in params.values()]
    outs = [_forward_one(model, dict(zip(names, ps)), xt, return_features, tap)
            for xt, *ps in zip(x.unbind(0), *slices)]
    if return_features or tap is not None:
        return torch.stack([o for o, _ in outs]), torch.stack([f for _, f in outs])
    return torch.stack(outs)


def _forward_one(model: Conv4, params: Mapping[str, torch.Tensor], x: torch.Tensor, return_features: bool,
                 tap: str | None = None):
    """Conv4's forward for one task with ``params``, in a faster but mathematically identical order: the first
    block fused (``_conv_bn_fused``) and each block's pooling before its ReLU (max-pooling commutes with a
    monotone function, exactly, in floating point too, so the ReLU and its backward touch a quarter of the
    elements). ``tap``: ``(output, the tapped input)``; the tapped block runs ReLU first (its map is returned)."""
    k = _tap_block(model, tap)
    fmap = None
    for i, block in enumerate(model.blocks):
        z = _normalised(block, params, f"blocks.{i}.", x)
        if i == k:
            x, fmap = _relu_pool(z, model.pool)
        else:
            x = _pool_relu(z, model.pool)
    feats = model.features_of(x)
    # A Conv4 without its head (metagrad.learners.embedding_of, an nn.Identity): the features are the output.
    out = F.linear(feats, params["head.weight"], params["head.bias"]) if "head.weight" in params else feats
    if tap is not None:
        return out, (feats if fmap is None else fmap)
    return (out, feats) if return_features else out


def _normalised(block: nn.Module, params: Mapping[str, torch.Tensor], pre: str, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm(conv(x)) of one block. A block with few input channels and no conv bias (the first block) fuses
    the two into one matrix product, ``_conv_bn_fused``."""
    w, gamma, beta = params[pre + "conv.weight"], params[pre + "bn.weight"], params[pre + "bn.bias"]
    bias = params.get(pre + "conv.bias")
    if bias is None and block.conv.in_channels * 9 <= _FUSE_MAX_K:
        return _conv_bn_fused(x, w, gamma, beta, block.bn.eps, block.conv.stride[0])
    x = F.conv2d(x, w, bias, block.conv.stride, block.conv.padding)
    if x.device.type == "cpu":
        # BatchNorm in NCHW: the channels-last CPU kernel sums each channel naively (float32 loses ~3 digits
        # over 10⁴ pixels, and second-order MAML amplifies that); the NCHW one sums in cascade.
        x = x.contiguous()
    return F.batch_norm(x, None, None, gamma, beta, True, 0.1, block.bn.eps)


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
    h, w_ = out_size(x.shape[2], k, stride), out_size(x.shape[3], k, stride)
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


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "max":
        if x.device.type == "cpu":   # the CPU max-pooling kernel is ~10× faster channels-last
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(x, 2)
    return x


def _pool_relu(x: torch.Tensor, pool: str) -> torch.Tensor:
    """A block's tail: max-pooling before the ReLU (see ``_forward_one``)."""
    return torch.relu(_pool(x, pool))


def _relu_pool(x: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A tapped block's tail in the module's order: ``(pooled, the map before the pooling)``. The same values
    and memory layout as ``_pool_relu`` (so the later blocks, hence the output, round as without the tap)."""
    fmap = torch.relu(x)
    return _pool(fmap, pool), fmap


# -- all tasks as one grouped computation ------------------------------------------------------------------------
def _conv_bn_fused_tasks(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         eps: float, stride: int = 1) -> torch.Tensor:
    """``_conv_bn_fused`` for T tasks at once: ``x`` ``[T, n, C, H, W]``, ``weight`` ``[T, O, C, k, k]``,
    ``gamma``/``beta`` ``[T, O]``; statistics per task, batched products. Returns ``[T·n, O, H, W]``,
    channels-last in memory."""
    t, n, c = x.shape[:3]
    k = weight.shape[-1]
    h, w_ = out_size(x.shape[3], k, stride), out_size(x.shape[4], k, stride)
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


def _forward_grouped(model: Conv4, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                     return_features: bool = False, tap: str | None = None):
    """``conv4_forward_batched`` as one grouped computation over all the tasks of ``x``."""
    blocks = list(model.blocks)
    t, n = x.shape[:2]
    k = _tap_block(model, tap)
    fmap, z = None, None
    for i, block in enumerate(blocks):
        pre = f"blocks.{i}."
        w = params[pre + "conv.weight"]
        if i == 0 and block.conv.bias is None and block.conv.in_channels * 9 <= _FUSE_MAX_K:
            y = _conv_bn_fused_tasks(x, w, params[pre + "bn.weight"], params[pre + "bn.bias"], block.bn.eps,
                                     block.conv.stride[0])
            if i == k:                                                                 # tasks lead: [T·n, ...]
                y, m = _relu_pool(y, model.pool)
                fmap = m.reshape(t, n, *m.shape[1:])
            else:
                y = _pool_relu(y, model.pool)                                          # [T·n, O, h, w]
            # NCHW for every T (for T = 1 the reshape alone would keep the channels-last strides, and the
            # convolution kernel, hence the rounding, would depend on the number of tasks).
            z = y.reshape(t, n, *y.shape[1:]).transpose(0, 1).reshape(n, -1, *y.shape[2:]).contiguous()
            continue
        if z is None:
            z = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])             # [n, T·C, H, W]
        bias = params.get(pre + "conv.bias")
        z = F.conv2d(z, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                     stride=block.conv.stride, padding=1, groups=t)
        if z.device.type == "cpu":
            z = z.contiguous()   # NCHW batch normalisation: see _normalised
        z = F.batch_norm(z, None, None, params[pre + "bn.weight"].reshape(-1), params[pre + "bn.bias"].reshape(-1),
                         True, 0.0, block.bn.eps)
        if i == k:                                                                     # [n, T·C, h, w]
            z, m = _relu_pool(z, model.pool)
            fmap = m.reshape(n, t, -1, *m.shape[2:]).transpose(0, 1)
        else:
            z = _pool_relu(z, model.pool)
    feats = model.features_of(z).reshape(n, t, -1).transpose(0, 1)                    # [T, n, F]
    out = torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2)) \
        if "head.weight" in params else feats
    if tap is not None:
        return out, (feats if fmap is None else fmap)
    return (out, feats) if return_features else out
