"""ProtoNet: classes as the means of their support embeddings, scored by squared Euclidean distance.

Reference: Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. No inner loop: a
task's "adapted model" is its prototype classifier, so ``meta_loss`` is one embedding forward per task and the
plug-ins that act on outer terms (TRLearner, CML) apply; those that act on the inner loop are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from .. import functional as fn
from ..losses import task_accuracy
from ..prototypes import distance_logits, prototypes
from ..seams import LearnerView, OuterContext, Plugin
from ..tasks import TaskBatch
from .base import MetaLossOutput, register


def embedding_of(model: nn.Module) -> nn.Module:
    """A classifier's body as an embedding: its last ``nn.Linear`` replaced by an identity (in place), so the
    model maps inputs to the features that Linear read; ``embedding_dim`` records their size.

    Example:
        >>> emb = embedding_of(Conv4(1, ways=5))        # Conv4 without its head: 64-d vectors on 28×28 images
        >>> emb.embedding_dim
        64
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"embedding_of: {type(model).__name__} has no nn.Linear head to remove; pass a module "
                         "that maps inputs to vectors to ProtoNet directly")
    name, head = linears[-1]
    if not name:
        raise ValueError("embedding_of: the model is a single nn.Linear; it has no body")
    model.set_submodule(name, nn.Identity())
    model.embedding_dim = head.in_features
    return model


