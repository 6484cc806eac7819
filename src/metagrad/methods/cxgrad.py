"""CxGrad: contextual gradient scaling (an inner-rule plug-in, Seam 1).

Reference: Lee, Lee, Song, "Contextual Gradient Scaling for Few-Shot Learning", WACV 2022, arXiv 2110.10353.
Specification: ``cxgrad.md`` (follows the official code, a MAML++ fork).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import Params, expand_tasks
from ..seams import InnerContext, LayerFigure, LearnerView, Plugin, Series
from . import register


@register("cxgrad")
class CxGrad(Plugin):
    """Rescale every adapted conv weight to a task-conditioned norm γ_l before each inner step.

    A conv weight followed by batch-statistics BatchNorm and no bias leaves the loss (nearly: up to BN's eps)
    invariant to its scale, so the gradient at ``Ŵ_l = γ_l·W_l/||W_l||`` is ∝ 1/γ_l: γ sets the backbone's
    effective inner step per layer and per task. Per task (task-batched here)::

        c ← 0 ∈ R^{d_c};  (A) c ← c - η_c ∂L_S(Ŵ(c))/∂c   with no graph (a constant w.r.t. θ and G)
        each step t:  γ = G(c);  Ŵ_l = γ_l W_l/||W_l||_F;  L_t = L_S(Ŵ, others)
                      c ← c - η_c ∂L_t/∂c;   W_l ← Ŵ_l - α ∂L_t/∂Ŵ_l;   other ← other - α ∂L_t/∂other

    G is Linear(d_c, d_c) → ReLU → Linear(d_c, C) → Softplus (default init), C the number of adapted conv
    weights, built at ``attach``. Hooks: ``init_task`` resets c and takes step (A); ``prepare`` returns Ŵ and
    ``{"context": c}`` as extras; ``update`` steps c with the gradient the core hands back. The core then steps
    from the prepared Ŵ and runs the query with the final W, not rescaled. Evaluation is the same procedure
    without a graph (the core's doing). Run it second order: under first order the γ path nearly cancels.

    Readings taken where the spec leaves room:

    - Step (A) evaluates the loss at θ (the inner loop's start) rescaled by CxGrad alone: other plug-ins'
      ``prepare`` does not run inside ``init_task``.
    - The conv weights are found as the 4-D ``weight`` of every ``nn.Conv2d``; ``attach`` refuses a model
      without one, with a conv bias (it breaks the scale invariance the method rests on), without any
      BatchNorm, or when no conv weight is adapted (e.g. ``adapt="head"``). Conv weights that are not adapted
      are left alone (rescaling them would change the support loss but not the query).
    - With Meta-GNA (either order: the two override different hooks, so the order does not matter) GNA
      normalises the gradient taken at Ŵ, which erases the 1/γ_l factor of the gradient itself; γ still acts
      through the Arbiter's input (w_l = ||Ŵ_l|| = γ_l) and through the relative step α·a_l/γ_l of each conv
      weight (plain CxGrad: ∝ α/γ_l²). The pair is supported with that rule.
    - By the same scale invariance ∂L_t/∂c reaches c only through BN's eps, so the context moves little
      (Conv4 at init: γ(c) differs from γ(0) by ~1e-5 relative): G acts mostly as a learned per-layer γ.
      This follows the spec; it is not a numerical problem.
    - First order (``first_order=True``): the inner gradients (w.r.t. Ŵ, the other tensors and c) are
      constants, but the step still starts from Ŵ, so θ and G keep their path through Ŵ = γ(c)·W/||W||; the
      core retains the support graph for that when a plug-in asks for the gradient of ``extras``. Tested
      against the hand-written loop in first order and with a gradient for every parameter.
    - ``scales(context, params)`` is the one place γ is computed: the tests override it to return ||W_l||,
      which makes Ŵ = W and the learner plain MAML (the spec's neutral check).

    Args:
        context_dim: d_c, the size of the per-task context vector.
        context_lr: η_c, the context's inner step size.

    Example:
        >>> from metagrad import MAML, models
        >>> from metagrad.methods import CxGrad
        >>> learner = MAML(models.Conv4(3, ways=5, width=48, image_size=84), inner_lr=0.01, inner_steps=5,
        ...                adapt="no_norm", plugins=[CxGrad()])
        >>> out = learner.meta_loss(batch); out.loss.backward()   # θ and G get gradients
        >>> out.diagnostics["cxgrad.gamma.step0"]                  # γ_l per conv weight, mean over tasks
    """

    figures = (LayerFigure(file="cxgrad", caption="CxGrad γ", title="CxGrad γ_l at inner step 0",
                           series=Series("cxgrad.gamma.step0", "γ_l (conv weight norm)")),)
    learners = ("maml",)
    refusal = "it rescales the conv weights an inner step takes its gradient at, and ProtoNet has no inner loop"

    def __init__(self, context_dim: int = 100, context_lr: float = 1.0) -> None:
        super().__init__()
        if context_dim < 1 or context_lr < 0:
            raise ValueError(f"CxGrad: need context_dim >= 1 and context_lr >= 0, got {context_dim}, {context_lr}")
        self.context_dim, self.context_lr = int(context_dim), float(context_lr)
        self.conv_names: tuple[str, ...] = ()
        self.generator: nn.Module | None = None      # built by attach(), sized to the model's conv weights

    def attach(self, view: LearnerView) -> None:
        model = view.model
        convs = [(m, mod) for m, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
        what = type(model).__name__
        if not convs:
            raise ValueError(f"CxGrad needs nn.Conv2d weights followed by BatchNorm; {what} has no Conv2d")
        biased = [m for m, mod in convs if mod.bias is not None]
        if biased:
            raise ValueError(f"CxGrad needs bias-free convs (the loss is scale-invariant in a conv weight only "
                             f"when BatchNorm follows it without a bias); {what}.{biased[0]} has a bias: "
                             "build the model with bias=False")
        if not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
            raise ValueError(f"CxGrad needs BatchNorm after every conv (its scale invariance); {what} has none")
        weights = {f"{m}.weight" if m else "weight" for m, _ in convs}
        self.conv_names = tuple(n for n in view.adapted if n in weights)
        if not self.conv_names:
            raise ValueError(f"CxGrad rescales adapted conv weights, but adapt={view.adapt_mode!r} adapts none "
                             "of them: use adapt='all' or 'no_norm'")
        ref, d = next(model.parameters()), self.context_dim
        self.generator = nn.Sequential(nn.Linear(d, d, dtype=ref.dtype, device=ref.device), nn.ReLU(),
                                       nn.Linear(d, len(self.conv_names), dtype=ref.dtype, device=ref.device),
                                       nn.Softplus())

    def scales(self, context: torch.Tensor, params: Params) -> torch.Tensor:
        """γ = G(c), ``[T, C]``: the target norm of every adapted conv weight, per task."""
        if self.generator is None:
            raise RuntimeError("CxGrad is not attached: pass it to MAML(..., plugins=[...]) first")
        return self.generator(context)

    def rescale(self, params: Params, context: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """Ŵ_l = γ_l·W_l/||W_l||_F for every adapted conv weight (per task); returns (params, γ)."""
        gamma = self.scales(context, params)
        out = dict(params)
        for i, name in enumerate(self.conv_names):
            w = params[name]
            factor = gamma[:, i] / w.flatten(1).norm(dim=1)
            out[name] = factor.view(-1, *([1] * (w.dim() - 1))) * w
        return out, gamma

    def init_task(self, ctx: InnerContext) -> torch.Tensor:
        theta = {n: p.detach() for n, p in ctx.view.meta_params().items()}
        ref = theta[self.conv_names[0]]
        c = torch.zeros(ctx.num_tasks, self.context_dim, dtype=ref.dtype, device=ref.device, requires_grad=True)
        # Step (A): one context step before the inner loop, as a constant (no graph to θ or G).
        with torch.enable_grad():
            params, _ = self.rescale(expand_tasks(theta, ctx.num_tasks), c)
            (grad,) = torch.autograd.grad(ctx.support_losses(params).sum(), [c])
        return (c - self.context_lr * grad).detach()

    def prepare(self, params: Params, state: torch.Tensor, ctx: InnerContext) -> tuple[Params, dict]:
        params, gamma = self.rescale(params, state)
        ctx.log(f"cxgrad.gamma.step{ctx.step}", {n: gamma[:, i].mean() for i, n in enumerate(self.conv_names)})
        return params, {"context": state}

    def update(self, state: torch.Tensor, extra_grads: dict[str, torch.Tensor], ctx: InnerContext) -> torch.Tensor:
        return state - self.context_lr * extra_grads["context"]


__all__ = ["CxGrad"]
