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

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]

# model class → its task-batched forward ``f(model, params, x, return_features)``; see register_batched.
_BATCHED: dict[type, Callable[..., Any]] = {}
# model class → ``taps(model)``: the module names whose input its batched forward returns itself (``tap=name``).
_TAPS: dict[type, Callable[[nn.Module], Collection[str]]] = {}


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


def meta_params(model: nn.Module) -> Params:
    """The model's parameters θ by name, in ``named_parameters()`` (input → output) order."""
    return dict(model.named_parameters())


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


class PrecomputedGrad(torch.autograd.Function):
    """Per-task values ``[T]`` whose gradients with respect to ``inputs`` were taken ahead of the backward.

    ``rows[i]`` is ``[T, *inputs[i].shape]``: row t is the gradient of ``seed · value_t`` (None: no gradient).
    ``shared[j]`` is the gradient of ``seed · Σ_t value_t`` w.r.t. a tensor every task shares (a learned inner
    rate): exact when the values are weighted uniformly (``mean``, ``sum``), refused otherwise. The backward only
    weights the rows by the incoming per-task weights (for weights equal to ``seed``, the common ``mean``, it is
    the plain sum of the rows, bit for bit what autograd gives through a whole-batch graph). This is how
    :class:`metagrad.MAML` frees each task chunk's graph as soon as its meta-gradient is known
    (``memory="lean"``). Not differentiable twice.
    """

    @staticmethod
    def forward(ctx, values, seed, rows, shared, *inputs):  # type: ignore[override]
        ctx.seed, ctx.rows, ctx.shared = seed, rows, shared
        return values.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, weights):  # type: ignore[override]
        seeded = bool((weights == ctx.seed).all())
        grads: list[torch.Tensor | None] = []
        for r in ctx.rows:
            if r is None:
                grads.append(None)
            elif seeded:
                grads.append(r.sum_to_size(r.shape[1:]))
            else:
                grads.append(torch.tensordot(weights.to(r.dtype) / ctx.seed, r, 1))
        if any(s is not None for s in ctx.shared):
            if not bool((weights == weights[0]).all()):
                raise RuntimeError("MAML(memory='lean') gives the gradient of uniformly weighted task losses "
                                   "(out.loss); for other weightings with learned shared tensors use memory='graph'")
            scale = 1.0 if seeded else weights[0] / ctx.seed
            grads += [None if s is None else (s if seeded else scale.to(s.dtype) * s) for s in ctx.shared]
        else:
            grads += [None] * len(ctx.shared)
        return (None, None, None, None, *grads)


def saved_bytes() -> tuple[Any, list[int]]:
    """A ``saved_tensors_hooks`` context that adds up the bytes autograd saves (distinct storages), and the
    one-element list it adds them to: how large a graph is, measured while it is built."""
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in seen and key != 0:
                seen.add(key)
                total[0] += st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            pass
        # Detached: a node that saves its own output would otherwise hold that output, which holds the node
        # (a reference cycle through C++ that nothing collects).
        return t.detach()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total
