"""The two seams of the MAML loop and the plug-in protocol.

A plug-in is an ``nn.Module`` that overrides any of these hooks (all default to the identity, so a plug-in
that overrides nothing leaves MAML unchanged):

Seam 1, the inner update rule, called for every inner step of every task (task-batched: each tensor has a
leading task dimension T)::

    state           = init_task(ctx)                          # per-task state, e.g. CxGrad's context vector
    params, extras  = prepare(params, state, ctx)             # the parameters the support loss is taken at
    grads           = transform(grads, params, state, ctx)    # reshape the gradient, e.g. Meta-GNA
                                                              # (or return (grads, state) to advance state)
    state           = update(state, extra_grads, ctx)         # step the state with the gradient of `extras`

    the core then steps   θ_l ← params_l − α_l · grads_l      (α fixed, or learned per step / per element)

Seam 2, outer terms: ``outer_term(ctx)`` returns a scalar added to the meta-loss (or None). A plug-in whose
``records_step_losses`` is true also gets the query loss after every inner step (``ctx.step_query_losses``), as
MAML++'s multi-step loss (:mod:`metagrad.msl`) needs.

Schedules: ``set_iteration(it)``, called by the training loop (through ``MAML.set_iteration``) before each
meta-iteration, is how a plug-in learns the meta-iteration; the loop itself knows none.

Composition rule (several plug-ins in one learner): hooks run in the order the plug-ins were given. ``prepare``
calls chain (each sees the previous one's parameters), ``transform`` calls chain on the gradient taken at the
final prepared parameters, every ``update`` sees the gradient of its own extras, and outer terms add up. So
Meta-GNA after CxGrad normalises the gradient taken at CxGrad's rescaled weights Ŵ and its Arbiter reads their
norms. Plug-ins keep per-task state in the values they return, never in attributes set during the loop.

The view: plug-ins never see the learner itself. ``attach(view)`` and both contexts (``ctx.view``) give a
:class:`LearnerView`, the few things a plug-in may read: the model, the adapted tensor names, the adapt mode, the
loss kind, the inner step counts, the batched forward, the loss, and θ. The learner builds it; adding a learner
attribute never widens what plug-ins can depend on.

Declarations (what the rest of the package asks a plug-in instead of naming it):

- ``task_group_size``: the plug-in relates consecutive tasks of a meta-batch in groups of this size (see
  :func:`metagrad.tasks.task_groups`), so a meta-batch split across ranks, or into the chunks of
  :func:`metagrad.chunks.meta_backward`, keeps them whole; 1, the default, means the tasks are independent and any
  split is fine. (Every outer term is a mean over tasks of per-task terms: that is what makes such splits exact.)
- ``records_step_losses``: the core records the query loss after every inner step for the outer terms.
- ``figures``: the report figures its logged diagnostics make, as specs (:class:`LayerFigure`,
  :class:`MatrixFigure`, :class:`VersusFigure`) naming the diagnostic keys and their labels; the report draws them
  generically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .functional import Params

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import TaskBatch


@dataclass(frozen=True)
class LearnerView:
    """What a plug-in may know about the learner it is attached to (built by the learner, read-only)."""

    model: nn.Module                 # the model; its parameters are θ
    adapted: tuple[str, ...]         # names of the tensors the inner loop updates, in parameter order
    adapt_mode: str                  # "all" | "no_norm" | "head" | "body" ("none": a learner without inner loop)
    loss_kind: str                   # "cross_entropy" | "mse"
    inner_steps: int                 # inner steps in meta-training
    eval_inner_steps: int            # inner steps in evaluation (by default)
    # forward(params, x, return_features=False): the model with task-batched params [T, *shape] on x [T, N, ...]
    forward: Callable[..., Any]
    # loss(output, target, per_sample=False): [T] mean loss per task ([T, N] with per_sample)
    loss: Callable[..., torch.Tensor]
    meta_params: Callable[[], Params]  # θ by name, un-batched (live: the model's current parameters)
    host: str = "maml"               # the learner's registry key (a plug-in lists those it supports)
    # The size of the features a plug-in reads (query_features), when the learner knows it; None: the input
    # of the model's last nn.Linear (MAML's heads). ProtoNet: the embedding's size.
    feature_dim: int | None = None


@dataclass
class InnerContext:
    """What an inner-rule hook may look at for one meta-batch of T tasks."""

    view: LearnerView
    support_x: torch.Tensor          # [T, N_s, *x_shape]
    support_y: torch.Tensor          # [T, N_s] or [T, N_s, out]
    adapted: tuple[str, ...]         # names of the tensors the inner loop updates, in parameter order
    create_graph: bool               # second order: keep the graph of inner gradients
    step: int = 0                    # current inner step
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def forward(self, params: Params, x: torch.Tensor | None = None, return_features: bool = False):
        """The model on ``x`` (default: the support inputs) with task-batched ``params``."""
        return self.view.forward(params, self.support_x if x is None else x, return_features)

    def support_losses(self, params: Params, per_sample: bool = False) -> torch.Tensor:
        """Support loss per task ``[T]`` (or per sample ``[T, N_s]``) at ``params``."""
        return self.view.loss(self.forward(params), self.support_y, per_sample)

    def log(self, name: str, value: Any) -> None:
        """Record a diagnostic (tensors are stored detached) for this meta-batch; a scalar is read as a mean over
        its tasks (:func:`metagrad.chunks.meta_backward` averages its chunks' by their tasks)."""
        self.diagnostics[name] = map_tensors(torch.Tensor.detach, value)


@dataclass
class OuterContext:
    """What an outer-term hook receives: the meta-batch after adaptation.

    In :meth:`MAML.evaluate` outer terms run under ``torch.no_grad()``: a hook that needs autograd inside
    (e.g. a gradient as meta-data) wraps that part in ``torch.enable_grad()``.
    """

    view: LearnerView
    batch: TaskBatch
    meta_params: Params              # θ, un-batched
    fast_params: Params              # θ' per task, [T, *shape] (every parameter, adapted or not)
    query_output: torch.Tensor       # [T, N_q, out]
    query_features: torch.Tensor | None  # [T, N_q, d] when a plug-in asked for features
    query_losses: torch.Tensor       # [T]
    create_graph: bool
    diagnostics: dict[str, Any] = field(default_factory=dict)
    step_query_losses: list[torch.Tensor] | None = None  # [T] after each inner step, when a plug-in records them
    # ProtoNet: task j's adapted model is its prototype classifier, the class means of its support embeddings
    # [T, ways, d] (query_output: logits −‖query_features − prototype‖², fast_params: θ per task).
    prototypes: torch.Tensor | None = None

    def forward(self, params: Params, x: torch.Tensor, return_features: bool = False):
        """The model with task-batched ``params`` on task-batched ``x``."""
        return self.view.forward(params, x, return_features)

    def log(self, name: str, value: Any) -> None:
        """Record a diagnostic (tensors are stored detached) for this meta-batch; a scalar is read as a mean over
        its tasks (:func:`metagrad.chunks.meta_backward` averages its chunks' by their tasks)."""
        self.diagnostics[name] = map_tensors(torch.Tensor.detach, value)


# Declarations: the report figures a plug-in's diagnostics make -------------------------------------------------
@dataclass(frozen=True)
class Series:
    """A diagnostic a plug-in logs with ``ctx.log(key, ...)`` (its key in ``metrics.jsonl``) and its label."""

    key: str
    label: str


@dataclass(frozen=True)
class FigureSpec:
    """One report figure per benchmark preset, ``<preset>-<file>.png``, captioned ``<preset>: <caption>``."""

    file: str
    caption: str
    title: str


@dataclass(frozen=True)
class LayerFigure(FigureSpec):
    """A per-tensor dict logged under ``series.key`` (``key/<tensor>`` in the metrics) over training: one panel
    per method, one line per tensor, y axis labelled ``series.label``."""

    series: Series


@dataclass(frozen=True)
class MatrixFigure(FigureSpec):
    """A small matrix logged under ``series.key``: its last logged value as a heat map, one panel per method (its
    first seed that logs it), colour bar labelled ``series.label``."""

    series: Series
    xlabel: str
    ylabel: str


@dataclass(frozen=True)
class VersusFigure(FigureSpec):
    """The plug-in's own adapted-query metric against the meta-learner's, a line pair per method: ``accuracy``
    against the meta-learner's accuracy when some run logs it (classification), else ``loss`` against the query
    loss on a log scale."""

    loss: Series
    accuracy: Series


class Plugin(nn.Module):
    """Base class of every plug-in; every hook defaults to the identity (plain MAML).

    Subclasses set ``needs_features = True`` when ``outer_term`` reads query features, list the report figures
    their diagnostics make in ``figures``, and override ``task_group_size`` when they relate tasks to each other.
    ``learners`` lists the learner keys the plug-in supports; on any other the learner refuses it at build time
    with ``refusal`` (one line: why its mechanism does not apply there).
    """

    needs_features: bool = False
    records_step_losses: bool = False
    name: str = "plugin"
    figures: ClassVar[tuple[FigureSpec, ...]] = ()
    learners: ClassVar[tuple[str, ...]] = ("maml",)
    refusal: ClassVar[str] = "it acts on the inner loop, which only MAML has"

    @property
    def task_group_size(self) -> int:
        """Consecutive tasks this plug-in relates (:func:`metagrad.tasks.task_groups`); 1: independent tasks."""
        return 1

    def attach(self, view: LearnerView) -> None:
        """Called once by the learner with its view: validate the model and build learnable parts sized to it."""

    def set_iteration(self, iteration: int) -> None:
        """The meta-iteration about to run, for schedules (called by the training loop, never mid-loop)."""

    # Seam 1 ------------------------------------------------------------------------------------------------
    def init_task(self, ctx: InnerContext) -> Any:
        return None

    def prepare(self, params: Params, state: Any, ctx: InnerContext) -> tuple[Params, dict[str, torch.Tensor]]:
        return params, {}

    def transform(self, grads: Params, params: Params, state: Any,
                  ctx: InnerContext) -> Params | tuple[Params, Any]:
        """The gradient the step uses; may return ``(grads, new_state)`` to also advance the state."""
        return grads

    def update(self, state: Any, extra_grads: dict[str, torch.Tensor], ctx: InnerContext) -> Any:
        return state

    # Seam 2 ------------------------------------------------------------------------------------------------
    def outer_term(self, ctx: OuterContext) -> torch.Tensor | None:
        return None


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested structure of dicts, lists and tuples (plug-in states)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree
