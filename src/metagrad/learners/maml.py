"""MAML: the bi-level loop, with plug-ins at two seams (see :mod:`metagrad.seams`).

References: Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017; Antoniou et al., "How to train your MAML", ICLR 2019 (MAML++ options); Raghu et al., "Rapid
learning or feature reuse?", ICLR 2020 (ANIL, ``adapt="head"``); Oh, Yoo, Kim, Yun, "BOIL: Towards Representation
Change for Few-shot Learning", ICLR 2021 (BOIL, ``adapt="body"``); Li et al., "Meta-SGD", 2017
(``learn_inner_lr="per_element"``); Lee & Choi, "Gradient-Based Meta-Learning with Learned Layerwise Metric and
Subspace", ICML 2018 (T-Net: a model wrapped by :class:`metagrad.models.TNet`, whose transforms no inner step
adapts); Triantafillou et al., "Meta-Dataset", ICLR 2020 (Proto-MAML, ``head="prototype"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from .. import functional as fn
from .. import inner_lr as lr_rules
from ..losses import per_sample_loss, task_accuracy
from ..msl import MultiStepLoss
from ..prototypes import PrototypeHead
from ..seams import InnerContext, LearnerView, OuterContext, Plugin, map_tensors
from ..tasks import TaskBatch
from .base import MetaLossOutput, register

# How each task's head starts: θ's own rows, or built from the task's support set (None: θ as it is).
TASK_HEADS = {"trained": None, "prototype": PrototypeHead}


@register("maml")
class MAML(nn.Module):
    """Model-agnostic meta-learning on a plain module, second or first order, with composable plug-ins.

    Args:
        model: any ``nn.Module``; its parameters are the meta-initialisation θ.
        inner_lr: α, the inner step size (initial value when learned), or an
            :class:`~metagrad.inner_lr.InnerLR` rule built for the adapted tensors (``learn_inner_lr`` unused).
        inner_steps: inner steps in meta-training.
        eval_inner_steps: inner steps in evaluation (None: same as ``inner_steps``).
        first_order: FOMAML, inner gradients treated as constants.
        adapt: which parameters the inner loop updates, by their role (:func:`metagrad.functional.param_roles`):
            "all" | "no_norm" (normalisation affine parameters are outer-only) | "head" (ANIL: the last Linear
            only) | "body" (BOIL: all but the last Linear). Parameters of modules declaring ``meta_role="outer"``
            (T-Net's transforms) are never adapted.
        loss: "cross_entropy" | "mse".
        plugins: plug-ins from :mod:`metagrad.methods`, hooks applied in this order.
        learn_inner_lr: "fixed" | "per_step" (MAML++ LSLR) | "per_element" (Meta-SGD). "per_step" learns one
            rate per training inner step (``inner_steps``); evaluation with more steps reuses the last trained
            rate for the steps past them, never an untrained one.
        multi_step_loss: MAML++ MSL: adds a :class:`~metagrad.msl.MultiStepLoss` outer term (the query loss after
            every inner step, weights annealed to the last one over ``msl_iterations`` meta-iterations, >= 1;
            without annealing, leave the option off). Its schedule follows :meth:`set_iteration`.
        head: how each task's classifier head starts its inner loop: "trained" (θ's rows) or "prototype"
            (Proto-MAML: rows 2·μ_c and biases −‖μ_c‖² from the task's support prototypes on the head's input
            features, :mod:`metagrad.prototypes`; any number of ways, e.g. other ways than training's).

    The model's normalisation layers must not track running statistics (``track_running_stats=False``): MAML
    normalises with each batch's statistics in the inner loop and at the query, in training and evaluation
    alike (Finn et al.'s reference code); a model that tracks them is refused with a one-line message.

    Example:
        >>> learner = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, loss="mse")
        >>> opt = torch.optim.Adam(learner.parameters(), 1e-3)
        >>> learner.set_iteration(it)                 # only plug-ins' schedules (MAML++ MSL) need it
        >>> out = learner.meta_loss(batch)            # batch: a TaskBatch
        >>> out.loss.backward(); opt.step()           # or metagrad.meta_backward(learner, batch): bounded memory
        >>> fast = learner.adapt(support_x, support_y); pred = learner.predict(fast, query_x)
    """

    inner_loop = True   # (learners.base) the inner-step counts mean something to it

    def __init__(self, model: nn.Module, inner_lr: float | lr_rules.InnerLR = 0.4, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False, adapt: str = "all",
                 loss: str = "cross_entropy", plugins: Sequence[Plugin] = (), learn_inner_lr: str = "fixed",
                 multi_step_loss: bool = False, msl_iterations: int = 0, head: str = "trained") -> None:
        super().__init__()
        checks.learner_options(adapt, loss, inner_steps, eval_inner_steps)
        checks.model_norms(model)
        if head not in TASK_HEADS:
            raise ValueError(f"unknown head {head!r}: use one of {', '.join(TASK_HEADS)}")
        plugins = [*plugins, *([MultiStepLoss(msl_iterations)] if multi_step_loss else [])]
        self.model, self.inner_steps = model, int(inner_steps)
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.first_order, self.adapt_mode, self.loss_kind = bool(first_order), adapt, loss
        self.adapted = fn.adapted_names(model, adapt)
        shapes = [fn.meta_params(model)[n].shape for n in self.adapted]
        self.inner_lr = inner_lr if isinstance(inner_lr, lr_rules.InnerLR) else \
            lr_rules.create(learn_inner_lr, list(self.adapted), shapes, inner_lr, self.inner_steps)
        self.plugins = nn.ModuleList(plugins)
        for p in self.plugins:
            checks.attach(p, self.view())
        self.needs_features = any(p.needs_features for p in self.plugins)
        make_head = TASK_HEADS[head]
        self.head, self.task_head = head, None if make_head is None else make_head(model, loss)

    def view(self) -> LearnerView:
        """What plug-ins see of this learner (:class:`~metagrad.seams.LearnerView`): ``attach`` and the contexts."""
        return LearnerView(self.model, self.adapted, self.adapt_mode, self.loss_kind, self.inner_steps,
                           self.eval_inner_steps, self.forward_batched, self.loss_of, self.meta_params, self.name)

    def meta_params(self) -> fn.Params:
        """θ by name (the model's parameters)."""
        return fn.meta_params(self.model)

    def forward_batched(self, params: fn.Params, x: torch.Tensor, return_features: bool = False):
        """The model with task-batched parameters ``[T, *shape]`` on task-batched inputs ``[T, N, ...]``."""
        return fn.forward_batched(self.model, params, x, return_features)

    def loss_of(self, output: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """``[T]`` mean loss per task (``[T, N]`` with ``per_sample``)."""
        losses = per_sample_loss(self.loss_kind, output, target)
        return losses if per_sample else losses.mean(dim=1)

    # -- the inner loop ----------------------------------------------------------------------------------------
    def _inner_loop(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, create_graph: bool,
                    keep_graph: bool, query: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Adapt T tasks at once. Returns (fast params ``[T, *shape]``, per-step query losses, diagnostics).

        ``keep_graph=False`` (evaluation) detaches after every step so no graph survives a step.
        ``query`` given: the query loss after every step is also returned (for a plug-in that records them).
        """
        theta = self.meta_params()
        if not keep_graph:
            theta = {n: p.detach() for n, p in theta.items()}
        fast = fn.expand_tasks(theta, support_x.shape[0])
        ctx = InnerContext(self.view(), support_x, support_y, self.adapted, create_graph)
        if self.task_head is not None:   # each task's own starting head, from its support set
            fast = self.task_head(ctx, fast)
        states = [p.init_task(ctx) for p in self.plugins]
        step_losses = []
        for step in range(steps):
            ctx.step = step
            # State tensors become differentiable leaves so a plug-in may ask for their gradient (as `extras`).
            states = map_tensors(_needs_grad, states)
            params, extras = dict(fast), []
            for p, state in zip(self.plugins, states):
                params, ex = p.prepare(params, state, ctx)
                extras.append(ex)
            for n in self.adapted:
                params[n] = _needs_grad(params[n])
            out = checks.forward_checked(ctx.view, params, support_x, support_y, "support") if step == 0 \
                else self.forward_batched(params, support_x)
            support_loss = self.loss_of(out, support_y)
            inputs = [params[n] for n in self.adapted] + [v for ex in extras for v in ex.values()]
            # First order frees the support graph, except where an extra's gradient runs through nodes the
            # query still needs (e.g. CxGrad's context reaches θ through its rescaled weights).
            retain = create_graph or (keep_graph and len(inputs) > len(self.adapted))
            grads_all = torch.autograd.grad(support_loss.sum(), inputs, create_graph=create_graph,
                                            retain_graph=retain, allow_unused=True, materialize_grads=True)
            grads = dict(zip(self.adapted, grads_all))
            if step == 0:
                ctx.log("support_loss", support_loss.mean())
                ctx.log("inner_grad_norm", {n: g.flatten(1).norm(dim=1).mean() for n, g in grads.items()})
            rest = iter(grads_all[len(self.adapted):])
            extra_grads = [{k: next(rest) for k in ex} for ex in extras]
            for i, p in enumerate(self.plugins):
                res = p.transform(grads, params, states[i], ctx)
                grads, states[i] = res if isinstance(res, tuple) else (res, states[i])
            states = [p.update(s, eg, ctx) for p, s, eg in zip(self.plugins, states, extra_grads)]
            fast = dict(fast)
            for n in self.adapted:
                fast[n] = params[n] - self.inner_lr(n, step) * grads[n]
            if not keep_graph:
                fast = {n: v.detach() for n, v in fast.items()}
                states = map_tensors(lambda t: t.detach(), states)
            if query is not None:
                step_losses.append(self.loss_of(self.forward_batched(fast, query[0]), query[1]))
        return fast, step_losses, ctx.diagnostics

    # -- public API --------------------------------------------------------------------------------------------
    def set_iteration(self, iteration: int) -> None:
        """The meta-iteration about to run, for the plug-ins' schedules (:meth:`Plugin.set_iteration`, e.g. the
        multi-step loss weights). The training loop calls it before each meta-gradient; without it, no schedule
        runs. (MAML++'s derivative-order annealing is the training loop's: it passes ``first_order``.)"""
        for p in self.plugins:
            p.set_iteration(iteration)

    def meta_loss(self, batch: TaskBatch, first_order: bool | None = None) -> MetaLossOutput:
        """The differentiable meta-objective of a meta-batch (training mode), its graph held whole until the backward
        (:func:`~metagrad.chunks.meta_backward` takes the same gradient chunk by chunk). ``first_order`` overrides
        the order of this call (default: the learner's ``first_order``)."""
        first_order = self.first_order if first_order is None else bool(first_order)
        query = (batch.query_x, batch.query_y) if any(p.records_step_losses for p in self.plugins) else None
        fast, step_losses, diag = self._inner_loop(batch.support_x, batch.support_y, self.inner_steps,
                                                   create_graph=not first_order, keep_graph=True, query=query)
        return self._outer(batch, fast, diag, create_graph=not first_order, step_losses=step_losses)

    def _outer(self, batch: TaskBatch, fast: fn.Params, diag: dict, create_graph: bool,
               step_losses: list[torch.Tensor] | None = None, outer_terms: bool = True) -> MetaLossOutput:
        out = self.forward_batched(fast, batch.query_x, self.needs_features)
        out, feats = out if self.needs_features else (out, None)
        checks.check_targets(self.loss_kind, out, batch.query_y, "query")
        samples = self.loss_of(out, batch.query_y, per_sample=True)
        task_losses = samples.mean(dim=1)
        query_loss = task_losses.mean()
        loss = query_loss
        if outer_terms:
            octx = OuterContext(self.view(), batch, self.meta_params(), fast, out, feats, task_losses, create_graph,
                                diag, step_losses or None)
            for p in self.plugins:
                term = p.outer_term(octx)
                if term is not None:
                    loss = loss + term
        acc = task_accuracy(out, batch.query_y) if batch.is_classification else None
        return MetaLossOutput(loss, query_loss, None if acc is None else acc.mean(), task_losses, acc,
                              samples.detach(), diag)

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None, outer_terms: bool = False) -> MetaLossOutput:
        """Adapt and score without a second-order graph; returns the same fields as :meth:`meta_loss`, detached.

        ``inner_steps`` overrides ``eval_inner_steps`` (e.g. 0, 1 and 10 steps in the regression protocol).
        """
        steps = self.eval_inner_steps if inner_steps is None else int(inner_steps)
        with torch.enable_grad():
            fast, _, diag = self._inner_loop(batch.support_x, batch.support_y, steps, create_graph=False,
                                             keep_graph=False)
        with torch.no_grad():
            return self._outer(batch, fast, diag, create_graph=False, outer_terms=outer_terms).detached()

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, inner_steps: int | None = None,
              create_graph: bool | None = None) -> fn.Params:
        """Adapt to one task (no task dimension); returns the adapted parameters by name.

        ``create_graph`` None (default): in training mode (with autograd on) the adapted parameters keep their
        graph to θ, second order or, when ``first_order``, with the inner gradients as constants (θ' = θ − α·g
        still depends on θ); in eval mode no graph. ``create_graph=True``: second order; ``False``: no graph at
        all (detached from θ).
        """
        keep_graph = create_graph
        if create_graph is None:
            keep_graph = self.training and torch.is_grad_enabled()
            create_graph = keep_graph and not self.first_order
        steps = (self.inner_steps if self.training else self.eval_inner_steps) if inner_steps is None else inner_steps
        with torch.enable_grad():
            fast, _, _ = self._inner_loop(support_x.unsqueeze(0), support_y.unsqueeze(0), steps,
                                          create_graph=create_graph, keep_graph=keep_graph)
        return fn.task_slice(fast, 0)

    def predict(self, fast: fn.Params, query_x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``query_x`` with adapted parameters ``fast`` (from :meth:`adapt`)."""
        return fn.forward_single(self.model, fast, query_x)

    def forward(self, batch: TaskBatch, first_order: bool | None = None) -> MetaLossOutput:
        return self.meta_loss(batch, first_order)


def _needs_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is part of a graph (or not floating point), else a fresh leaf that requires grad."""
    return t if t.requires_grad or not t.is_floating_point() else t.detach().requires_grad_()