@register("protonet")
class ProtoNet(nn.Module):
    """Prototypical networks with composable outer-term plug-ins, behind the learners' protocol.

    Per task: embed the support and query inputs together (one forward, as the reference code; a model with
    batch-statistics normalisation sees both sets), prototypes c_k = mean of the class-k support embeddings,
    logits −‖f(x) − c_k‖², cross-entropy on the query set. Classification only; the number of ways is the
    support labels' (0..ways−1, every class present).

    Args:
        embedding: any module mapping a batch of inputs ``[N, *x_shape]`` to vectors ``[N, d]`` (e.g.
            :func:`embedding_of` a classifier); its parameters are what is meta-learned.
        plugins: outer-term plug-ins that support ``"protonet"`` (``Plugin.learners``): TRLearner, CML.
        embedding_dim: d, for plug-ins whose learnable parts are sized by it; None: the embedding's
            ``embedding_dim`` attribute, else its last ``nn.Linear``'s ``out_features``.

    Example:
        >>> learner = ProtoNet(embedding_of(Conv4(1, ways=5)), plugins=[methods.create("trlearner")])
        >>> out = learner.meta_loss(batch); out.loss.backward()      # or metagrad.meta_backward(learner, batch)
        >>> fast = learner.adapt(support_x, support_y)               # {"prototypes": [ways, d]}
        >>> logits = learner.predict(fast, query_x)
    """

    inner_loop = False   # (learners.base) inner-step counts mean nothing to it: evaluation scores 0 steps
    inner_steps = eval_inner_steps = 0

    def __init__(self, embedding: nn.Module, plugins: Sequence[Plugin] = (), embedding_dim: int | None = None) -> None:
        super().__init__()
        self.model = embedding
        self.embedding_dim = embedding_dim or _dim_of(embedding)
        self.plugins = nn.ModuleList(plugins)
        for p in self.plugins:
            checks.attach(p, self.view())

    def view(self) -> LearnerView:
        """What plug-ins see (:class:`~metagrad.seams.LearnerView`): no adapted tensors, no inner steps."""
        return LearnerView(self.model, (), "none", "cross_entropy", 0, 0, self.forward_batched, self.loss_of,
                           self.meta_params, self.name, self.embedding_dim)

    def meta_params(self) -> fn.Params:
        """θ by name (the embedding's parameters)."""
        return fn.meta_params(self.model)

    def forward_batched(self, params: fn.Params, x: torch.Tensor, return_features: bool = False):
        """Embeddings ``[T, N, d]`` of task-batched inputs; with ``return_features`` ``(embeddings, embeddings)``
        (the features of a prototype classifier are its input, the embedding)."""
        z = fn.forward_batched(self.model, params, x)
        return (z, z) if return_features else z

    def loss_of(self, output: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """``[T]`` mean cross-entropy per task of logits ``[T, N, ways]`` (``[T, N]`` with ``per_sample``)."""
        losses = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        return losses if per_sample else losses.mean(dim=1)

    def set_iteration(self, iteration: int) -> None:
        """The meta-iteration about to run, for the plug-ins' schedules."""
        for p in self.plugins:
            p.set_iteration(iteration)

    def meta_loss(self, batch: TaskBatch, first_order: bool | None = None) -> MetaLossOutput:
        """The differentiable objective of a meta-batch: mean query cross-entropy plus the plug-ins' outer terms.
        ``first_order`` is accepted for the protocol and changes nothing (there is no inner gradient)."""
        return self._loss(batch, create_graph=True, outer_terms=True)

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None, outer_terms: bool = False) -> MetaLossOutput:
        """Score a meta-batch without a graph; the same fields as :meth:`meta_loss`, detached. ``inner_steps``
        must be None or 0 (ProtoNet has no inner loop)."""
        if inner_steps not in (None, 0):
            raise ValueError(f"ProtoNet has no inner loop: evaluate with inner_steps 0, got {inner_steps}")
        with torch.no_grad():
            return self._loss(batch, create_graph=False, outer_terms=outer_terms).detached()

    def _loss(self, batch: TaskBatch, create_graph: bool, outer_terms: bool) -> MetaLossOutput:
        if not batch.is_classification:
            raise ValueError("ProtoNet classifies: support_y must be int64 class ids (regression needs MAML)")
        theta = self.meta_params()
        params = fn.expand_tasks(theta, len(batch))
        n_s = batch.support_x.shape[1]
        z = self.forward_batched(params, torch.cat([batch.support_x, batch.query_x], dim=1))
        support, query = z[:, :n_s], z[:, n_s:]
        protos = prototypes(support, batch.support_y, _ways(batch.support_y))
        logits = distance_logits(query, protos)
        checks.check_targets("cross_entropy", logits, batch.query_y, "query")
        samples = self.loss_of(logits, batch.query_y, per_sample=True)
        task_losses = samples.mean(dim=1)
        loss = query_loss = task_losses.mean()
        diag: dict = {}
        if outer_terms:
            octx = OuterContext(self.view(), batch, theta, params, logits, query, task_losses, create_graph, diag,
                                prototypes=protos)
            for p in self.plugins:
                term = p.outer_term(octx)
                if term is not None:
                    loss = loss + term
        acc = task_accuracy(logits, batch.query_y)
        return MetaLossOutput(loss, query_loss, acc.mean(), task_losses, acc, samples.detach(), diag)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> fn.Params:
        """One task's prototype classifier (no task dimension): ``{"prototypes": [ways, d]}``, the support set
        embedded alone."""
        z = fn.forward_single(self.model, self.meta_params(), support_x)
        return {"prototypes": prototypes(z.unsqueeze(0), support_y.unsqueeze(0), _ways(support_y.unsqueeze(0)))[0]}

    def predict(self, fast: fn.Params, query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, ways]`` of ``query_x`` (embedded alone) against the prototypes from :meth:`adapt`."""
        z = fn.forward_single(self.model, self.meta_params(), query_x)
        return distance_logits(z.unsqueeze(0), fast["prototypes"].unsqueeze(0))[0]

    def forward(self, batch: TaskBatch, first_order: bool | None = None) -> MetaLossOutput:
        return self.meta_loss(batch, first_order)


def _ways(support_y: torch.Tensor) -> int:
    """The number of ways of support labels ``[T, N_s]``: every task must hold every class 0..ways−1."""
    ways = int(support_y.max()) + 1
    present = F.one_hot(support_y, ways).sum(dim=1)
    if bool((present == 0).any()):
        raise ValueError(f"ProtoNet: a task's support set lacks a class of 0..{ways - 1}: every class needs a "
                         "support example to have a prototype")
    return ways


def _dim_of(embedding: nn.Module) -> int | None:
    """The embedding's size where the module says it: an ``embedding_dim`` attribute, else its last Linear's
    ``out_features``; None when neither (plug-ins that need it ask for ``embedding_dim``)."""
    dim = getattr(embedding, "embedding_dim", None)
    if dim is not None:
        return int(dim)
    linears = [m for m in embedding.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
