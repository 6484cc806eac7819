"""TRLearner: task-relation consistency in the outer loop (an outer-term plug-in).

Reference: Wang, Qiang, Zheng, Xiong, Hua, "Rethinking Meta-Learning from a Learning Lens", arXiv 2409.08474.
No public code exists and the exact equations are not available: this is *our reading* of the paper's
description (``shared/specs/trlearner.md``), not a reproduction of the authors' code.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as fn
from ..prototypes import distance_logits
from ..seams import LearnerView, MatrixFigure, OuterContext, Plugin, Series
from ..tasks import task_groups
from . import register


def _last_linear(model: nn.Module, who: str) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``model`` (registration order), by module name; the same head ANIL adapts."""
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError(f"{who} needs a model whose output layer is an nn.Linear; {type(model).__name__} has none")
    return linears[-1]


@register("trlearner")
class TRLearner(Plugin):
    """Task Relation Learner: adapted models of related tasks should agree on each other's inputs.

    For a meta-batch of T >= 2 tasks, within groups of ``group_size`` consecutive tasks::

        m_i  = meta-data of task i at θ (detached, L2-normalised)
        M_ij = (1/K) Σ_k cos(w_k ⊙ m_i, w_k ⊙ m_j)               K learnable heads w_k ∈ R^d
        M̃_i· = softmax_{j≠i}(M_ij / τ)                           rows sum to 1
        P_ij = task j's adapted model on task i's probe inputs (``probe_size`` of its query inputs)
        L_TR = mean_i mean((P_ii − Σ_{j≠i} M̃_ij P_ij)²),          outer term  λ · L_TR

    Our reading of what the paper leaves open:

    * Meta-data: classification uses ``[mean; std]`` over the support samples of the features (input of the
      last Linear) at θ — label-free, so the relation does not depend on the arbitrary class order of an
      episode; std is the population std (defined for a single sample). Regression uses the flattened
      support-loss gradient w.r.t. the last Linear's weight and bias at θ. Which one is decided per
      meta-batch by ``batch.is_classification``; the heads are sized at attach from the learner's loss
      (cross-entropy → classification), and a batch of the other kind is refused.
    * P is the model output (regression) or the features (classification). Both P_ii and the P_ij carry
      gradients (to θ through the adapted parameters, first or second order as the learner); M̃ carries the
      gradient of the heads. m_i is detached, so the heads learn only through the consistency term.
    * Groups bound the cost to T·(G−1) probe forwards (G = ``group_size``), vectorised over tasks: for every
      offset k the task-batched adapted parameters are permuted so task i meets partner i+k of its group.
      A last group of one task joins the previous group (see :func:`task_groups`).
    * Probes, ``probes="spread"`` (default): ``probe_size`` query inputs evenly spaced over the query set.
      The spec says "the first probe_size query inputs", which in a shuffled episode is a sample of every
      class; our samplers order the query set by class, where the first 16 of 75 are 15 of class 0 and one of
      class 1, and evenly spaced picks are the every-class sample the wording means. ``probes="first"`` takes
      the first ones literally.
    * P_ii, ``own="query"`` (default): task i's adapted model on its probe inputs is read off the core's
      query forward (the probe rows), so the extra forwards are the spec's T·(G−1). With a model whose
      normalisation uses batch statistics (Conv4's BN), P_ii then carries the statistics of the whole query
      set and the P_ij those of the probe set, so even identical adapted models leave a nonzero L_TR: on
      Omniglot 5w1s at initialisation, the squared difference is 1.4% of the features' variance over spread
      probes (38% over the first 16, one class's statistics).
      ``own="probe"`` runs task i's model on its probe set alone, like its partners (statistics-consistent;
      T more probe forwards, 0.2-0.3x of a plain MAML step on Omniglot, docs/methods.md). Without
      batch-dependent layers (the MLPs of regression) the two are the same numbers.
    * Extra cost per meta-batch: T support forwards at θ for m_i (plus a backward for regression) and T·(G−1)
      probe forwards (T·G with ``own="probe"``). With no adapted parameter upstream of the features (ANIL on
      classification) every partner's P_ij is the task's own probe features: they are computed once, with no
      forward when P_ii is the probe set's (``own="probe"``, or probes = the whole query set) and T otherwise.
    * With two tasks per group each row of M̃ has one entry (always 1), so the heads get no gradient.
    * On ProtoNet (host ``"protonet"``) task j's adapted model is its prototype classifier. The embedding is
      shared by all tasks, so features of task i's probes under model j would equal its own (the term would
      vanish); P_ij is instead the softmax over −‖e − c_k^j‖² of task i's probe embeddings e against task j's
      prototypes, sorted in decreasing order over the classes (label-free: an episode's class order is
      arbitrary). P_ii uses task i's own prototypes (its query logits); no extra forward. m_i as for
      classification, on the support embeddings. ``own`` changes nothing there (the probes' embeddings come
      from the one forward of the task).

    Diagnostics per meta-batch: ``trlearner.relation`` (M̃ of the first group) and ``trlearner.loss`` (L_TR).

    Args:
        weight: λ; 0 is the base learner exactly (the term is skipped).
        heads: K, the number of similarity heads.
        temperature: τ of the row softmax.
        group_size: G, tasks related to each other.
        probe_size: probe inputs per task (all query inputs when fewer).
        own: where P_ii comes from: "query" (the core's query forward, the spec's cost) or "probe" (a forward
            of the probe set alone, batch statistics consistent with the P_ij).
        probes: which query inputs are probes: "spread" (evenly spaced over the query set) or "first".

    Example:
        >>> from metagrad import MAML, methods
        >>> from metagrad.models import MLP
        >>> learner = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, loss="mse", plugins=[methods.create("trlearner")])
        >>> out = learner.meta_loss(batch)                 # batch: a TaskBatch with T >= 2 tasks
        >>> out.loss.backward(); out.diagnostics["trlearner.relation"]   # M̃ of the first group
    """

    figures = (MatrixFigure(file="relation", caption="TRLearner relation matrix", title="TRLearner relation matrix",
                            series=Series("trlearner.relation", "M̃_ij: softmax over j≠i of M_ij/τ"),
                            xlabel="task j (within the group)", ylabel="task i"),)
    learners = ("maml", "protonet")

    def __init__(self, weight: float = 0.1, heads: int = 4, temperature: float = 0.5, group_size: int = 4,
                 probe_size: int = 16, own: str = "query", probes: str = "spread") -> None:
        super().__init__()
        if weight < 0 or heads < 1 or temperature <= 0 or group_size < 2 or probe_size < 1:
            raise ValueError("TRLearner needs weight >= 0, heads >= 1, temperature > 0, group_size >= 2 and "
                             f"probe_size >= 1, got {weight}, {heads}, {temperature}, {group_size}, {probe_size}")
        if own not in ("query", "probe"):
            raise ValueError(f"TRLearner own must be 'query' (P_ii from the query forward) or 'probe' (a forward "
                             f"of the probe set alone), got {own!r}")
        if probes not in ("spread", "first"):
            raise ValueError(f"TRLearner probes must be 'spread' (evenly spaced query inputs) or 'first', "
                             f"got {probes!r}")
        self.own, self.probes = own, probes
        self.weight, self.num_heads, self.temperature = float(weight), int(heads), float(temperature)
        self.group_size, self.probe_size = int(group_size), int(probe_size)
        self.head_weights: nn.Parameter | None = None   # [K, d], built at attach (d depends on the model)
        self._head_names: tuple[str, ...] = ()
        self._classification = True
        self._shared_features = False   # classification with no adapted parameter upstream of the features

    @property
    def task_group_size(self) -> int:
        """G: tasks are related within :func:`~metagrad.tasks.task_groups` of ``group_size``."""
        return self.group_size

    def attach(self, view: LearnerView) -> None:
        self._shared_features = False   # set below for classification on MAML; never kept from an earlier attach
        if view.host == "protonet":
            if view.feature_dim is None:
                raise ValueError("TRLearner on ProtoNet sizes its heads by the embedding: pass "
                                 "ProtoNet(..., embedding_dim=d)")
            self._classification, self.needs_features = True, True
            w = next(iter(view.meta_params().values()), torch.empty(0))   # the embedding's dtype and device
            self.head_weights = nn.Parameter(1 + 0.01 * torch.randn(self.num_heads, 2 * view.feature_dim,
                                                                    dtype=w.dtype, device=w.device))
            return
        model = view.model
        head, lin = _last_linear(model, "TRLearner")
        self._classification = view.loss_kind == "cross_entropy"
        if self._classification:
            if not fn.supports_features(model):
                raise ValueError(f"TRLearner (classification) needs features, but {type(model).__name__}.forward "
                                 "has no return_features argument")
            d = 2 * lin.in_features
            # Ask for query features: P_ii reads them (own="query", or probes = the whole query set). Correct
            # either way: without them (a core that reads the flag before attach) P_ii repeats the query forward.
            self.needs_features = True
            body = [n for n in view.adapted if not n.startswith(f"{head}.")]
            if not body:
                # ANIL: the features are the same function of θ for every task, so every partner's P_ij is the
                # task's own features and the row-normalised mix equals them: the term relates no tasks. It is
                # zero when P_ii is computed like the P_ij; with own="query", batch-statistics normalisation and
                # fewer probes than queries it measures only the query-set vs probe-set statistics. Allowed (the
                # spec lists ANIL), but said.
                warnings.warn("TRLearner on classification with adapt='head': the features do not depend on the "
                              "adapted head, so the relation term relates no tasks (it is zero, or with "
                              "batch-statistics normalisation and fewer probes than queries only the gap between "
                              "the query-set and probe-set statistics) and its heads get a zero gradient; use "
                              "adapt='all' or 'no_norm' for it to act", stacklevel=3)
            self._shared_features = not body
        else:
            self._head_names = tuple(f"{head}.{n}" if head else n for n, _ in lin.named_parameters())
            d = sum(p.numel() for p in lin.parameters())
        w = lin.weight
        self.head_weights = nn.Parameter(1 + 0.01 * torch.randn(self.num_heads, d, dtype=w.dtype, device=w.device))

    # -- the relation matrix ---------------------------------------------------------------------------------------
    def meta_data(self, ctx: OuterContext) -> torch.Tensor:
        """``[T, d]`` task meta-data m_i at θ, detached and L2-normalised."""
        batch = ctx.batch
        theta = {n: p.detach() for n, p in ctx.meta_params.items()}
        params = fn.expand_tasks(theta, len(batch))
        if batch.is_classification:
            with torch.no_grad():
                _, feats = ctx.forward(params, batch.support_x, return_features=True)
            m = torch.cat([feats.mean(dim=1), feats.std(dim=1, correction=0)], dim=1)
        else:
            # enable_grad: evaluate(outer_terms=True) runs outer terms under no_grad.
            with torch.enable_grad():
                params = {**params, **{n: params[n].clone().requires_grad_() for n in self._head_names}}
                losses = ctx.view.loss(ctx.forward(params, batch.support_x), batch.support_y)
                grads = torch.autograd.grad(losses.sum(), [params[n] for n in self._head_names])
            m = torch.cat([g.flatten(1) for g in grads], dim=1)
        return F.normalize(m.detach(), dim=1)

    def relation(self, m: torch.Tensor, groups: list[range]) -> torch.Tensor:
        """``[T, T]`` row-normalised relation M̃: softmax over the other tasks of the same group, 0 elsewhere."""
        assert self.head_weights is not None
        z = F.normalize(self.head_weights.unsqueeze(0) * m.unsqueeze(1), dim=2)   # [T, K, d]
        sim = torch.einsum("ikd,jkd->ij", z, z) / self.num_heads
        T = m.shape[0]
        allowed = torch.zeros(T, T, dtype=torch.bool, device=m.device)
        for g in groups:
            allowed[g.start:g.stop, g.start:g.stop] = True
        allowed.fill_diagonal_(False)
        return torch.softmax((sim / self.temperature).masked_fill(~allowed, float("-inf")), dim=1)

    # -- the outer term ------------------------------------------------------------------------------------------
    def outer_term(self, ctx: OuterContext) -> torch.Tensor | None:
        if self.weight == 0:
            return None   # neutral: the base learner's loss and gradients, bit for bit
        batch = ctx.batch
        T = len(batch)
        if T < 2:
            raise ValueError(f"TRLearner needs >= 2 tasks per meta-batch to relate them, got {T}: "
                             "raise meta_batch_size or drop the plug-in")
        cls = batch.is_classification
        if cls != self._classification:
            raise ValueError(f"TRLearner was attached for {'classification' if self._classification else 'regression'}"
                             f" (loss={ctx.view.loss_kind!r}) but got a {'classification' if cls else 'regression'}"
                             " batch")
        groups = task_groups(T, self.group_size)
        rel = self.relation(self.meta_data(ctx), groups)
        rows = self.probe_rows(batch.query_x.shape[1], batch.query_x.device)
        probe = batch.query_x[:, rows]
        protos = ctx.prototypes
        if protos is not None:   # ProtoNet: class-order-free outputs of the prototype classifiers
            assert ctx.query_features is not None
            emb = ctx.query_features[:, rows]
            own = _sorted_probs(ctx.query_output[:, rows])

            def partner_outputs(sel: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
                return _sorted_probs(distance_logits(emb[sel], protos[partner]))
        elif self._shared_features:
            # No adapted parameter is upstream of the features (ANIL): every partner's P_ij is task i's probe
            # features at θ, the same tensor for each j, so Σ_j M̃_ij P_ij = (Σ_j M̃_ij) · P_i·. One forward of
            # the probes (none when P_ii already is it) instead of G−1; the same value and gradients.
            own = self._own_outputs(ctx, probe, rows, cls)
            same = own if self._own_is_probe_forward(ctx, probe) else ctx.forward(ctx.fast_params, probe, True)[1]
            loss = (own - rel.sum(dim=1).view(-1, 1, 1) * same).pow(2).flatten(1).mean(dim=1).mean()
            return self._logged(ctx, rel, groups, loss)
        else:
            own = self._own_outputs(ctx, probe, rows, cls)

            def partner_outputs(sel: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
                out = ctx.forward({name: p[partner] for name, p in ctx.fast_params.items()}, probe[sel], cls)
                return out[1] if cls else out
        # Σ_j M̃_ij P_ij, one task-batched forward per partner offset k (T·(G−1) probe forwards in all).
        index = torch.arange(T, device=probe.device)
        start = torch.empty(T, dtype=torch.long, device=probe.device)
        size = torch.empty_like(start)
        for g in groups:
            start[g.start:g.stop], size[g.start:g.stop] = g.start, len(g)
        mix = torch.zeros_like(own)
        for k in range(1, max(len(g) for g in groups)):
            sel = index[size > k]           # tasks whose group still has an unseen partner at offset k
            partner = start[sel] + (sel - start[sel] + k) % size[sel]
            others = partner_outputs(sel, partner)
            mix = mix.index_add(0, sel, rel[sel, partner].view(-1, *[1] * (others.dim() - 1)) * others)
        loss = (own - mix).pow(2).flatten(1).mean(dim=1).mean()
        return self._logged(ctx, rel, groups, loss)

    def _logged(self, ctx: OuterContext, rel: torch.Tensor, groups: list[range], loss: torch.Tensor) -> torch.Tensor:
        first = groups[0]
        ctx.log("trlearner.relation", rel[first.start:first.stop, first.start:first.stop])
        ctx.log("trlearner.loss", loss)
        return self.weight * loss

    def probe_rows(self, n_query: int, device: torch.device | None = None) -> torch.Tensor:
        """Indices of the probe inputs in a query set of ``n_query`` (all of them when ``probe_size`` >= it)."""
        n = min(self.probe_size, n_query)
        if self.probes == "first" or n == n_query:
            return torch.arange(n, device=device)
        return torch.linspace(0, n_query - 1, n, device=device).round().long()

    def _own_is_probe_forward(self, ctx: OuterContext, probe: torch.Tensor) -> bool:
        """Whether P_ii is the model on the probe set alone (``own="probe"``, or probes = the whole query set),
        i.e. computed exactly as its partners' P_ij are."""
        return self.own == "probe" or probe.shape[1] == ctx.batch.query_x.shape[1]

    def _own_outputs(self, ctx: OuterContext, probe: torch.Tensor, rows: torch.Tensor, cls: bool) -> torch.Tensor:
        """P_ii: the probe rows of the core's query forward (``own="query"``, or whenever the probes are the
        whole query set, where the two readings agree), else a forward of the probe set alone."""
        if self.own == "query" or probe.shape[1] == ctx.batch.query_x.shape[1]:
            out = ctx.query_features if cls else ctx.query_output
            if out is None:   # a core that read `needs_features` before attach: the same query forward, again
                out = ctx.forward(ctx.fast_params, ctx.batch.query_x, True)[1]
            return out[:, rows]
        out = ctx.forward(ctx.fast_params, probe, cls)
        return out[1] if cls else out


def _sorted_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities sorted in decreasing order over the classes: a classifier's output on an input,
    free of the episode's arbitrary class order."""
    return torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
