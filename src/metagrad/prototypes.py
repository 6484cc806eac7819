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


def prototypes(support: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """``[T, ways, d]`` class means of the support embeddings ``[T, N_s, d]`` with labels ``[T, N_s]``."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)                   # [T, N_s, ways]
    counts = onehot.sum(dim=1)                                               # [T, ways]
    if bool((counts == 0).any()):
        raise ValueError(f"ProtoNet: a task's support set lacks a class of 0..{ways - 1}: every class needs a "
                         "support example to have a prototype")
    return onehot.transpose(1, 2) @ support / counts.unsqueeze(-1)


def distance_logits(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``[T, N, ways]`` logits −‖x_n − c_k‖² of embeddings ``[T, N, d]`` against prototypes ``[T, ways, d]``."""
    return -(x.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)
