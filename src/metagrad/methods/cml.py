"""CML: a co-learner trained only in the outer loop augments the meta-gradient (an outer-term plug-in).

Reference: Shin, Han, Kim, "Cooperative Meta-Learning with Gradient Augmentation", UAI 2024, arXiv 2406.04639;
official code https://github.com/JJongyn/CML (``maml/model_cml.py``, ``train_cml.py``), which this follows.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as fn
from ..losses import task_accuracy
from ..prototypes import distance_logits
from ..seams import LearnerView, OuterContext, Plugin, Series, VersusFigure
from . import register

HEADS = ("mlp", "conv")
# The pooling layers the conv head's tap is chosen among (2-D: the co-learner is convolutional).
POOLS_2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.LPPool2d,
            nn.FractionalMaxPool2d)


def _conv_bn_relu(width: int) -> list[nn.Module]:
    # No conv bias: batch-statistics BN right after it cancels a bias exactly (its gradient would be 0).
    return [nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, affine=True, track_running_stats=False), nn.ReLU()]


def conv_tap(model: nn.Module) -> tuple[str, int]:
    """Where the conv head reads the model: ``(name, channels)`` of the model's last 2-D pooling module (in
    ``named_modules()`` order), whose input is the last block's map before its pooling, and the
    ``out_channels`` of the last ``nn.Conv2d`` registered before it (the map's channels).

    Conv4 with ``pool="max"``: ``("blocks.3.pool", width)``.
    """
    found, conv = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, POOLS_2D) and conv is not None:
            found = name, conv.out_channels
    if found is None:
        raise ValueError(f"CML head='conv' reads the input of the model's last 2-D pooling module after a "
                         f"Conv2d (e.g. Conv4(pool='max')'s blocks.3.pool); {type(model).__name__} has none: "
                         "use head='mlp', or a model whose conv blocks pool with nn.MaxPool2d")
    return found


@register("cml")
class CML(Plugin):
    """Cooperative meta-learning: a co-learner φ scores the query set from the *adapted* model's features.

    ``loss = mean_i ℓ_i + λ · mean_i L(φ(feats_i), y_Q,i)`` where ``feats_i`` are task i's query features at
    its adapted parameters θ_i'. φ never takes part in the inner loop (no inner-rule hook), so adaptation and
    predictions are those of the base learner; its loss reaches θ through θ_i' (and through the inner update
    in second order), which is the "gradient augmentation". φ is trained by the same outer optimiser (it is a
    submodule of the learner) and is unused at evaluation.

    Heads:

    * ``"mlp"`` (default): Linear(d, d) → ReLU → Linear(d, out), on the input of the model's last Linear
      (``return_features=True``); d and out are that Linear's in/out features. Applied task-batched.
    * ``"conv"``: the official 84×84 design, conv3×3 → BN → ReLU → conv3×3 → BN → ReLU → MaxPool2 → flatten →
      Linear, on the last block's map before its pooling. Where that map is read, chosen at ``attach`` from the
      model's modules (:func:`conv_tap`): the input of the model's last 2-D pooling module (``nn.MaxPool2d``,
      ``nn.AvgPool2d``, their adaptive forms, ...) that follows an ``nn.Conv2d``; its channels are that conv's
      ``out_channels``, and the head's Linear takes as many inputs as the model's last Linear (the co-learner's
      pooled map has the shape of the model's, which the model flattens into its head: Conv4 with
      ``pool="max"``, tap ``blocks.3.pool``). A model without such a pooling module (e.g. Conv4 with
      ``pool="stride"``) is refused at ``attach``. The map costs one extra query forward, task-batched:
      ``functional.forward_batched(model, θ', x_Q, tap=name)`` (a hook on that module, or Conv4's grouped kernel,
      which knows the tap). BN uses the statistics of each task's query set, as the library's models do; the
      convs have no bias (the official code has one, but batch-statistics BN cancels it).

    On ProtoNet (host ``"protonet"``; our reading, the paper has no such host): the embedding is not adapted
    per task, so a fixed-class head on it would score arbitrary episode labels. The co-learner is a projection
    φ: Linear(d, d) → ReLU → Linear(d, d) of the embedding with its own prototype classifier, logits
    −‖φ(e_q) − φ(c_k)‖² of the query embeddings e_q against the task's prototypes c_k mapped by φ; its
    cross-entropy reaches the embedding through both. ``head="conv"`` is refused there.

    What the spec leaves open and the reading taken: regression uses MSE (the learner's loss), out = output
    dim; λ = 0 skips the term, which gives plain MAML's loss and gradients exactly. Diagnostics per meta-batch:
    ``cml.loss`` and, for classification, ``cml.accuracy`` (the co-learner's query accuracy).

    Args:
        weight: λ, the co-learner loss scale (official ``--loss-scaling``, default 1.0).
        head: "mlp" | "conv".

    Example:
        >>> from metagrad import MAML, methods
        >>> from metagrad.models import Conv4
        >>> learner = MAML(Conv4(1, ways=5), inner_lr=0.5, plugins=[methods.create("cml", head="conv")])
        >>> out = learner.meta_loss(batch)                    # batch: a TaskBatch
        >>> out.loss.backward(); out.diagnostics["cml.accuracy"]
    """

    needs_features = True
    figures = (VersusFigure(file="cml", caption="CML co-learner", title="CML co-learner vs meta-learner",
                            loss=Series("cml.loss", "co-learner"), accuracy=Series("cml.accuracy", "co-learner")),)
    learners = ("maml", "protonet")

    def __init__(self, weight: float = 1.0, head: str = "mlp") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown CML head {head!r}: use one of {', '.join(HEADS)}")
        if weight < 0:
            raise ValueError(f"CML weight must be >= 0, got {weight}")
        self.weight, self.head = float(weight), head
        # The conv head reads its map with a tap of its own (see attach), not the core's flat features.
        self.needs_features = head == "mlp"
        self.co_learner: nn.Module | None = None   # built at attach: its sizes depend on the model
        self.tap: str | None = None                # head="conv": the module whose input φ reads, set at attach

    def attach(self, view: LearnerView) -> None:
        if view.host == "protonet":
            if self.head != "mlp" or view.feature_dim is None:
                raise ValueError("CML on ProtoNet: use head='mlp' and give the embedding's size "
                                 f"(ProtoNet(..., embedding_dim=d)); got head={self.head!r}, size {view.feature_dim}")
            d = view.feature_dim
            w = next(iter(view.meta_params().values()), torch.empty(0))   # the embedding's dtype and device
            self.co_learner = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)).to(w.dtype).to(w.device)
            return
        model = view.model
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"CML needs a model whose output layer is an nn.Linear; {type(model).__name__} has none")
        lin = linears[-1]
        if self.head == "mlp":
            d = lin.in_features
            co = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, lin.out_features))
        else:
            self.tap, width = conv_tap(model)
            if lin.in_features % width:
                raise ValueError(f"CML head='conv': the model's last Linear takes {lin.in_features} inputs, not a "
                                 f"multiple of the {width} channels at {self.tap!r}; use head='mlp'")
            co = nn.Sequential(*_conv_bn_relu(width), *_conv_bn_relu(width), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(lin.in_features, lin.out_features))
        self.co_learner = co.to(dtype=lin.weight.dtype, device=lin.weight.device)

    def outer_term(self, ctx: OuterContext) -> torch.Tensor | None:
        if self.weight == 0:
            return None   # neutral: plain MAML's loss and gradients, bit for bit
        assert self.co_learner is not None, "CML is used before a learner attached it"
        logits = self._co_logits(ctx)
        y = ctx.batch.query_y
        losses = ctx.view.loss(logits, y)
        ctx.log("cml.loss", losses.mean())
        if ctx.batch.is_classification:
            ctx.log("cml.accuracy", task_accuracy(logits, y).mean())
        return self.weight * losses.mean()

    def _co_logits(self, ctx: OuterContext) -> torch.Tensor:
        """φ on every task's adapted query features (or maps): ``[T, N_q, out]``."""
        assert self.co_learner is not None
        if ctx.prototypes is not None:   # ProtoNet: a prototype classifier in the co-learner's projection
            assert ctx.query_features is not None
            return distance_logits(self.co_learner(ctx.query_features), self.co_learner(ctx.prototypes))
        if self.head == "mlp":
            assert ctx.query_features is not None
            return self.co_learner(ctx.query_features)   # Linear layers act on the last dim: task-batched
        # All tasks' maps in one batched forward (Conv4: grouped convolutions), then φ per task (its BN takes the
        # statistics of that task's query set).
        _, fmaps = fn.forward_batched(ctx.view.model, ctx.fast_params, ctx.batch.query_x, tap=self.tap)
        self._check_map(fmaps)
        return torch.stack([self.co_learner(fmap) for fmap in fmaps.unbind(0)])

    def _check_map(self, fmaps: torch.Tensor) -> None:
        """The tapped map ``[T, N, C, h, w]`` fits the co-learner built at attach (one clear error otherwise)."""
        assert self.co_learner is not None
        conv, lin = self.co_learner[0], self.co_learner[-1]
        if fmaps.dim() != 5 or fmaps.shape[2] != conv.in_channels or \
                conv.in_channels * (fmaps.shape[3] // 2) * (fmaps.shape[4] // 2) != lin.in_features:
            raise ValueError(f"CML head='conv': the map at {self.tap!r} has shape {list(fmaps.shape[2:])} per "
                             f"image, but the co-learner pools it by 2 into a Linear of {lin.in_features} inputs "
                             "(the model's last Linear); the conv head fits a model whose last pooling halves the "
                             "map and feeds its last Linear flattened (Conv4(pool='max')): use head='mlp'")
