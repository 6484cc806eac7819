"""Build in one place: a config → its benchmark, model and learner, for training, evaluation, diagnostics, studies
and :func:`metagrad.load` alike.

The model and the benchmark are looked up by name in their registries, by import path ``package.module:factory``
or by entry point (:mod:`metagrad.entry`); the model gets its ``model.kwargs``. A classifier evaluated at other
ways than it was trained with gets the head ``eval.head`` names (:func:`evaluation_learner`).

Example:
    >>> cfg = metagrad.config.resolve("omniglot-5w1s", ["model.kwargs.width=32"])
    >>> bench = make_benchmark(cfg, "train", seed=0, meta_batch_size=4)
    >>> learner = make_learner(cfg, bench)                      # Conv4(width 32) inside MAML, plug-ins attached
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import config as C
from . import data, entry, methods, models
from .data import Benchmark
from .learners import MAML, ProtoNet, embedding_of


class RunError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, or holds another run); one line."""


def make_benchmark(cfg: C.Config, split: str, seed: int, meta_batch_size: int, name: str | None = None,
                   root: str | None = None, ways: int | None = None) -> Benchmark:
    """The config's benchmark (or ``name``, for cross-domain evaluation) for one split; ``ways`` overrides
    the config's number of ways (a cross-domain benchmark with other ways, e.g. Lake's 20-way runs). Splits
    other than "train" take ``eval.queries`` query samples per class when it is set."""
    b = cfg.benchmark
    same = name in (None, b.name)
    # The run's own data root and extra arguments belong to its benchmark, not to a cross-domain one.
    kwargs = dict(b.kwargs) if same else {}
    if b.image_size is not None:
        kwargs["image_size"] = b.image_size
    queries = b.queries if split == "train" or cfg.eval.queries is None else cfg.eval.queries
    takes = data.arguments(name or b.name)
    unknown = [k for k in kwargs if takes is not None and k not in takes]
    if unknown:  # refused by name here: a TypeError from inside the benchmark stays a TypeError (a bug)
        raise C.ConfigError(f"benchmark {name or b.name!r} takes no argument {unknown[0]!r} (it takes: "
                            f"{', '.join(takes or ())}): check benchmark.kwargs / image_size")
    return data.create(name or b.name, split=split, ways=ways or b.ways, shots=b.shots, queries=queries,
                       meta_batch_size=meta_batch_size, seed=seed, root=root or (b.data_root if same else None),
                       **kwargs)


def make_model(cfg: C.Config, bench: Benchmark) -> torch.nn.Module:
    """The base network, sized to the benchmark (:func:`metagrad.models.create` with ``model.kwargs``).

    A key of the old top-level model settings (``model.hidden``, ``model.width``, ...; read into
    ``model.kwargs``) that this model does not take is ignored, as it always was."""
    name = models.auto_name(bench) if cfg.model.name == "auto" else cfg.model.name
    kwargs = dict(cfg.model.kwargs)
    takes = entry.parameters(models.factory(name))
    if takes is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in takes or k not in C.LEGACY_MODEL_KEYS}
    return models.wrap(cfg.model.wrap, models.create(name, bench, **kwargs))


def make_learner(cfg: C.Config, bench: Benchmark, head: str = "trained") -> MAML | ProtoNet:
    """Model, plug-ins (by registry key, with ``plugin_args``) and the learner (``cfg.learner``) around them:
    MAML, or ProtoNet on the model's body (its last Linear removed, :func:`~metagrad.learners.embedding_of`).
    ``head``: MAML's task head ("trained" or "prototype", see :class:`~metagrad.learners.MAML`)."""
    # methods.create checks the arguments against the plug-in's signature (an unknown or mistyped keyword is a
    # one-line ConfigError naming it), so a TypeError from inside a plug-in is a bug and is left to surface.
    plugins = [methods.create(key, **cfg.plugin_args.get(key, {})) for key in cfg.plugins]
    if cfg.learner == "protonet":
        if bench.task_type != "classification":
            raise C.ConfigError(f"learner=protonet classifies; {bench.name} is {bench.task_type}: use learner=maml")
        return ProtoNet(embedding_of(make_model(cfg, bench)), plugins=plugins)
    mc = cfg.maml
    return MAML(make_model(cfg, bench), inner_lr=mc.inner_lr, inner_steps=mc.inner_steps,
                eval_inner_steps=mc.eval_inner_steps, first_order=mc.first_order, adapt=mc.adapt,
                loss="mse" if bench.task_type == "regression" else "cross_entropy", plugins=plugins,
                learn_inner_lr=mc.learn_inner_lr, multi_step_loss=mc.multi_step_loss,
                msl_iterations=mc.msl_iterations, head=head)


