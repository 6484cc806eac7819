"""User code by name: the built-in registries, ``package.module:attr`` import paths, and entry points.

A name in a config (``model.name``, ``benchmark.name``) is looked up in this order: a built-in registered under
it; an import path ``package.module:attr`` (``attr`` may be dotted, e.g. ``nets:Zoo.small``); a name that an
installed package declares under the entry-point group (``metagrad.models`` / ``metagrad.benchmarks``, the
Python packaging convention for plug-ins, read with :mod:`importlib.metadata`). An import path is imported as
Python would, with the current directory searched last, so ``metagrad train --set model.name=mynet:build``
finds ``./mynet.py`` whether metagrad runs as ``metagrad`` or ``python -m metagrad``.

Example, a package's ``pyproject.toml``::

    [project.entry-points."metagrad.models"]
    tinynet = "mypkg.nets:tinynet"          # then: --set model.name=tinynet
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

from .config import ConfigError, coerce

MODELS_GROUP = "metagrad.models"
BENCHMARKS_GROUP = "metagrad.benchmarks"


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """The entry points installed packages declare under ``group``, by name."""
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(builtin: Iterable[str], group: str) -> list[str]:
    """The built-in names and those of ``group``'s entry points, sorted."""
    return sorted({*builtin, *entry_points(group)})


def resolve(name: str, builtin: Mapping[str, Callable[..., Any]], group: str, what: str) -> Callable[..., Any]:
    """The factory ``name`` stands for: built-in, import path or entry point (see the module docstring).

    Raises:
        ConfigError: an unknown name, a module that cannot be imported, a missing attribute, or not a callable;
            one line naming ``what`` ("model", "benchmark") and the fix.
    """
    if name in builtin:
        return builtin[name]
    if ":" in name:
        obj = import_path(name, what)
    else:
        found = entry_points(group)
        if name not in found:
            choices = ", ".join(names(builtin, group))
            raise ConfigError(f"unknown {what} {name!r}: choose one of {choices}, an import path "
                              f"'package.module:factory', or a name an installed package declares under the entry "
                              f"point group {group!r}")
        try:
            obj = found[name].load()
        except Exception as e:  # an installed plug-in that does not import: say which and why
            raise ConfigError(f"{what} {name!r} (entry point {found[name].value!r} of group {group!r}) cannot be "
                              f"loaded: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ConfigError(f"{what} {name!r} is a {type(obj).__name__}, not a class or function that builds one")
    return obj


def import_path(spec: str, what: str) -> Any:
    """The object ``package.module:attr`` names (the current directory searched after ``sys.path``)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{what} {spec!r}: an import path is 'package.module:factory'")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise ConfigError(f"{what} {spec!r}: cannot import {module!r} ({e}): install it or put its folder on "
                              "PYTHONPATH") from e
        sys.path.append(cwd)
        return import_path(spec, what)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def parameters(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` takes, None when it takes any (``**kwargs``, or no readable signature)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call(factory: Callable[..., Any], given: Mapping[str, Any], kwargs: Mapping[str, Any], where: str) -> Any:
    """``factory(**given', **kwargs)``: ``given`` (what the caller supplies, e.g. ``in_shape``, ``out_dim``) only
    where the factory's signature takes it, ``kwargs`` (the user's table, e.g. ``model.kwargs``) checked against it.

    A keyword the factory does not take, one that ``given`` supplies, or a value of the wrong type for an annotated
    scalar parameter is a one-line ConfigError naming ``where.<key>``.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return factory(**given, **kwargs)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    args = {k: v for k, v in given.items() if k in params}
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except (NameError, TypeError, AttributeError):  # annotations that do not resolve: no conversion
        hints = {}
    for key, value in kwargs.items():
        if key in given:
            raise ConfigError(f"{where}.{key}: {key} is set by metagrad from the benchmark; remove it")
        if key not in params and not open_ended:
            raise ConfigError(f"{where}: {_name(factory)} takes no argument {key!r} (it takes: "
                              f"{', '.join(n for n in named if n not in given) or 'none'})")
        tp = hints.get(key)
        value = coerce(value, tp, f"{where}.{key}") if tp in (bool, int, float, str) else value
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: must be a finite number, got {value}")
        args[key] = value
    missing = [n for n in named if n not in args and params[n].default is params[n].empty]
    if missing:
        raise ConfigError(f"{where}: {_name(factory)} needs {', '.join(missing)}: set {where}.{missing[0]}=VALUE")
    return factory(**args)


def _name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


__all__ = ["BENCHMARKS_GROUP", "MODELS_GROUP", "call", "entry_points", "import_path", "names", "parameters",
           "resolve"]
