"""Plug-ins from the papers, built by registry key: ``create("meta_gna")``, ``available()``.

Each method lives in one file of this package and registers itself with :func:`register`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import typing
from collections.abc import Callable
from typing import Any

from ..seams import FigureSpec, Plugin

_REGISTRY: dict[str, Callable[..., Plugin]] = {}


def register(name: str) -> Callable[[type[Plugin]], type[Plugin]]:
    """Class decorator: make a plug-in available to :func:`create` under ``name``."""

    def deco(cls: type[Plugin]) -> type[Plugin]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"plug-in {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> list[str]:
    """Registered plug-in keys, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Plugin:
    """Build the plug-in registered as ``name`` with keyword arguments."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown plug-in {name!r}: choose one of {', '.join(sorted(_REGISTRY)) or '(none)'}")
    cls = _REGISTRY[name]
    kwargs = checked_kwargs(name, cls, kwargs)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the plug-in's own range checks: say which config table they came from
        raise ValueError(f"plugin_args.{name}: {e}") from e


def figures() -> list[FigureSpec]:
    """The report figures every registered plug-in declares (``Plugin.figures``), by plug-in key.

    Raises:
        ValueError: two figures would be written to the same file.
    """
    _load_all()
    specs = [spec for key in sorted(_REGISTRY) for spec in getattr(_REGISTRY[key], "figures", ())]
    files = [spec.file for spec in specs]
    if len(set(files)) < len(files):
        raise ValueError(f"plug-ins declare figures with the same file name: {sorted(files)}")
    return specs


def checked_kwargs(name: str, cls: Callable[..., Plugin], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` converted to the types of ``cls``'s annotated keyword arguments, every float finite.

    Raises:
        ConfigError: an unknown argument, a value of the wrong type, or a float that is nan or infinite.
    """
    from ..config import ConfigError, coerce

    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    out = {}
    for key, value in kwargs.items():
        where = f"plugin_args.{name}.{key}"
        if key not in params:
            raise ConfigError(f"plugin_args.{name}: {name} takes no argument {key!r} (it takes: {', '.join(params)})")
        tp = hints.get(key)
        out[key] = coerce(value, tp, where) if tp in _CHECKED else value
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise ConfigError(f"{where}: must be a finite number, got {out[key]}")
        if isinstance(out[key], int) and not isinstance(out[key], bool) and abs(out[key]) > _INT_MAX:
            raise ConfigError(f"{where}: must be at most {_INT_MAX} in size, got {out[key]}")
    return out


_CHECKED = (bool, int, float, str)
_INT_MAX = 2**31 - 1  # torch's sizes overflow past it


def __getattr__(attr: str) -> Any:
    # `from metagrad.methods import MetaGNA` works without importing every method at package import.
    _load_all()
    for cls in _REGISTRY.values():
        if cls.__name__ == attr:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["Plugin", "available", "create", "figures", "register"]