def evaluation_learner(cfg: C.Config, bench: Benchmark, weights: dict[str, torch.Tensor], trained_ways: int,
                       head: str | None = None) -> tuple[MAML | ProtoNet, dict[str, Any]]:
    """The learner that scores ``bench`` with trained ``weights`` (a learner's state dict), and what its records
    say about the head: ``{"head"}`` for a classifier, with ``"ways"`` and ``"trained_ways"`` at other ways.

    ``head`` (default ``eval.head``): "trained" (the trained rows; training's ways only), "prototype" (every task
    starts from its support set's class prototypes, Proto-MAML), "mean" (every row the mean of the trained rows;
    other ways only) or "auto" (trained at training's ways, else prototype). A ProtoNet classifies with its
    support prototypes at any ways: its head is "prototype" (auto or prototype only).

    Raises:
        ConfigError: a head that cannot serve these ways, or ways asked of a regression benchmark.
        RunError: weights that do not fit the model built for ``bench``.
    """
    ways = bench.out_dim
    if bench.task_type != "classification":
        learner = make_learner(cfg, bench)
        _load(learner, weights, bench)
        return learner, {}
    head = head_for(head or cfg.eval.head, ways, trained_ways, cfg.learner)
    if cfg.learner == "protonet":   # no tensor indexed by class: the weights fit any ways as they are
        learner = make_learner(cfg, bench)
        _load(learner, weights, bench)
        other = {"ways": ways, "trained_ways": trained_ways} if ways != trained_ways else {}
        return learner, {"head": head, **other}
    learner = make_learner(cfg, bench, head="prototype" if head == "prototype" else "trained")
    extra: dict[str, Any] = {"head": head}
    if ways != trained_ways:  # the rows start as the mean of the trained ones (a prototype head replaces them)
        weights = transfer_head(weights, learner.state_dict(), trained_ways, ways)
        extra.update(ways=ways, trained_ways=trained_ways)
    _load(learner, weights, bench)
    return learner, extra


def head_for(head: str, ways: int, trained_ways: int, learner: str = "maml") -> str:
    """The head ``eval.head`` names for ``ways``-way tasks of a ``trained_ways``-way classifier ("auto" resolved);
    a ProtoNet's is always "prototype".

    Raises:
        ConfigError: "trained" at other ways, or "mean" at training's (it would only blur the trained rows), or
            either for a ProtoNet.
    """
    if learner == "protonet":
        if head not in ("auto", "prototype"):
            raise C.ConfigError(f"eval.head={head}: a ProtoNet classifies by its support prototypes at any ways; "
                                "use auto or prototype")
        return "prototype"
    if head == "auto":
        head = "trained" if ways == trained_ways else "prototype"
    if head == "trained" and ways != trained_ways:
        raise C.ConfigError(f"eval.head=trained: the model was trained {trained_ways}-way, these tasks are {ways}-way; "
                            "use eval.head=prototype (or mean, or auto)")
    if head == "mean" and ways == trained_ways:
        raise C.ConfigError(f"eval.head=mean makes a head for other ways than training's ({trained_ways}): use "
                            "trained or prototype at these ways")
    return head


def _load(learner: MAML, weights: dict[str, torch.Tensor], bench: Benchmark) -> None:
    try:
        learner.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"the checkpoint does not fit the model built for {bench.name}: "
                       f"{str(e).splitlines()[0]}") from e


def transfer_head(trained: dict[str, torch.Tensor], target: dict[str, torch.Tensor], trained_ways: int,
                  ways: int) -> dict[str, torch.Tensor]:
    """A learner's state dict trained for ``trained_ways`` classes, made to fit one built for ``ways``.

    Every tensor indexed by class (the head's weight and bias, their per-element inner rates, a plug-in's
    class-sized head) gets ``ways`` rows, each the mean of its trained rows; everything else must fit as it is.
    MAML's initial head is permutation-sensitive while the labels of an episode are an arbitrary permutation;
    one shared row is its permutation-invariant form (Ye & Chao, "How to train your MAML to excel in few-shot
    classification", ICLR 2022). With identical rows the loss gradient reaching the body is zero at the first
    step (Σ_c (p_c − y_c)·w = 0), so the first step moves the head alone: the prototype head avoids that.
    """
    out = {}
    for key, want in target.items():
        have = trained.get(key)
        if have is None:
            raise RunError(f"the checkpoint has no {key!r}: it was written by another model or plug-in set")
        if have.shape == want.shape:
            out[key] = have
        elif have.dim() >= 1 and have.shape[0] == trained_ways and have.shape[1:] == want.shape[1:] \
                and want.shape[0] == ways:
            out[key] = have.float().mean(dim=0, keepdim=True).to(have.dtype).expand_as(want).clone()
        else:
            raise RunError(f"cannot fit {key!r} of shape {tuple(have.shape)} to {tuple(want.shape)} for "
                           f"{ways}-way episodes: only tensors indexed by class can change size")
    return out


