"""Parameter dictionaries and functional forwards: how the learner runs a plain module with other weights.

Fast parameters carry a leading task dimension: ``params[name]`` is ``[T, *shape]``. A model type with a
batched forward registered here (:func:`register_batched`; the kernels live in :mod:`metagrad.batched`), or a
model with a ``forward_batched`` method, runs all T tasks in one computation; any other module runs per task
through ``torch.func.functional_call`` and the outputs are stacked.

Taps: ``forward_batched(model, params, x, tap="blocks.3.pool")`` also returns the input of the named submodule
(any model: a forward pre-hook on it while each task runs, :func:`tapped`), for a plug-in that reads an
intermediate activation without the model offering it.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

Params = dict[str, torch.Tensor]

# model class → its task-batched forward ``f(model, params, x, return_features)``; see register_batched.
_BATCHED: dict[type, Callable[..., Any]] = {}
# model class → ``taps(model)``: the module names whose input its batched forward returns itself (``tap=name``).
_TAPS: dict[type, Callable[[nn.Module], Collection[str]]] = {}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Inside recompute_per_task(): forward_batched checkpoints each task's forward.
_RECOMPUTE = contextvars.ContextVar("recompute_per_task", default=False)


def register_batched(model_type: type[nn.Module], taps: Callable[[nn.Module], Collection[str]] | None = None,
                     ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``f(model, params, x, return_features=False)`` runs T tasks of ``model_type`` at once.

    For that exact class (a subclass may change ``forward``, so it runs per task). ``f`` must equal the
    module's forward per task; :func:`forward_batched` and :func:`forward_single` use it. ``taps(model)``: the
    submodule names ``f(model, params, x, tap=name)`` knows, returning ``(output, the input of that module)``
    equal to :func:`forward_per_task`'s; a tap of any other name runs the generic hooked path.

    Example:
        >>> @register_batched(MyNet)
        ... def mynet_forward_batched(model, params, x, return_features=False):
        ...     return forward_per_task(model, params, x, return_features)   # or a faster equal computation
    """
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        _BATCHED[model_type] = f
        if taps is not None:
            _TAPS[model_type] = taps
        return f

    return decorate


def batched_forward_of(model: nn.Module) -> Callable[..., Any] | None:
    """The batched forward registered for ``type(model)``, or None."""
    return _BATCHED.get(type(model))


def hooked(model: nn.Module) -> bool:
    """Whether a forward hook watches the model or one of its modules. A registered batched forward then runs the
    module's own forward per task instead (:func:`forward_per_task`), so the hooks fire."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks) or any(
        mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def meta_params(model: nn.Module) -> Params:
    """The model's parameters θ by name, in ``named_parameters()`` (input → output) order."""
    return dict(model.named_parameters())


# A parameter's role decides whether the inner loop adapts it; ``adapt`` names the roles adapted.
ROLES = ("body", "norm", "head", "outer")
ADAPTED_ROLES = {"all": ("body", "norm", "head"), "no_norm": ("body", "head"), "head": ("head",),
                 "body": ("body", "norm")}


def param_roles(model: nn.Module) -> dict[str, str]:
    """Every parameter's role, by name, in ``named_parameters()`` order: ``"outer"`` when its module declares
    ``meta_role = "outer"`` (meta-learned, never adapted: T-Net's transforms), ``"head"`` for the last
    ``nn.Linear``'s (the output layer ANIL adapts and BOIL freezes), ``"norm"`` for normalisation layers' affine
    parameters, ``"body"`` for every other one."""
    linears = [m for m, mod in model.named_modules() if isinstance(mod, nn.Linear)
               and getattr(mod, "meta_role", None) is None]
    head = linears[-1] if linears else None
    roles: dict[str, str] = {}
    for m, mod in model.named_modules():
        role = getattr(mod, "meta_role", None) or ("head" if m == head else
                                                   "norm" if isinstance(mod, _NORM_TYPES) else "body")
        roles.update({f"{m}.{p}" if m else p: role for p, _ in mod.named_parameters(recurse=False)})
    return {n: roles[n] for n in meta_params(model)}


