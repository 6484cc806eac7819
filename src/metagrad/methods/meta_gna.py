"""Meta-GNA: meta-learning with gradient norm arbitration (an inner-rule plug-in, Seam 1).

Reference: Lim, Cha, Kong, Shyn, Kim, "Meta-learning with gradient norm arbitration for sample-aware few-shot
learning", Knowledge-Based Systems, 2025 (doi 10.1016/j.knosys.2025.114443). Specification: ``meta_gna.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..functional import Params
from ..seams import InnerContext, LayerFigure, LearnerView, Plugin, Series
from . import register

FEATURES = ("wn_gn", "wn_gn_ema")
NORMS = ("code", "detached", "exact")   # which gradient norms stay in the graph, see the class docstring
EMA_RATE = 0.1      # ema ← 0.1·x + 0.9·ema
TINY = 1e-12        # floor of every norm we divide by (and of the standardisation's std)


@register("meta_gna")
class MetaGNA(Plugin):
    """Normalise each adapted tensor's inner gradient and let a learned Arbiter choose its step length.

    Every inner step, for the adapted tensors W_1..W_L (task-batched, all quantities per task)::

        w_l = ||W_l||_F (not detached)      n_l = ||g_l||_F (detached)      v = [w, n] ∈ R^{2L}
        z   = (v - mean(v)) / (std(v) + 1e-12)          (per task, over its 2L entries, unbiased std)
        a   = softplus(Lin2(relu(Lin1(z))))             (the Arbiter: 2L → 2L → L, PyTorch default init)
        W_l ← W_l - α · a_l · g_l / max(||g_l||_F, 1e-12)   so the step on W_l has norm exactly α·a_l.

    The plug-in is a ``transform``: it returns ``a_l·g_l/max(n_l, 1e-12)`` and the core multiplies by α.

    Readings taken where the spec leaves room:

    - ``w_l`` reads the parameters the gradient was taken at (the ``params`` handed to ``transform``).
    - With CxGrad (either order: the two override different hooks) the gradient is taken at CxGrad's rescaled
      weights Ŵ and the step starts there, so w_l = ||Ŵ_l|| = γ_l for a conv weight. Normalising erases
      CxGrad's 1/γ_l gradient scale; γ still acts through the Arbiter's input and the relative step
      α·a_l/γ_l (plain CxGrad: ∝ α/γ_l²). Supported with this rule; tested against a hand-written loop.
    - Which gradient norms the meta-gradient sees through, ``norms``:

      * ``"code"`` (default): the Arbiter reads detached norms n_l; the step divides by the norm of the gradient
        it uses, kept in the graph (in second order). This is the authors' code (SKKUJMLim/MAML,
        ``inner_loop_optimizers_GR.py``: ``alpha * g / torch.norm(g)`` on the ``create_graph`` gradients, the
        Arbiter fed detached norms), so it is the default: a reproduction should differentiate what they did.
      * ``"detached"``: every gradient norm detached, also the divisor (metagrad's reading before it followed
        the code): the meta-gradient sees d(g/n) = dg/n, a surrogate that differs from ``"code"`` by 8-27%
        relative on small float64 batches.
      * ``"exact"``: every gradient norm in the graph, the Arbiter's input too: the exact derivative of the
        step map (the finite-difference test checks it).

      In ``per_sample`` the per-sample and final norms divide, so they follow the divisor's rule. w_l is never
      detached. Under first order g is a constant anyway; the Arbiter and w_l keep their graph in both orders
      (they are not inner gradients), which is also what gives the Arbiter a gradient under first order.
    - ``"wn_gn_ema"``: the EMA (per task and tensor, of both norms, ema ← 0.1·x + 0.9·ema) starts at the first
      observation, so step 0 sees ema = x rather than a 0.1·x artefact of a zero start. Arbiter inputs
      ``[w, n, ema_w, ema_n]`` (4L, standardised together), Lin1: 4L → 4L, Lin2: 4L → L.
    - ``per_step``: one Arbiter per training inner step (``inner_steps``); evaluation with more steps (e.g.
      Finn's 1 training / 3 test steps) reuses the last trained Arbiter past them, never an untrained one (as
      MAML++ does with its per-step rates).
    - ``per_sample`` (OUR extension, not in the paper or the authors' code): the direction is
      ``mean_i g_{l,i}/||g_{l,i}||`` over the support samples, rescaled to unit norm (so the step norm is
      still α·a_l); n_l stays the norm of the ordinary (mean) gradient. Per-sample gradients come from N_s
      autograd calls on ``ctx.support_losses(params, per_sample=True)``, not ``torch.func.vmap``: with
      batch-statistics BatchNorm a sample's loss depends on the whole support set, and these gradients
      average exactly to the ordinary one. Cost: one extra forward and N_s backward passes per step, N_s
      gradient copies, and (second order) an N_s-times larger graph. Put it first among gradient transforms:
      it recomputes directions from the loss, ignoring earlier transforms (n_l still reads them).
    - With learned per-element inner rates (Meta-SGD) the step norm is no longer α·a_l: α scales entries.

    Neutral setting: ``normalize=False, constant_arbiter=True`` is plain SGD, i.e. plain MAML.

    Args:
        features: "wn_gn" (weight and gradient norms) | "wn_gn_ema" (plus their EMAs over the inner steps).
        per_step: one Arbiter per inner step instead of one shared.
        per_sample: normalised per-sample gradient directions (our extension, see above).
        normalize: divide each gradient by its norm (False: the Arbiter scales the raw gradient).
        constant_arbiter: replace the Arbiter by the constant 1 (ablation and the neutral test); the
            Arbiter is still built, so state dicts keep one shape, but gets no gradient.
        norms: "code" (default: the Arbiter's input detached, the divisor in the graph, as the authors' code) |
            "detached" (every gradient norm detached) | "exact" (none detached).

    Example:
        >>> from metagrad import MAML, models
        >>> from metagrad.methods import MetaGNA
        >>> learner = MAML(models.Conv4(3, ways=5, width=32, bias=True, image_size=84), inner_lr=0.01,
        ...                inner_steps=5, adapt="no_norm", plugins=[MetaGNA()])
        >>> out = learner.meta_loss(batch); out.loss.backward()   # θ and the Arbiter get gradients
        >>> out.diagnostics["meta_gna.factor.step0"]               # a_l per tensor, mean over tasks
    """

    figures = (LayerFigure(file="meta-gna", caption="Meta-GNA Arbiter step lengths",
                           title="Meta-GNA Arbiter step length a_l at inner step 0",
                           series=Series("meta_gna.factor.step0", "a_l (step norm = α·a_l)")),)
    learners = ("maml",)
    refusal = "it normalises and rescales inner-loop gradients, and ProtoNet has no inner loop"

    def __init__(self, features: str = "wn_gn", per_step: bool = False, per_sample: bool = False,
                 normalize: bool = True, constant_arbiter: bool = False, norms: str = "code") -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"MetaGNA: unknown features {features!r}: use one of {', '.join(FEATURES)}")
        if norms not in NORMS:
            raise ValueError(f"MetaGNA: unknown norms {norms!r}: use one of {', '.join(NORMS)}")
        self.features, self.per_step, self.per_sample = features, bool(per_step), bool(per_sample)
        self.normalize, self.norms = bool(normalize), norms
        self.constant_arbiter = bool(constant_arbiter)
        self.arbiters = nn.ModuleList()      # built by attach(), sized to the adapted tensors

    def attach(self, view: LearnerView) -> None:
        L = len(view.adapted)
        if L == 0:
            raise ValueError("MetaGNA: the learner adapts no tensor, so there is nothing to arbitrate")
        ref = next(view.model.parameters())
        width = (2 if self.features == "wn_gn" else 4) * L
        count = max(view.inner_steps, 1) if self.per_step else 1
        self.arbiters = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, dtype=ref.dtype, device=ref.device), nn.ReLU(),
                          nn.Linear(width, L, dtype=ref.dtype, device=ref.device), nn.Softplus())
            for _ in range(count))

    def arbiter(self, step: int) -> nn.Module:
        """The Arbiter of inner step ``step`` (the shared one unless ``per_step``)."""
        return self.arbiters[min(step, len(self.arbiters) - 1)]

    def init_task(self, ctx: InnerContext) -> Any:
        # EMA state starts empty (None) and takes the first observation at step 0.
        return {"ema": None} if self.features == "wn_gn_ema" else None

    def transform(self, grads: Params, params: Params, state: Any, ctx: InnerContext) -> tuple[Params, Any]:
        names = ctx.adapted
        w = torch.stack([params[m].flatten(1).norm(dim=1) for m in names], dim=1)          # [T, L], graph kept
        n = torch.stack([self._norm(grads[m], self.norms == "exact") for m in names], dim=1)  # [T, L]
        feats = [w, n]
        if self.features == "wn_gn_ema":
            x = torch.cat([w, n], dim=1)
            ema = x if state["ema"] is None else EMA_RATE * x + (1 - EMA_RATE) * state["ema"]
            state = {"ema": ema}
            feats.append(ema)
        if self.constant_arbiter:
            a = torch.ones_like(w)
        else:
            v = torch.cat(feats, dim=1)
            z = (v - v.mean(dim=1, keepdim=True)) / (v.std(dim=1, keepdim=True) + TINY)
            a = self.arbiter(ctx.step)(z)                                                    # [T, L]
        directions = self._per_sample_directions(params, ctx) if self.per_sample else [grads[m] for m in names]
        out = dict(grads)
        for i, name in enumerate(names):
            d = directions[i]
            if self.normalize:
                d = d / _expand(self._norm(d, self.norms != "detached"), d).clamp_min(TINY)
            out[name] = _expand(a[:, i], d) * d
        ctx.log(f"meta_gna.factor.step{ctx.step}", {m: a[:, i].mean() for i, m in enumerate(names)})
        ctx.log(f"meta_gna.grad_norm.step{ctx.step}", {m: n[:, i].mean() for i, m in enumerate(names)})
        return out, state

    def _per_sample_directions(self, params: Params, ctx: InnerContext) -> list[torch.Tensor]:
        """``mean_i g_{l,i}/||g_{l,i}||`` per task and tensor (OUR extension), one autograd call per sample."""
        inputs = [params[n] for n in ctx.adapted]
        losses = ctx.support_losses(params, per_sample=True)                                # [T, N_s]
        N = losses.shape[1]
        total = [torch.zeros_like(p) for p in inputs]
        for i in range(N):
            # Summing over tasks is exact: each task's loss depends only on its own slice of params.
            gs = torch.autograd.grad(losses[:, i].sum(), inputs, create_graph=ctx.create_graph,
                                     retain_graph=True)
            total = [acc + g / _expand(self._norm(g, self.norms != "detached"), g).clamp_min(TINY)
                     for acc, g in zip(total, gs)]
        return [acc / N for acc in total]

    @staticmethod
    def _norm(grad: torch.Tensor, in_graph: bool) -> torch.Tensor:
        """Per-task Frobenius norm ``[T]`` of a gradient, kept in the graph or detached."""
        norm = grad.flatten(1).norm(dim=1)
        return norm if in_graph else norm.detach()


def _expand(per_task: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[T]`` → ``[T, 1, ..., 1]`` broadcastable against ``like``."""
    return per_task.view(-1, *([1] * (like.dim() - 1)))


__all__ = ["MetaGNA"]