def device_of(name: str) -> torch.device:
    """``train.device`` as a torch device ("auto": cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise C.ConfigError(f"train.device: {name!r} is not a device (cpu, cuda, cuda:N, auto)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError(f"train.device={name} but CUDA is not available here: use cpu or auto")
    return device


# ------------------------------------------------------------------------------------------------ loading a run
@dataclass
class Run:
    """A trained run directory, loaded (:func:`load`): its config, and its learner with the weights of its latest
    checkpoint and its plug-ins attached, in eval mode, ready for ``adapt``, ``predict`` and ``evaluate``."""

    path: Path
    config: C.Config
    learner: MAML | ProtoNet
    iteration: int               # meta-updates done at the checkpoint
    trained_ways: int            # out_dim of training's benchmark (classes per task, for a classifier)
    device: torch.device

    def benchmark(self, split: str = "test", **overrides: Any) -> Benchmark:
        """The run's benchmark for ``split``: its evaluation stream (``eval.seed``, ``eval.queries``, ``eval``'s
        meta-batch size) unless ``overrides`` say otherwise: ``seed``, ``meta_batch_size``, or any
        ``benchmark.*`` key (``ways``, ``shots``, ``queries``, ``data_root``, ``image_size``, ``kwargs``, ``name``).

        Example:
            >>> run.benchmark("test", ways=20, data_root="data/omniglot")
        """
        cfg = copy.deepcopy(self.config)
        e = cfg.eval
        seed = overrides.pop("seed", e.seed if split != "train" else cfg.train.seed)
        batch = overrides.pop("meta_batch_size", e.meta_batch_size or cfg.train.meta_batch_size)
        if "queries" in overrides:
            e.queries = None
        for key, value in overrides.items():
            C.set_value(cfg, f"benchmark.{key}", value)
        C.validate(cfg)
        return make_benchmark(cfg, split, seed, batch)

    def learner_for(self, bench: Benchmark, head: str | None = None) -> MAML | ProtoNet:
        """A learner with these weights for ``bench``'s ways (``head`` as ``eval.head``: for other ways than
        training's, "auto" starts each task from its support prototypes); ``.learner`` at training's ways."""
        weights = self.learner.state_dict()
        learner, _ = evaluation_learner(self.config, bench, weights, self.trained_ways, head)
        return learner.to(self.device).eval()


def load(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by ``metagrad train`` (or :func:`metagrad.train.train`) for use.

    Rebuilds the benchmark's model and the learner from the run's config, through the same builder as training,
    so a run on the user's own model or benchmark (an import path or an entry point) loads the same way when
    that code can be imported. Reads only; a run still training may be loaded (its latest good checkpoint).

    Example:
        >>> run = metagrad.load("runs/omniglot")
        >>> batch = run.benchmark("test").batch(0)
        >>> fast = run.learner.adapt(batch.support_x[0], batch.support_y[0])
        >>> pred = run.learner.predict(fast, batch.query_x[0]).argmax(-1)
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run directory {str(path)!r} does not exist")
    state = ckpt.load_latest(path)
    cfg = C.from_dict(state["config"])
    info = state.get("info", {})
    bench = make_benchmark(cfg, cfg.eval.split, cfg.eval.seed, cfg.eval.meta_batch_size or cfg.train.meta_batch_size)
    trained_ways = int(info.get("out_dim", bench.out_dim))
    if bench.out_dim != trained_ways:   # eval.ways differs: size the model as training did
        bench = make_benchmark(cfg, "train", cfg.train.seed, cfg.train.meta_batch_size)
    learner = make_learner(cfg, bench)
    _load(learner, state["learner"], bench)
    device = torch.device(device)
    return Run(path, cfg, learner.to(device).eval(), int(state["iteration"]), trained_ways, device)


__all__ = ["Run", "RunError", "device_of", "evaluation_learner", "head_for", "load", "make_benchmark", "make_learner",
           "make_model", "transfer_head"]
