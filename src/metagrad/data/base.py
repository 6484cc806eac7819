"""The benchmark protocol: an indexable, seeded stream of meta-batches.

A benchmark's meta-batch number ``i`` is a pure function of ``(seed, split, i)``. That one property gives
bit-for-bit reproducibility, exact resume (continue at ``i``), and disjoint deterministic shares for
distributed ranks, with no sampler state to checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from ..tasks import TaskBatch

SPLITS = ("train", "val", "test")


def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts (benchmark name, seed, split, index), stable across runs and platforms."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``stream_seed(*parts)``."""
    g = torch.Generator()
    g.manual_seed(stream_seed(*parts))
    return g


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


class Benchmark:
    """Base class of every benchmark: an infinite, seeded iterable of :class:`TaskBatch`.

    Subclasses implement :meth:`batch` and set ``task_type`` ("classification" | "regression"),
    ``x_shape`` (shape of one input) and ``out_dim`` (ways, or the regression output size). A benchmark that
    is a fixed set of episodes (Lake's 20 runs) also sets ``fixed_ways`` (the only number of ways it takes) and
    ``num_tasks`` (how many distinct tasks there are; evaluation never repeats one).

    Example:
        >>> bench = metagrad.data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=25, seed=0)
        >>> batch = bench.batch(0)          # the same tensors every time, for this seed and split
        >>> for batch in bench: ...         # batch(0), batch(1), ...
    """

    name: str = "benchmark"
    task_type: str = "classification"
    x_shape: tuple[int, ...] = ()
    out_dim: int = 1
    fixed_ways: int | None = None
    num_tasks: int | None = None

    def __init__(self, split: str, meta_batch_size: int, seed: int) -> None:
        self.split = check_split(split)
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        self.meta_batch_size = int(meta_batch_size)
        self.seed = int(seed)

    def batch(self, index: int) -> TaskBatch:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[TaskBatch]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1

    def tasks(self, n_tasks: int, start: int = 0) -> Iterator[TaskBatch]:
        """Meta-batches covering exactly ``n_tasks`` tasks (the last one trimmed), e.g. 600 test tasks."""
        done, i = 0, start
        while done < n_tasks:
            b = self.batch(i)
            take = min(len(b), n_tasks - done)
            yield b if take == len(b) else b.select(slice(0, take))
            done += take
            i += 1
