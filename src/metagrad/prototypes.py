"""Prototype classifiers: a class is the mean of its support embeddings, scored by squared Euclidean distance.

Reference: Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. Shared by the
ProtoNet learner (:mod:`metagrad.learners.protonet`) and the plug-ins that read its prototypes.

Example:
    >>> c = prototypes(support_emb, support_y, ways)        # [T, ways, d]
    >>> logits = distance_logits(query_emb, c)               # [T, N_q, ways]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
