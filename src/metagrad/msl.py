"""MAML++ multi-step loss (MSL): an outer term over the query loss after every inner step.

Reference: Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019 (multi-step loss optimisation).
"""

from __future__ import annotations

import torch

from .seams import OuterContext, Plugin


class MultiStepLoss(Plugin):
    """The meta-loss Σ_s w_s·L_Q(θ_s) over the inner steps s, its weights annealed from uniform to the last step.

    An outer term: it adds Σ_{s<S} w_s·L_s + (w_S − 1)·L_S to the learner's last-step query loss L_S, so the
    meta-loss is the weighted sum. The core records each step's query loss while :attr:`records_step_losses`
    says so. The weights depend on the meta-iteration, which the training loop passes with
    :meth:`set_iteration` (through ``MAML.set_iteration``); before the first call, and from ``msl_iterations``
    on, the term is off and the learner is plain MAML.

    Args:
        msl_iterations: meta-iterations over which the weights anneal to the last step (>= 1).

    Example:
        >>> learner = MAML(model, inner_steps=5, multi_step_loss=True, msl_iterations=10000)  # adds this term
        >>> learner.set_iteration(it); out = learner.meta_loss(batch)
        >>> MultiStepLoss(100).weights(4)                    # None until set_iteration
    """

    name = "msl"

    def __init__(self, msl_iterations: int) -> None:
        super().__init__()
        if msl_iterations < 1:
            raise ValueError(f"multi_step_loss=True needs msl_iterations >= 1 (the meta-iterations over which the "
                             f"weights anneal to the last step), got {msl_iterations}: or set multi_step_loss=False")
        self.msl_iterations = int(msl_iterations)
        self.iteration: int | None = None

    def set_iteration(self, iteration: int) -> None:
        self.iteration = int(iteration)

    @property
    def records_step_losses(self) -> bool:
        return self.iteration is not None and self.iteration < self.msl_iterations

    def weights(self, steps: int) -> torch.Tensor | None:
        """The weights of the ``steps`` step losses, annealed from uniform to the last step; None when off."""
        if not self.records_step_losses or steps < 2:
            return None
        progress = self.iteration / self.msl_iterations
        low = 0.03 / steps
        # float64, cast to the loss's dtype where used: a float64 model gets its weights unrounded.
        w = torch.full((steps,), (1.0 / steps) * (1 - progress) + low * progress, dtype=torch.float64)
        w[-1] = 1.0 - w[:-1].sum()
        return w

    def outer_term(self, ctx: OuterContext) -> torch.Tensor | None:
        losses = ctx.step_query_losses
        w = None if not losses else self.weights(len(losses))
        if w is None:
            return None
        w = w.to(losses[-1])
        last = ctx.query_losses.mean()
        return sum(wi * sl.mean() for wi, sl in zip(w[:-1], losses[:-1])) + (w[-1] - 1) * last
