"""The model registry: a benchmark's base network by name, sized to the benchmark's shapes.

A model is a factory (a function or a class) that returns an ``nn.Module``. It names what it needs of the
benchmark in its signature, among ``in_shape`` (one input's shape, ``x_shape``), ``out_dim`` (ways, or the
regression output size) and ``benchmark`` (the benchmark itself, e.g. for a graph), and takes its own arguments
by keyword (``model.kwargs`` in a config). A built-in model is one file of this package that registers its
factory with :func:`register`; a user's model is an import path ``package.module:factory`` or a name declared
under the entry-point group ``metagrad.models`` (:mod:`metagrad.entry`). The models never import the data modules:
a benchmark here is anything with ``x_shape`` and ``out_dim`` (or a mapping with those keys).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .. import entry
from ..config import ConfigError
from .tnet import TNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Wrappers around any built model, by name (config ``model.wrap``): ``wrapper(model) → nn.Module``.
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {"tnet": TNet}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make the factory a built-in model under ``name`` (see the module docstring for its signature).

    Example:
        >>> @register("tiny")
        ... def tiny(in_shape, out_dim, hidden: int = 8):
        ...     return MLP(in_shape[0], (hidden,), out_dim)
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_all() -> None:
    # Every module of this package that holds a model registers it on import.
    for mod in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"{__package__}.{mod.name}")


def available() -> list[str]:
    """The built-in model names and those installed packages declare (entry points), sorted."""
    _load_all()
    return entry.names(_REGISTRY, entry.MODELS_GROUP)


def wrappers() -> list[str]:
    """Model wrapper names (``model.wrap``), sorted: ``tnet`` (:class:`~metagrad.models.TNet`)."""
    return sorted(WRAPPERS)


def wrap(names: Sequence[str], model: nn.Module) -> nn.Module:
    """``model`` inside each named wrapper, the first innermost."""
    for name in names:
        if name not in WRAPPERS:
            raise ConfigError(f"unknown model wrapper {name!r}: choose among {', '.join(wrappers())}")
        model = WRAPPERS[name](model)
    return model


def auto_name(bench: Any) -> str:
    """The default model of a benchmark: "mlp" for regression, "gcn" for a graph, else "conv4"."""
    if _get(bench, "task_type", "classification") == "regression":
        return "mlp"
    return "gcn" if _get(bench, "graph", None) is not None else "conv4"


def factory(name: str) -> Callable[..., nn.Module]:
    """The factory ``name`` stands for: a built-in, an import path or an entry point ("auto" is not resolved)."""
    _load_all()
    return entry.resolve(name, _REGISTRY, entry.MODELS_GROUP, "model")


def create(name: str, bench: Any, **kwargs: Any) -> nn.Module:
    """The model ``name`` ("auto": :func:`auto_name`) sized to ``bench``: the factory gets ``in_shape``,
    ``out_dim`` and ``benchmark`` where its signature names them, and ``kwargs`` (its own arguments, checked
    against its signature: an unknown one is a one-line ConfigError).

    Example:
        >>> bench = metagrad.data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=4, seed=0)
        >>> create("mlp", bench, hidden=(40, 40))          # MLP(1, (40, 40), 1)
        >>> create("conv4", {"x_shape": (1, 28, 28), "out_dim": 5}, width=32)
        >>> create("mypkg.nets:tinynet", bench, hidden=8)  # a user's model by import path
    """
    name = auto_name(bench) if name == "auto" else name
    build = factory(name)
    given = {"in_shape": tuple(_get(bench, "x_shape")), "out_dim": int(_get(bench, "out_dim")), "benchmark": bench}
    model = entry.call(build, given, kwargs, "model.kwargs")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _get(bench: Any, key: str, default: Any = ...) -> Any:
    value = bench.get(key, default) if isinstance(bench, Mapping) else getattr(bench, key, default)
    if value is ...:
        raise ValueError(f"models.create: the benchmark gives no {key!r}")
    return value


def bench_name(bench: Any) -> str:
    """The benchmark's name for a message ("this benchmark" when it has none)."""
    return str(_get(bench, "name", "this benchmark"))
