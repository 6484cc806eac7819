"""Inner learning rates: fixed α, learned per tensor and step (MAML++ LSLR), or per element (Meta-SGD).

References: Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019 (LSLR);
Li, Zhou, Chen, Li, "Meta-SGD: Learning to learn quickly for few-shot learning", arXiv 1707.09835.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import INNER_LR_MODES as MODES


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


class InnerLR(nn.Module):
    """The step size α of every adapted tensor at every inner step.

    Args:
        names: the adapted tensors.
        shapes: their shapes (used by "per_element").
        inner_lr: α, and the initial value of learned rates.
        mode: "fixed" (α, not learned) | "per_step" (one learned scalar per tensor per step, LSLR) |
            "per_element" (one learned rate per entry, shared over steps, Meta-SGD).
        steps: number of distinct steps that get their own rate ("per_step"): the training inner steps, so
            that every rate is trained; later steps (evaluation with more steps) reuse the last one, as MAML++
            does.

    Example:
        >>> lr = InnerLR(["w"], [(3,)], inner_lr=0.1, mode="per_step", steps=5)
        >>> lr("w", 2)                                    # tensor(0.1000, grad_fn=...)
    """

    def __init__(self, names: list[str], shapes: list[torch.Size], inner_lr: float, mode: str = "fixed",
                 steps: int = 1) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown inner-rate mode {mode!r}: use one of {', '.join(MODES)}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.mode, self.inner_lr, self.steps = mode, float(inner_lr), max(1, int(steps))
        self.rates = nn.ParameterDict()
        if mode == "per_step":
            for n in names:
                self.rates[_key(n)] = nn.Parameter(torch.full((self.steps,), self.inner_lr))
        elif mode == "per_element":
            for n, s in zip(names, shapes):
                self.rates[_key(n)] = nn.Parameter(torch.full(tuple(s), self.inner_lr))

    def forward(self, name: str, step: int) -> torch.Tensor | float:
        """α for tensor ``name`` at inner step ``step`` (broadcastable against ``[T, *shape]``)."""
        if self.mode == "fixed":
            return self.inner_lr
        rate = self.rates[_key(name)]
        if self.mode == "per_step":
            return rate[min(step, self.steps - 1)]
        return rate
