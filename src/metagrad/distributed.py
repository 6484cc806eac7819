"""Data-parallel meta-training on ``torch.distributed``: ranks, shares of a meta-batch, one all-reduce per step.

Launch with PyTorch's own launcher (``torchrun --nproc-per-node N -m metagrad train ...``) or with
``metagrad train ... --nproc N``, which runs torchrun's module for you. Every process reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment torchrun sets; the
backend is gloo on CPU and nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``).

Why the result equals a single process. Every rank builds the same meta-batch ``i`` (a pure function of
``(seed, split, i)``) and keeps a contiguous share of ``n_r`` of its ``T`` tasks (:func:`shares`). The
single-process meta-loss is a mean over tasks (MAML's query loss, MAML++'s multi-step losses, plug-ins'
per-task outer terms), so ``(1/T) Σ_t ℓ_t = Σ_r (n_r/T) · mean_{t∈r} ℓ_t``:
each rank scales the gradient of its own mean by ``n_r/T`` and an all-reduce SUM gives the single-process
meta-gradient, up to floating-point summation order. Plug-ins that relate tasks to each other
(``Plugin.task_group_size`` > 1) get whole groups: the meta-batch is cut into the plug-in's groups first and
each rank takes whole groups, so every per-task term sees exactly the partners it has in one process.

Example:
    >>> dctx, device = setup("cpu")                        # world 1 outside torchrun: nothing to join
    >>> part, weight = shard(batch, dctx.rank, dctx.world, group_size_of(learner))
    >>> out = meta_backward(learner, part)       # metagrad.chunks: this share's gradients, chunk by chunk
    >>> logged = allreduce_grads(list(learner.parameters()), weight, {"loss": out.loss}, dctx)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .tasks import TaskBatch, task_groups

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A rank lost the others (one was killed or crashed) or the job is set up wrongly; one line."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job. ``world == 1`` is an ordinary single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False          # this module initialised the process group, so it destroys it

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory, checkpoints and metrics."""
        return self.rank == 0


def world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process was started by torchrun (or set up like it) with more than one rank."""
    return world_size() > 1


def setup(device_name: str) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device_name`` is ``train.device``: under several ranks "cuda" / "auto" (with CUDA) means
    ``cuda:LOCAL_RANK``. A process group that already exists (e.g. made by a test harness) is reused and
    left alone at :func:`teardown`.
    """
    from .evaluation import device_of

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and not launched():
        return Context(), device_of(device_name)
    if not dist.is_available():  # pragma: no cover - every official torch build has it
        raise DistributedError("this torch build has no torch.distributed: run with one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_of(device_name)
    if device.type == "cuda":
        if device.index is None:
            if torch.cuda.device_count() <= local_rank:
                raise DistributedError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                       "start at most one process per GPU (--nproc-per-node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialised:
        missing = [k for k in ENV if k not in os.environ]
        if missing:
            raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                                   "(torchrun --nproc-per-node N -m metagrad train ...) or metagrad train --nproc N")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=not initialised), device


def teardown(ctx: Context, synchronize: bool = False) -> None:
    """Leave the process group if :func:`setup` joined it.

    With ``synchronize`` (the normal end of training) every rank first waits at a barrier, so that all leave
    together after the last collective: a rank that shuts its connections down while a peer is still busy with
    the group can abort at exit (seen once in CI as "terminate called without an active exception" on the rank
    that left first). On an error path leave without waiting: a peer may be dead.
    """
    if ctx.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ shares
def group_size_of(learner: nn.Module) -> int | None:
    """The task-group size the learner's plug-ins relate tasks within (``Plugin.task_group_size``), or None
    when every plug-in takes independent tasks (size 1)."""
    sizes = {int(p.task_group_size) for p in getattr(learner, "plugins", ())} - {1}
    if len(sizes) > 1:
        raise ValueError(f"plug-ins relate tasks in groups of different sizes {sorted(sizes)}: give them one group_size")
    return sizes.pop() if sizes else None


def units(T: int, group_size: int | None = None) -> list[range]:
    """The indivisible runs of tasks: the plug-ins' groups (:func:`~metagrad.tasks.task_groups`), else single
    tasks."""
    if group_size is None or group_size == 1:
        return [range(t, t + 1) for t in range(T)]
    return task_groups(T, group_size)


