"""Regression benchmarks: sinusoid (Finn et al. 2017) and harmonic (Lacoste et al. 2018).

Each meta-batch is drawn from its own generator seeded by (name, seed, split, index), so train, val and test
are disjoint random streams and any batch can be regenerated alone.
"""

from __future__ import annotations

import math

import torch

from ..tasks import TaskBatch
from . import register
from .base import Benchmark, generator


class _Regression(Benchmark):
    task_type = "regression"
    x_shape = (1,)
    out_dim = 1

    def __init__(self, split: str, shots: int, queries: int, meta_batch_size: int, seed: int, **_: object) -> None:
        super().__init__(split, meta_batch_size, seed)
        if shots < 1 or queries < 1:
            raise ValueError(f"{self.name}: shots and queries must be >= 1, got {shots} and {queries}")
        self.shots, self.queries = int(shots), int(queries)

    def batch(self, index: int) -> TaskBatch:
        g = generator(self.name, self.seed, self.split, int(index))
        T, n = self.meta_batch_size, self.shots + self.queries
        fn, x = self.sample(g, T, n)
        y = fn(x)
        s = self.shots
        first = int(index) * T
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:], tuple(range(first, first + T)))

    def true_function(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The target functions of batch ``index`` evaluated at ``x`` (``[G]`` points) → ``[T, G, 1]`` (for plots)."""
        g = generator(self.name, self.seed, self.split, int(index))
        fn, _ = self.sample(g, self.meta_batch_size, self.shots + self.queries)
        return fn(x.reshape(1, -1, 1).expand(self.meta_batch_size, -1, 1))


@register("sinusoid")
class Sinusoid(_Regression):
    """y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (Finn et al. 2017, section 5.1).

    Example:
        >>> bench = Sinusoid("train", shots=10, queries=10, meta_batch_size=25, seed=0)
        >>> bench.batch(0).support_x.shape
        torch.Size([25, 10, 1])
    """

    name = "sinusoid"

    def sample(self, g: torch.Generator, T: int, n: int):
        amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g)
        phase = math.pi * torch.rand(T, 1, 1, generator=g)
        x = -5.0 + 10.0 * torch.rand(T, n, 1, generator=g)
        return (lambda x: amp * torch.sin(x - phase)), x


@register("harmonic")
class Harmonic(_Regression):
    """y = a1·sin(ωx + b1) + a2·sin(2ωx + b2), ω ~ U[5, 7], a ~ N(0, 1), b ~ U[0, 2π], x = μ + N(0, 1),
    μ ~ U[−4, 4] per task (Lacoste et al., "Uncertainty in multitask transfer learning", 2018).
    """

    name = "harmonic"

    def sample(self, g: torch.Generator, T: int, n: int):
        omega = 5.0 + 2.0 * torch.rand(T, 1, 1, generator=g)
        a = torch.randn(T, 2, 1, generator=g)
        b = 2 * math.pi * torch.rand(T, 2, 1, generator=g)
        mu = -4.0 + 8.0 * torch.rand(T, 1, 1, generator=g)
        x = mu + torch.randn(T, n, 1, generator=g)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return a[:, :1] * torch.sin(omega * x + b[:, :1]) + a[:, 1:] * torch.sin(2 * omega * x + b[:, 1:])

        return fn, x
