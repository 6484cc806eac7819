"""Benchmarks: seeded streams of :class:`~metagrad.TaskBatch`, shipped or from the user's own data.

The public surface is ``__all__`` (documented in docs/own-data.md):

* :func:`create` builds a registered benchmark by name; :func:`available` lists the names, :func:`arguments`
  the keyword arguments one takes, :func:`fixed_ways` the number of ways one is fixed to; :func:`register`
  adds a benchmark.
* :func:`from_tensors` and :func:`from_dataset` build a benchmark from labelled tensors or a map-style dataset.
* :class:`Benchmark` is the base class of every benchmark; :func:`generator` and :func:`stream_seed` seed a
  subclass's meta-batch ``i`` from ``(name, seed, split, i)``; :class:`DataError` is the one error of this layer.

The submodules (``images``, ``folders``, ``cache``, ``omniglot``, ...) are internal: their names may change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .. import entry
from .base import Benchmark, generator, stream_seed
from .errors import DataError
from .user import from_dataset, from_tensors

_REGISTRY: dict[str, Callable[..., Benchmark]] = {}


def register(name: str) -> Callable[[Callable[..., Benchmark]], Callable[..., Benchmark]]:
    """Class or factory decorator: make a benchmark available to :func:`create` under ``name``."""

    def deco(factory: Callable[..., Benchmark]) -> Callable[..., Benchmark]:
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """The registered benchmark names and those installed packages declare (entry points), sorted."""
    _load_all()
    return entry.names(_REGISTRY, entry.BENCHMARKS_GROUP)


def _factory(name: str) -> Callable[..., Benchmark]:
    """The benchmark factory ``name`` stands for: a registered name, an import path ``package.module:factory``
    or a name declared under the entry-point group ``metagrad.benchmarks`` (:mod:`metagrad.entry`)."""
    _load_all()
    return entry.resolve(name, _REGISTRY, entry.BENCHMARKS_GROUP, "benchmark")


def create(name: str, split: str = "train", ways: int = 5, shots: int = 1, queries: int = 15,
           meta_batch_size: int = 32, seed: int = 0, root: str | None = None, **kwargs: Any) -> Benchmark:
    """Build benchmark ``name`` for ``split``. Same arguments and seed → the same tasks, bit for bit.

    Args:
        name: a registered benchmark (see :func:`available`), an import path ``package.module:factory`` or an
            entry point of group ``metagrad.benchmarks``; a user's factory gets the arguments below that its
            signature names, and ``kwargs``.
        split: "train" | "val" | "test"; the three streams (or class sets) are disjoint.
        ways, shots, queries: N-way K-shot with Q query samples per class (regression uses shots/queries as
            point counts and ignores ways).
        meta_batch_size: tasks per :class:`TaskBatch`.
        seed: the stream's seed.
        root: data folder for benchmarks that read files.
    """
    build = _factory(name)
    given = {"split": split, "ways": ways, "shots": shots, "queries": queries, "meta_batch_size": meta_batch_size,
             "seed": seed, "root": root}
    if name in _REGISTRY:  # a built-in takes every argument
        return build(**given, **kwargs)
    bench = entry.call(build, given, kwargs, "benchmark.kwargs")
    if not isinstance(bench, Benchmark):
        raise ValueError(  # noqa: TRY004 - the user's factory is at fault: a one-line config error
            f"benchmark {name!r} returned a {type(bench).__name__}, not a metagrad.data.Benchmark")
    return bench


def arguments(name: str) -> tuple[str, ...] | None:
    """The keyword arguments benchmark ``name`` takes (its factory's signature), None when it takes any.

    Lets a caller refuse an unknown argument by name before building, instead of reading a ``TypeError``.
    """
    params = inspect.signature(_factory(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def fixed_ways(name: str) -> int | None:
    """The number of ways benchmark ``name`` is fixed to (``fixed_ways`` of its class, e.g. 20 for Lake's
    one-shot runs), or None when episodes take any number."""
    return getattr(_factory(name), "fixed_ways", None)


def _load_all() -> None:
    # Import the benchmark modules lazily so that `import metagrad` stays light; each registers itself.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


__all__ = ["Benchmark", "DataError", "arguments", "available", "create", "fixed_ways", "from_dataset", "from_tensors",
           "generator", "register", "stream_seed"]