def adapted_names(model: nn.Module, adapt: str) -> tuple[str, ...]:
    """The names of the parameters the inner loop updates, by role (:func:`param_roles`): ``adapt`` "all"
    (every role but "outer"), "no_norm" (not normalisation layers' affine parameters either), "head" (the last
    ``nn.Linear``'s, ANIL) or "body" (all but the head, BOIL)."""
    if adapt not in ADAPTED_ROLES:
        raise ValueError(f"unknown adapt mode {adapt!r}: use one of {', '.join(ADAPTED_ROLES)}")
    roles = param_roles(model)
    if adapt in ("head", "body") and "head" not in roles.values():
        raise ValueError(f"adapt={adapt!r} needs an nn.Linear head; {type(model).__name__} has none")
    return tuple(n for n, role in roles.items() if role in ADAPTED_ROLES[adapt])


def expand_tasks(params: Mapping[str, torch.Tensor], T: int) -> Params:
    """θ → ``[T, *shape]`` views, one copy per task (no memory; gradients flow back summed)."""
    return {n: p.unsqueeze(0).expand(T, *p.shape) for n, p in params.items()}


def task_slice(params: Mapping[str, torch.Tensor], t: int) -> Params:
    """The parameters of task ``t`` from a task-batched dictionary."""
    return {n: p[t] for n, p in params.items()}


def supports_features(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``return_features``."""
    return "return_features" in inspect.signature(model.forward).parameters


def forward_batched(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                    return_features: bool = False, tap: str | None = None):
    """Run T tasks: ``params[name]`` is ``[T, *shape]`` and ``x`` is ``[T, N, *x_shape]``.

    Returns ``[T, N, *out]`` (and ``[T, N, d]`` features when asked). ``tap``: the name of a submodule (as in
    ``named_modules()``); returns ``(output, its input)``, the input ``[T, *shape it has per task]``
    (:func:`tapped`; not with ``return_features``). Buffers come from the module. Runs the batched forward
    registered for the model's type (for a tap only when it knows that name), else the model's own
    ``forward_batched`` method (never for a tap), else :func:`forward_per_task`.
    """
    if _RECOMPUTE.get() and torch.is_grad_enabled():   # inside recompute_per_task(): task by task, recomputed
        return _checkpointed_per_task(model, params, x, return_features, tap)
    registered = batched_forward_of(model)
    if tap is not None:
        if return_features:
            raise ValueError("forward_batched: pass return_features or tap, not both")
        if registered is not None and tap in _TAPS.get(type(model), lambda m: ())(model):
            return registered(model, params, x, tap=tap)
        return forward_per_task(model, params, x, tap=tap)
    if registered is not None:
        return registered(model, params, x, return_features)
    kwargs = {"return_features": return_features} if return_features else {}
    if hasattr(model, "forward_batched"):
        return model.forward_batched(params, x, **kwargs)
    return forward_per_task(model, params, x, return_features)


def check_task_dims(params: Mapping[str, torch.Tensor], T: int) -> None:
    """Every parameter must carry T tasks in its leading dimension (one clear error otherwise)."""
    if any(p.shape[0] != T for p in params.values()):
        raise ValueError(f"forward_batched: x has {T} tasks but the parameters' leading dims are "
                         f"{sorted({p.shape[0] for p in params.values()})}; pass [T, *shape] parameters")


def forward_per_task(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                     return_features: bool = False, tap: str | None = None):
    """``forward_batched`` as a loop: ``functional_call`` once per task, outputs stacked (any module)."""
    kwargs = {"return_features": return_features} if return_features else {}
    one = tapped(model, tap) if tap is not None else \
        lambda p, xt: functional_call(model, p, (xt,), kwargs)
    check_task_dims(params, x.shape[0])
    # One unbind per tensor, not a select per task: the backward of T selects writes T zero-filled
    # [T, *shape] gradients (O(T²) memory traffic); one unbind's backward is a single stack.
    names, slices = list(params), [p.unbind(0) for p in params.values()]
    outs = [one(dict(zip(names, ps)), xt) for xt, *ps in zip(x.unbind(0), *slices)]
    if return_features or tap is not None:
        return torch.stack([o for o, _ in outs]), torch.stack([f for _, f in outs])
    return torch.stack(outs)


def tapped(model: nn.Module, tap: str) -> Callable[[Params, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``f(params, x) → (output, the input of submodule tap)`` for one task, for any model.

    ``f`` runs the model through ``functional_call`` with a forward pre-hook on ``model.get_submodule(tap)``
    registered for the duration of that call; the captured input leaves through ``f``'s return value (nothing
    is kept elsewhere), so ``f`` can be mapped over tasks by a loop or ``torch.func.vmap`` and differentiated
    like any output. The module must run exactly once per forward.

    Example:
        >>> out, fmap = tapped(conv4, "blocks.3.pool")(dict(conv4.named_parameters()), images)
    """
    try:
        module = model.get_submodule(tap)
    except AttributeError:
        raise ValueError(f"tap {tap!r}: {type(model).__name__} has no such submodule (give a name from "
                         "named_modules(), e.g. 'blocks.3.pool')") from None

    def f(params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[Any] = []
        handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0] if args else None))
        try:
            out = functional_call(model, params, (x,))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"tap {tap!r}: the module ran {len(seen)} times in one forward of "
                             f"{type(model).__name__}; tap a module that runs exactly once")
        if not isinstance(seen[0], torch.Tensor):
            raise TypeError(f"tap {tap!r}: the module's first positional input is not a tensor; tap a module "
                            "called as module(tensor, ...)")
        return out, seen[0]

    return f


