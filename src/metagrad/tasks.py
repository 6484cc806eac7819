"""Tasks: the unit every benchmark yields and every learner consumes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of T few-shot tasks, each with a support and a query set.

    Shapes: ``support_x [T, N_s, *x_shape]``, ``support_y [T, N_s]`` (int64 class ids ``0..ways-1``) or
    ``[T, N_s, out_dim]`` (float, regression); the same for ``query_x`` / ``query_y`` with ``N_q``.
    ``task_ids`` optionally names each task (for logs when a task misbehaves).

    Example:
        >>> import torch
        >>> from metagrad import TaskBatch
        >>> b = TaskBatch(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1))
        >>> len(b), b.is_classification
        (4, False)
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    task_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        for name, t in (("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"TaskBatch.{name} must have shape [T, N, ...], got {tuple(t.shape)}")
        T = sx.shape[0]
        if not (sy.shape[0] == qx.shape[0] == qy.shape[0] == T):
            raise ValueError(
                "TaskBatch: all four tensors need the same task dimension T, got "
                f"{sx.shape[0]}, {sy.shape[0]}, {qx.shape[0]}, {qy.shape[0]}"
            )
        if sx.shape[1] != sy.shape[1] or qx.shape[1] != qy.shape[1]:
            raise ValueError(
                f"TaskBatch: inputs and targets disagree on the number of samples: support {sx.shape[1]} vs "
                f"{sy.shape[1]}, query {qx.shape[1]} vs {qy.shape[1]}"
            )
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(
                f"TaskBatch: support and query inputs differ in shape: {tuple(sx.shape[2:])} vs {tuple(qx.shape[2:])}"
            )
        if sy.dtype != qy.dtype or sy.shape[2:] != qy.shape[2:]:
            raise ValueError("TaskBatch: support_y and query_y must have the same dtype and trailing shape")
        if self.task_ids is not None and len(self.task_ids) != T:
            raise ValueError(f"TaskBatch: {len(self.task_ids)} task_ids for {T} tasks")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        """True when targets are integer class ids."""
        return not self.support_y.is_floating_point()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """A moved copy; ``dtype`` converts inputs and float targets only (class ids stay int64)."""

        def mv(t: torch.Tensor, is_target: bool) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(mv(self.support_x, False), mv(self.support_y, True), mv(self.query_x, False),
                         mv(self.query_y, True), self.task_ids)

    def select(self, index: slice | list[int] | torch.Tensor) -> TaskBatch:
        """The tasks at ``index`` (a slice or a list of task positions), as a new TaskBatch."""
        if isinstance(index, slice):
            ids = None if self.task_ids is None else tuple(self.task_ids[index])
            return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index],
                             self.query_y[index], ids)
        idx = torch.as_tensor(index, dtype=torch.long)
        ids = None if self.task_ids is None else tuple(self.task_ids[int(i)] for i in idx)
        return TaskBatch(self.support_x[idx], self.support_y[idx], self.query_x[idx], self.query_y[idx], ids)


def task_groups(T: int, group_size: int) -> list[range]:
    """Consecutive groups of ``group_size`` tasks; the last one is smaller when T is not a multiple.

    A last group of a single task has no partner to relate to, so it joins the previous group (which then
    holds ``group_size + 1`` tasks). ``T <= group_size`` gives one group: the whole meta-batch. Plug-ins that
    relate tasks (``Plugin.task_group_size``) relate them within these groups, and ranks take whole ones.

    Example:
        >>> [list(g) for g in task_groups(5, 2)]
        [[0, 1], [2, 3, 4]]
    """
    bounds = list(range(0, T, group_size)) + [T]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]