def shares(T: int, world: int, group_size: int | None = None) -> list[slice]:
    """Each rank's contiguous share of a meta-batch of ``T`` tasks, whole groups each.

    The ``U`` units (groups, or single tasks) are dealt in order: rank r takes ``U // world`` of them, plus one
    for the first ``U % world`` ranks. So shares differ by at most one unit, rank 0 always has work, and a
    rank gets nothing when there are fewer units than ranks (e.g. a grouping plug-in with ``T <= group_size``).
    """
    us = units(T, group_size)
    base, extra = divmod(len(us), world)
    out, u = [], 0
    for r in range(world):
        k = base + (1 if r < extra else 0)
        start = us[u].start if k else (us[u - 1].stop if u else 0)
        stop = us[u + k - 1].stop if k else start
        out.append(slice(start, stop))
        u += k
    return out


def shard(batch: TaskBatch, rank: int, world: int, group_size: int | None = None) -> tuple[TaskBatch, float]:
    """This rank's tasks of ``batch`` and their weight ``n_r / T`` in the meta-gradient."""
    if world == 1:
        return batch, 1.0
    T = len(batch)
    s = shares(T, world, group_size)[rank]
    return batch.select(s), (s.stop - s.start) / T


_warned: set[tuple[int, int, int | None]] = set()


def warn_idle(T: int, world: int, group_size: int | None) -> None:
    """Warn once when some ranks get no task (fewer groups than ranks): correct, but wasted processes."""
    n = len(units(T, group_size))
    if n < world and (T, world, group_size) not in _warned:
        _warned.add((T, world, group_size))
        what = f"{n} task group(s) of group_size={group_size}" if group_size else f"{n} task(s)"
        warnings.warn(f"meta_batch_size={T} gives {what} for {world} ranks: {world - n} rank(s) idle; raise "
                      "train.meta_batch_size or use fewer processes", stacklevel=2)


# ------------------------------------------------------------------------------------------------ collectives
def allreduce_grads(params: Sequence[torch.Tensor], weight: float, scalars: dict[str, torch.Tensor | None],
                    ctx: Context) -> dict[str, torch.Tensor | None]:
    """Sum ``weight``-scaled gradients over ranks in one flat bucket; also the weighted logged scalars.

    A parameter no rank gave a gradient keeps ``grad = None`` (as in one process, so Adam skips it, state and
    all); one that some rank did not reach gets zeros from that rank. The scalars (e.g. ``loss``) come back
    as the ``n_r/T``-weighted sum over ranks, i.e. the single-process mean; ``None`` where no rank had one.
    Every rank must pass the same parameter list and scalar keys.
    """
    if not params:
        return scalars
    ref = params[0]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    keys = sorted(scalars)
    parts = [(p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype,
              device=ref.device)) for p in params]
    has = torch.tensor([p.grad is not None for p in params] + [scalars[k] is not None for k in keys],
                       dtype=dtype, device=ref.device)
    vals = torch.zeros(len(keys), dtype=dtype, device=ref.device)
    for j, k in enumerate(keys):
        v = scalars[k]
        if v is not None:
            vals[j] = v.detach().reshape(()).to(dtype)
    flat = torch.cat([*parts, vals]) * weight
    flat = torch.cat([flat, has])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as e:
        raise lost_peer(ctx, e) from e
    offset = 0
    n_grad = sum(p.numel() for p in params)
    got = flat[n_grad + len(keys):]
    for i, p in enumerate(params):
        n = p.numel()
        if got[i] > 0:
            g = flat[offset:offset + n].reshape(p.shape).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        else:
            p.grad = None
        offset += n
    out: dict[str, torch.Tensor | None] = {}
    for j, k in enumerate(keys):
        out[k] = flat[n_grad + j].to(ref.dtype) if got[len(params) + j] > 0 else None
    return out


def broadcast(obj: Any, ctx: Context) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; e.g. the checkpoint state, or an error to raise everywhere)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise lost_peer(ctx, e) from e
    return box[0]


def broadcast_module(module: nn.Module, ctx: Context) -> None:
    """Make every rank start from rank 0's parameters and buffers (they agree already when seeded alike)."""
    if not ctx.active:
        return
    try:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
    except RuntimeError as e:
        raise lost_peer(ctx, e) from e


def lost_peer(ctx: Context, error: BaseException) -> DistributedError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return DistributedError(f"rank {ctx.rank} of {ctx.world} lost the other ranks ({first}): one was killed or "
                            "crashed; the last good checkpoint is kept, continue with --resume")


__all__ = ["Context", "DistributedError", "allreduce_grads", "broadcast", "broadcast_module", "group_size_of",
           "launched", "setup", "shard", "shares", "teardown", "units", "warn_idle", "world_size"]
