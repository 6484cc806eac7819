"""Per-task losses for task-batched outputs: every function returns ``[T]`` (or ``[T, N]`` per sample)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "mse")


def per_sample_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of every sample, ``[T, N]``: cross-entropy of ``[T, N, C]`` logits, or MSE averaged over outputs."""
    T, N = output.shape[:2]
    if kind == "cross_entropy":
        return F.cross_entropy(output.reshape(T * N, -1), target.reshape(T * N), reduction="none").view(T, N)
    if kind == "mse":
        return (output - target).pow(2).reshape(T, N, -1).mean(dim=2)
    raise ValueError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")


def task_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss per task, ``[T]``: cross-entropy (mean over samples) or MSE (mean over samples and outputs)."""
    return per_sample_loss(kind, output, target).mean(dim=1)


def task_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Classification accuracy per task, ``[T]``."""
    return (output.argmax(dim=-1) == target).to(output.dtype).mean(dim=1)
