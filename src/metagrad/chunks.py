"""Bounded memory for every method: the meta-gradient taken chunk by chunk of tasks.

``learner.meta_loss(batch).loss.backward()`` holds the whole meta-batch's graph until the backward: on Omniglot
5-way 1-shot with 15 queries and 32 tasks, about 21 times what a per-task loop holds. :func:`meta_backward`
gives the same gradients while holding one chunk's graph at a time, for MAML alone and for any combination of
plug-ins, so every learner's loop (:mod:`metagrad.learners`) stays the definition and memory is bounded here, outside it.

Why chunking is exact. The meta-objective is a mean over tasks: the query loss, MAML++'s multi-step losses and
every plug-in's outer term are means of per-task terms (the property :mod:`metagrad.distributed` shards a
meta-batch across ranks by). For a meta-batch of T tasks cut into chunks c of n_c tasks,
``(1/T) Σ_t ℓ_t = Σ_c (n_c/T) · mean_{t∈c} ℓ_t``, so ``(n_c/T) · meta_loss(chunk).loss``, backwarded chunk
after chunk, adds up in ``.grad`` to the gradient of the whole batch's loss, up to floating-point summation
order.

The group rule. A plug-in that relates tasks to each other (``Plugin.task_group_size`` > 1, e.g. TRLearner's
groups of 4) relates them within :func:`~metagrad.tasks.task_groups`; chunks hold whole groups, so every
per-task term sees the partners it has in the whole batch. ``chunk`` is rounded to whole groups (at least one).

Automatic sizing (``chunk=None``): the first chunk is one group (one task without grouping plug-ins); the bytes
its graph saves for backward are counted while it is built, and the later chunks take as many whole groups as
fit ``CHUNK_BYTES`` (per device type: on CPU a speed optimum rather than a limit, on CUDA a share of memory).

The recompute rule. A chunk cannot be smaller than a group. When one group alone would save more than the
budget, that chunk runs inside :func:`~metagrad.functional.recompute_per_task`: every model forward is
checkpointed per task and recomputed in the backward, so about one task's forward activations are alive at a
time (same gradients, one more forward each). The first chunk's count stops as soon as it passes the budget;
that chunk's partial graph is dropped and the chunk runs again, recomputed. (Forwards run again, so a model
whose forward has side effects, e.g. BatchNorm tracking running statistics, has them again.)

Example:
    >>> opt.zero_grad()
    >>> learner.set_iteration(it)                     # the plug-ins' schedules (multi-step loss weights)
    >>> out = meta_backward(learner, batch)           # gradients in .grad of the model's and plug-ins' parameters
    >>> opt.step(); print(out.loss, out.query_accuracy)   # the whole batch's values, detached
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from . import functional as fn
from .distributed import group_size_of, units
from .learners.base import MetaLossOutput
from .tasks import TaskBatch

# The largest graph one chunk may save for backward, by device type. On CPU 80 MiB: Conv4 Omniglot 5w1s chunks
# of 10 tasks with 1 query per class, 4 with 5, 1 with 15 (larger chunks ran slower, docs/performance.md).
CHUNK_BYTES = {"cpu": 80 << 20, "cuda": 2 << 30}


def meta_backward(learner: nn.Module, batch: TaskBatch, chunk: int | None = None,
                  first_order: bool | None = None) -> MetaLossOutput:
    """Backward the meta-loss of ``batch`` chunk by chunk of tasks; returns the whole batch's values, detached.

    Gradients add to ``.grad`` of every learner parameter (model, plug-ins, learned rates), as
    ``learner.meta_loss(batch, first_order).loss.backward()`` would add them.

    Args:
        learner: any learner (:mod:`metagrad.learners`; its plug-ins' ``task_group_size`` sets the groups).
        batch: the meta-batch.
        chunk: tasks per chunk, rounded to whole task groups (at least one); None: sized from the bytes the
            first chunk's graph saves against ``CHUNK_BYTES``, recomputing forwards where one group exceeds it.
        first_order: as for ``meta_loss`` (None: the learner's order).

    Returns:
        A :class:`~metagrad.MetaLossOutput`: ``loss`` and ``query_loss`` are the whole batch's means, the per-task
        and per-sample fields are concatenated, the diagnostics are task-weighted means of the chunks' (a
        non-scalar one, e.g. a relation matrix of the first group, is the first chunk's).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 tasks or None, got {chunk}")
    T = len(batch)
    if T == 0:
        raise ValueError("meta_backward: the meta-batch has no task")
    groups = units(T, group_size_of(learner))
    budget = CHUNK_BYTES.get(batch.support_x.device.type, CHUNK_BYTES["cpu"])
    per_task: float | None = None     # graph bytes per task as the first chunk counted them (None: over budget)
    parts: list[MetaLossOutput] = []
    g = 0
    while g < len(groups):
        if chunk is not None:
            n = chunk
        else:   # the first chunk one group; then as many as fit, or one (recomputed) where one does not
            n = 1 if not parts or per_task is None else int(budget // max(per_task, 1.0))
        stop = g + 1
        while stop < len(groups) and groups[stop].stop - groups[g].start <= n:
            stop += 1
        sub = batch.select(slice(groups[g].start, groups[stop - 1].stop))
        if chunk is None and not parts:
            out, saved = _probed(learner, sub, T, first_order, budget)
            per_task = None if saved is None else saved / len(sub)
        else:
            recompute = chunk is None and len(sub) > 1 and (per_task is None or per_task * len(sub) > budget)
            out = _backward(learner, sub, T, first_order, recompute)
        parts.append(out)
        g = stop
    return parts[0] if len(parts) == 1 else _joined(parts, T)


def _backward(learner: nn.Module, sub: TaskBatch, T: int, first_order: bool | None,
              recompute: bool = False) -> MetaLossOutput:
    """One chunk: its meta-loss, weighted by its share of the batch, backwarded at once; its values detached."""
    with fn.recompute_per_task() if recompute else contextlib.nullcontext():
        out = learner.meta_loss(sub, first_order)
    # Outside autocast (a caller's bf16 forwards): the backward runs in the types the forward chose.
    with torch.autocast(sub.support_x.device.type, enabled=False):
        (out.loss * (len(sub) / T)).backward()
    return out.detached()


def _probed(learner: nn.Module, sub: TaskBatch, T: int, first_order: bool | None,
            budget: int) -> tuple[MetaLossOutput, int | None]:
    """The first chunk, its graph's saved bytes counted while built: ``(values, bytes)``. A chunk of several tasks
    (a group) whose count passes ``budget`` is stopped there and run again recomputed: ``(values, None)``."""
    counting, saved = _saved_bytes(budget if len(sub) > 1 else None)
    try:
        with counting:
            out = _backward(learner, sub, T, first_order)
        return out, saved[0]
    except _OverBudget:
        pass   # out of the handler first: its traceback holds the partial graph
    return _backward(learner, sub, T, first_order, recompute=True), None


class _OverBudget(Exception):
    """The first chunk's graph passed the budget while being built."""


def _saved_bytes(limit: int | None = None) -> tuple[Any, list[int]]:
    """A ``saved_tensors_hooks`` context that adds up the bytes autograd saves (distinct storages), and the
    one-element list it adds them to: how large a graph is, measured while it is built. Past ``limit`` bytes it
    raises :class:`_OverBudget`."""
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in seen and key != 0:
                seen.add(key)
                total[0] += st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            pass
        if limit is not None and total[0] > limit:
            raise _OverBudget
        # Detached: a node that saves its own output would otherwise hold that output, which holds the node
        # (a reference cycle through C++ that nothing collects).
        return t.detach()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def _joined(parts: list[MetaLossOutput], T: int) -> MetaLossOutput:
    """The chunks' values as the whole batch's: task-weighted means, per-task fields concatenated."""
    weights = [len(p.task_losses) / T for p in parts]
    task_losses = torch.cat([p.task_losses for p in parts])
    accs = None if parts[0].task_accuracies is None else torch.cat([p.task_accuracies for p in parts])
    return MetaLossOutput(sum(w * p.loss for w, p in zip(weights, parts)), task_losses.mean(),
                          None if accs is None else accs.mean(), task_losses, accs,
                          torch.cat([p.sample_losses for p in parts]),
                          _mean_diagnostics([(len(p.task_losses), p.diagnostics) for p in parts], T))


def _mean_diagnostics(parts: list[tuple[int, dict]], total: int) -> dict:
    """Per-chunk diagnostics (task means) → meta-batch means, weighted by chunk size (a non-scalar value, e.g. a
    matrix of the first group: the first chunk's)."""
    if len(parts) == 1:
        return parts[0][1]

    def combine(values: list, weights: list[float]):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            return sum(w * v for w, v in zip(weights, values)) / total
        if isinstance(first, dict):
            return {k: combine([v[k] for v in values], weights) for k in first}
        return first   # anything else: the first chunk's value

    keys = parts[0][1].keys()
    return {k: combine([d[k] for _, d in parts], [float(c) for c, _ in parts]) for k in keys}
