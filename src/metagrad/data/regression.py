"""Regression benchmarks: sinusoid (Finn et al. 2017) and harmonic (Lacoste et al. 2018).

Each meta-batch is drawn from its own generator seeded by (name, seed, split, index), so train, val and test
are disjoint random streams and any batch can be regenerated alone.

``pool=N`` (a documented variant, off by default): the task functions of a split come from a fixed pool of N,
drawn once from (name, seed, split, "pool"), as torchmeta's ``Harmonic(num_tasks=5000)`` that the TRLearner
group's regression scripts use; every episode picks its T functions from the pool at random and draws fresh
inputs, as torchmeta does per task. ``shared_pool=True`` draws one pool for every split (a test pool equal to
the training pool, what building both splits with one seed gives), so test tasks are training tasks.
"""

from __future__ import annotations

import math

import torch

from ..tasks import TaskBatch
from . import register
from .base import Benchmark, generator

Params = dict[str, torch.Tensor]


class _Regression(Benchmark):
    task_type = "regression"
    x_shape = (1,)
    out_dim = 1

    def __init__(self, split: str, shots: int, queries: int, meta_batch_size: int, seed: int,
                 ways: int | None = None, root: str | None = None, pool: int = 0, shared_pool: bool = False) -> None:
        """``ways`` and ``root`` are accepted for the common :func:`metagrad.data.create` call and unused."""
        super().__init__(split, meta_batch_size, seed)
        if shots < 1 or queries < 1:
            raise ValueError(f"{self.name}: shots and queries must be >= 1, got {shots} and {queries}")
        if pool < 0 or (shared_pool and pool == 0):
            raise ValueError(f"{self.name}: pool must be >= 1 tasks (0: the disjoint stream), got {pool}"
                             + (" with shared_pool" if shared_pool else ""))
        self.shots, self.queries = int(shots), int(queries)
        self.pool: Params | None = None
        if pool:
            self.pool = self.params(generator(self.name, self.seed, "shared" if shared_pool else split, "pool"),
                                    int(pool))

    # Subclasses: the task functions' parameters, their inputs, and the function itself.
    def params(self, g: torch.Generator, T: int) -> Params:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs(self, g: torch.Generator, p: Params, n: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def function(self, p: Params, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _tasks(self, index: int) -> tuple[Params, torch.Tensor]:
        g = generator(self.name, self.seed, self.split, int(index))
        T = self.meta_batch_size
        if self.pool is None:
            p = self.params(g, T)
        else:
            pick = torch.randint(len(next(iter(self.pool.values()))), (T,), generator=g)
            p = {k: v[pick] for k, v in self.pool.items()}
        return p, self.inputs(g, p, self.shots + self.queries)

    def batch(self, index: int) -> TaskBatch:
        p, x = self._tasks(index)
        y = self.function(p, x)
        s, T = self.shots, self.meta_batch_size
        first = int(index) * T
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:], tuple(range(first, first + T)))

    def true_function(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The target functions of batch ``index`` evaluated at ``x`` (``[G]`` points) → ``[T, G, 1]`` (for plots)."""
        p, _ = self._tasks(index)
        return self.function(p, x.reshape(1, -1, 1).expand(self.meta_batch_size, -1, 1))


@register("sinusoid")
class Sinusoid(_Regression):
    """y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017, section 5.1).

    Example:
        >>> bench = Sinusoid("train", shots=10, queries=10, meta_batch_size=25, seed=0)
        >>> bench.batch(0).support_x.shape
        torch.Size([25, 10, 1])
    """

    name = "sinusoid"

    def params(self, g: torch.Generator, T: int) -> Params:
        amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g)
        phase = math.pi * torch.rand(T, 1, 1, generator=g)
        return {"amp": amp, "phase": phase}

    def inputs(self, g: torch.Generator, p: Params, n: int) -> torch.Tensor:
        return -5.0 + 10.0 * torch.rand(len(p["amp"]), n, 1, generator=g)

    def function(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        return p["amp"] * torch.sin(x - p["phase"])


@register("harmonic")
class Harmonic(_Regression):
    """y = a1·sin(ωx + b1) + a2·sin(2ωx + b2), ω ~ U[5, 7], a ~ N(0, 1), b ~ U[0, 2π], x = μ + N(0, 1),
    μ ~ U[−4, 4] per task (Lacoste et al., "Uncertainty in multitask transfer learning", 2018).
    """

    name = "harmonic"

    def params(self, g: torch.Generator, T: int) -> Params:
        omega = 5.0 + 2.0 * torch.rand(T, 1, 1, generator=g)
        a = torch.randn(T, 2, 1, generator=g)
        b = 2 * math.pi * torch.rand(T, 2, 1, generator=g)
        mu = -4.0 + 8.0 * torch.rand(T, 1, 1, generator=g)
        return {"omega": omega, "a": a, "b": b, "mu": mu}

    def inputs(self, g: torch.Generator, p: Params, n: int) -> torch.Tensor:
        return p["mu"] + torch.randn(len(p["mu"]), n, 1, generator=g)

    def function(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        a, b, omega = p["a"], p["b"], p["omega"]
        return a[:, :1] * torch.sin(omega * x + b[:, :1]) + a[:, 1:] * torch.sin(2 * omega * x + b[:, 1:])
