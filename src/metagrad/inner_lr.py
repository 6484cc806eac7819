"""Inner learning rates: fixed α, learned per tensor and step (MAML++ LSLR), or per element (Meta-SGD).

Every rule is an :class:`InnerLR`, so the core asks ``inner_lr(name, step)`` for α at every step and never
branches on which rule it holds.

References: Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019 (LSLR);
Li, Zhou, Chen, Li, "Meta-SGD: Learning to learn quickly for few-shot learning", arXiv 1707.09835.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import INNER_LR_MODES as MODES


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


class InnerLR(nn.Module):
    """The step size α of every adapted tensor at every inner step; subclasses say how it is stored.

    ``rates`` holds the learned rates by tensor (empty for a fixed α), so checkpoints keep the keys
    ``inner_lr.rates.<tensor>`` whatever the rule.
    """

    mode: str = ""

    def __init__(self, inner_lr: float) -> None:
        super().__init__()
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.inner_lr = float(inner_lr)
        self.rates = nn.ParameterDict()

    def forward(self, name: str, step: int) -> torch.Tensor | float:
        """α for tensor ``name`` at inner step ``step`` (broadcastable against ``[T, *shape]``)."""
        raise NotImplementedError


class FixedLR(InnerLR):
    """Plain MAML: one α for every tensor and step, not learned (Finn et al. 2017).

    Example:
        >>> FixedLR(0.4)("w", 3)                          # 0.4
    """

    mode = "fixed"

    def forward(self, name: str, step: int) -> float:
        return self.inner_lr


class PerStepLR(InnerLR):
    """MAML++ LSLR: one learned scalar per tensor and inner step, initialised to α.

    ``steps`` rates per tensor: the training inner steps, so that every rate is trained; later steps
    (evaluation with more steps) reuse the last one, as MAML++ does.

    Example:
        >>> lr = PerStepLR(["w"], inner_lr=0.1, steps=5)
        >>> lr("w", 2)                                    # tensor(0.1000, grad_fn=...)
    """

    mode = "per_step"

    def __init__(self, names: Sequence[str], inner_lr: float, steps: int = 1) -> None:
        super().__init__(inner_lr)
        self.steps = max(1, int(steps))
        for n in names:
            self.rates[_key(n)] = nn.Parameter(torch.full((self.steps,), self.inner_lr))

    def forward(self, name: str, step: int) -> torch.Tensor:
        return self.rates[_key(name)][min(step, self.steps - 1)]


class PerElementLR(InnerLR):
    """Meta-SGD: one learned rate per entry of every adapted tensor, shared over steps, initialised to α.

    Example:
        >>> lr = PerElementLR(["w"], [(3,)], inner_lr=0.1)
        >>> lr("w", 0).shape                              # torch.Size([3])
    """

    mode = "per_element"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], inner_lr: float) -> None:
        super().__init__(inner_lr)
        for n, s in zip(names, shapes):
            self.rates[_key(n)] = nn.Parameter(torch.full(tuple(s), self.inner_lr))

    def forward(self, name: str, step: int) -> torch.Tensor:
        return self.rates[_key(name)]


def create(mode: str, names: Sequence[str], shapes: Sequence[Sequence[int]], inner_lr: float,
           steps: int = 1) -> InnerLR:
    """The rule of ``mode`` ("fixed" | "per_step" | "per_element") for the adapted tensors ``names``.

    Example:
        >>> lr = create("per_step", ["w"], [(3,)], inner_lr=0.1, steps=5)
    """
    if mode not in MODES:
        raise ValueError(f"unknown inner-rate mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "per_step":
        return PerStepLR(names, inner_lr, steps)
    if mode == "per_element":
        return PerElementLR(names, shapes, inner_lr)
    return FixedLR(inner_lr)
