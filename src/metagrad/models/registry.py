"""The model registry: a benchmark's base network by name, sized to the benchmark's shapes.

A benchmark (anything with ``x_shape``, ``out_dim`` and, for a graph, ``graph``; or a mapping with those keys)
gives the shapes; the models never import the data modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..config import ConfigError
from .conv4 import Conv4
from .gcn import GCN
from .mlp import MLP
from .tnet import TNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Wrappers around any built model, by name (config ``model.wrap``): ``wrapper(model) → nn.Module``.
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {"tnet": TNet}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``builder(bench, **kwargs) → nn.Module`` builds the model ``name`` for a benchmark."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return deco


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


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


def create(name: str, bench: Any, **kwargs: Any) -> nn.Module:
    """The model ``name`` ("auto": :func:`auto_name`) sized to ``bench``: ``out_dim`` outputs, inputs from
    ``x_shape``. ``kwargs`` are the model's own (mlp: hidden; conv4: width, bias, pool; gcn: hidden, dropout).

    Example:
        >>> bench = metagrad.data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=4, seed=0)
        >>> create("mlp", bench, hidden=(40, 40))          # MLP(1, (40, 40), 1)
        >>> create("conv4", {"x_shape": (1, 28, 28), "out_dim": 5}, width=32)
    """
    name = auto_name(bench) if name == "auto" else name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(available())} or 'auto'")
    return _REGISTRY[name](bench, **kwargs)


def _get(bench: Any, key: str, default: Any = ...) -> Any:
    value = bench.get(key, default) if isinstance(bench, Mapping) else getattr(bench, key, default)
    if value is ...:
        raise ValueError(f"models.create: the benchmark gives no {key!r}")
    return value


def _bench_name(bench: Any) -> str:
    return str(_get(bench, "name", "this benchmark"))


@register("mlp")
def _mlp(bench: Any, hidden: Sequence[int] = (40, 40)) -> nn.Module:
    x_shape = tuple(_get(bench, "x_shape"))
    if len(x_shape) != 1:
        raise ConfigError(f"model.name=mlp needs vector inputs, {_bench_name(bench)} has shape {x_shape}")
    return MLP(x_shape[0], tuple(hidden), _get(bench, "out_dim"))


@register("conv4")
def _conv4(bench: Any, width: int = 64, bias: bool = False, pool: str = "max") -> nn.Module:
    x_shape = tuple(_get(bench, "x_shape"))
    if len(x_shape) != 3:
        raise ConfigError(f"model.name=conv4 needs [C, H, W] images, {_bench_name(bench)} has shape {x_shape}")
    return Conv4(x_shape[0], _get(bench, "out_dim"), width, bias, pool, image_size=x_shape[-1])


@register("gcn")
def _gcn(bench: Any, hidden: int | Sequence[int] = 16, dropout: float = 0.0) -> nn.Module:
    graph = _get(bench, "graph", None)
    if graph is None:
        raise ConfigError(f"model.name=gcn needs a graph benchmark (cora, citeseer), got {_bench_name(bench)}")
    hidden = hidden if isinstance(hidden, int) else tuple(hidden)
    return GCN(graph.features, graph.adjacency, hidden=hidden, out_dim=_get(bench, "out_dim"), dropout=dropout)
