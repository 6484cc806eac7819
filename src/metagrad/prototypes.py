"""Prototype classifiers: a class is the mean of its support embeddings, scored by squared Euclidean distance;
and the linear head the prototypes make (Proto-MAML).

Reference: Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. Shared by the
ProtoNet learner (:mod:`metagrad.learners.protonet`), the plug-ins that read its prototypes, and MAML's prototype
head. Triantafillou et al., "Meta-Dataset", ICLR 2020 (Proto-MAML): the squared-distance classifier −‖f − μ_c‖²
is linear in f once the term −‖f‖², equal for every class, is dropped, so a linear head with row c = 2·μ_c and
bias c = −‖μ_c‖² scores the same softmax; MAML's inner loop then starts from it. Every task gets its own head from
its own support set, for any number of ways, and since the rows differ (unlike a head whose rows are all equal)
the body gets a gradient at the first step.

Example:
    >>> c = prototypes(support_emb, support_y, ways)        # [T, ways, d]
    >>> logits = distance_logits(query_emb, c)               # [T, N_q, ways]
    >>> weight, bias = prototype_head(c)                     # [T, ways, d], [T, ways]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .seams import InnerContext


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """``[T, ways, d]``: the mean feature of each class's support samples (zero for a class with none).

    Args:
        features: ``[T, N, d]`` support features.
        labels: ``[T, N]`` class ids in ``0..ways-1``.
        ways: number of classes (rows).
    """
    onehot = F.one_hot(labels, ways).to(features.dtype)            # [T, N, ways]
    sums = onehot.transpose(1, 2) @ features                        # [T, ways, d]
    return sums / onehot.sum(1).clamp_min(1).unsqueeze(-1)


def distance_logits(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``[T, N, ways]`` logits −‖x_n − c_k‖² of embeddings ``[T, N, d]`` against prototypes ``[T, ways, d]``."""
    return -(x.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


def prototype_head(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head of prototypes ``mu`` ``[T, ways, d]``: weight ``2·μ`` and bias ``−‖μ‖²``, so its logits
    ``2 μ_c·f − ‖μ_c‖²`` equal ``−‖f − μ_c‖²`` up to ``‖f‖²``, the same for every class."""
    return 2 * mu, -(mu * mu).sum(-1)


class PrototypeHead:
    """A learner's task head that starts every task from its support prototypes (``MAML(head="prototype")``).

    The head is the model's last ``nn.Linear`` (with a bias); its input must be what ``forward(x,
    return_features=True)`` returns as features. Called with the task-batched parameters before the inner loop,
    it returns them with the head's rows replaced, computed from the support features at θ (in meta-training
    the prototypes stay in the graph, so θ's body is trained through them, as in Proto-MAML).
    """

    def __init__(self, model: nn.Module, loss: str) -> None:
        if loss != "cross_entropy":
            raise ValueError("head='prototype' is a classifier's head: it needs loss='cross_entropy'")
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears or linears[-1][1].bias is None:
            raise ValueError(f"head='prototype' needs a last nn.Linear with a bias as the head; "
                             f"{type(model).__name__} has {'none' if not linears else 'one without a bias'}")
        prefix = f"{linears[-1][0]}." if linears[-1][0] else ""
        self.weight, self.bias = f"{prefix}weight", f"{prefix}bias"

    def __call__(self, ctx: InnerContext, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, feats = ctx.forward(params, return_features=True)
        w = params[self.weight]                                        # [T, ways, d]
        if feats.shape[-1] != w.shape[-1]:
            raise ValueError(f"head='prototype': the model's features have {feats.shape[-1]} dimensions but its "
                             f"head {self.weight!r} takes {w.shape[-1]}: return_features must return the head's input")
        weight, bias = prototype_head(prototypes(feats, ctx.support_y, w.shape[1]))
        return {**params, self.weight: weight.to(w.dtype), self.bias: bias.to(w.dtype)}


__all__ = ["PrototypeHead", "distance_logits", "prototype_head", "prototypes"]