def forward_single(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                   return_features: bool = False):
    """Run one task with the (un-batched) parameters ``params`` (through the registered batched forward, as
    one task, where the model's type has one: the learner's numbers, bit for bit)."""
    registered = batched_forward_of(model)
    if registered is not None:
        out = registered(model, {n: p.unsqueeze(0) for n, p in params.items()}, x.unsqueeze(0), return_features)
        return (out[0][0], out[1][0]) if return_features else out[0]
    kwargs = {"return_features": True} if return_features else {}
    return functional_call(model, dict(params), (x,), kwargs)


@contextlib.contextmanager
def recompute_per_task() -> Iterator[None]:
    """While active, :func:`forward_batched` splits its task dimension and checkpoints each task's forward.

    Why: a chunk of tasks that cannot be split (a plug-in's task group, :func:`metagrad.chunks.meta_backward`)
    may save more activations for backward than memory holds. Checkpointed, a task's forward keeps only its
    inputs; its activations are recomputed when the backward reaches them, so about one task's are alive at a
    time. ``use_reentrant=False`` checkpoints support the inner loop's gradients with ``create_graph`` (second
    order). Same values and gradients (one task per forward rounds like a meta-batch of one), about one more
    model forward per forward; a forward with side effects (a BatchNorm that tracks running statistics in
    training mode) has them again when recomputed.

    Example:
        >>> with recompute_per_task():
        ...     out = learner.meta_loss(batch)        # every model forward checkpointed per task
        >>> out.loss.backward()                       # recomputes them, task by task
    """
    token = _RECOMPUTE.set(True)
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


def _checkpointed_per_task(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                           return_features: bool, tap: str | None = None):
    """:func:`forward_batched` task by task, each a checkpoint of a one-task forward; outputs concatenated."""
    check_task_dims(params, x.shape[0])

    def one(task_params: dict[str, torch.Tensor], xt: torch.Tensor):
        token = _RECOMPUTE.set(False)   # the one-task forward itself runs plainly (also when recomputed)
        try:
            return forward_batched(model, task_params, xt, return_features, tap)
        finally:
            _RECOMPUTE.reset(token)

    # One unbind per tensor (see forward_per_task), each slice given back its task dimension of one.
    names, slices = list(params), [p.unbind(0) for p in params.values()]
    outs = [checkpoint(one, {n: p.unsqueeze(0) for n, p in zip(names, ps)}, xt.unsqueeze(0), use_reentrant=False)
            for xt, *ps in zip(x.unbind(0), *slices)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)
