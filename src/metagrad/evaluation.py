"""Evaluation: a run's learner built from its config, and the protocol (mean ± 95% CI over test tasks).

:func:`make_learner` and :func:`make_benchmark` turn a :class:`~metagrad.config.Config` into objects, for
training and for re-evaluating a saved run alike.

Per task the metric is the query accuracy (classification) or the query MSE (regression); a record reports
the mean over ``n`` tasks and the 95% confidence interval ``1.96 · std / √n`` (std over tasks, as numpy's
default ``ddof=0``, the convention of the MAML reference code). That interval describes one trained model; a
comparison of methods takes the seed as its unit (:mod:`metagrad.stats`) and needs the per-task scores, which
every record keeps in the run's ``scores.json`` (key ``scores_key``), with ``task_set``: a digest of the
evaluated tasks' tensors. Every run of a benchmark with the same ``eval`` settings scores the same tasks (the
streams are seeded by ``eval.seed``), and equal digests prove it, so a report can pair them.

Example:
    >>> records = evaluate(learner, test_bench, tasks=600, inner_steps=[0, 1, 10])
    >>> print(format_table(records))
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import config as C
from . import data, methods, models
from .data import Benchmark
from .learners import MAML, ProtoNet, embedding_of
from .rundir import EVAL as EVAL_FILE
from .rundir import SCORES as SCORES_FILE
from .rundir import append_records, open_run, read_records, read_scores, record_scores, scores_key
from .runlock import locked

# The records' readers and writers live in metagrad.rundir; they are re-exported here, where they were first.


class RunError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, or holds another run); one line."""


# ------------------------------------------------------------------------------------------------ builders
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
    """The base network, sized to the benchmark: ``out_dim = ways`` for classification, inputs from ``x_shape``
    (:func:`metagrad.models.create`, with the config's arguments of that model)."""
    m = cfg.model
    name = models.auto_name(bench) if m.name == "auto" else m.name
    args = {"mlp": {"hidden": tuple(m.hidden)}, "conv4": {"width": m.width, "bias": m.bias, "pool": m.pool},
            "gcn": {"hidden": tuple(m.hidden), "dropout": m.dropout}}.get(name, {})
    return models.wrap(m.wrap, models.create(name, bench, **args))


def make_learner(cfg: C.Config, bench: Benchmark) -> MAML | ProtoNet:
    """Model, plug-ins (by registry key, with ``plugin_args``) and the learner (``cfg.learner``) around them:
    MAML, or ProtoNet on the model's body (its last Linear removed, :func:`~metagrad.learners.embedding_of`)."""
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
                msl_iterations=mc.msl_iterations)


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


# ------------------------------------------------------------------------------------------------ protocol


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96·std/√n`` of per-task values."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    std = v.std(unbiased=False).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * std / math.sqrt(n)


def per_task_metric(learner: MAML, bench: Benchmark, tasks: int, inner_steps: Sequence[int],
                    device: torch.device | str = "cpu", digest: Any = None) -> dict[int, torch.Tensor]:
    """Per-task accuracy or MSE ``[tasks]`` for each inner-step count, on the first ``tasks`` tasks of ``bench``.

    The learner is put in eval mode (dropout off) for the duration and restored afterwards. ``digest``: a
    ``hashlib`` object fed with every evaluated task's tensors (a record's ``task_set``).
    """
    was_training = learner.training
    learner.eval()
    found: dict[int, list[torch.Tensor]] = {k: [] for k in inner_steps}
    try:
        for batch in bench.tasks(tasks):
            if digest is not None:
                _feed(digest, batch)
            batch = batch.to(device)
            for k in inner_steps:
                out = learner.evaluate(batch, inner_steps=k)
                metric = out.task_accuracies if out.task_accuracies is not None else out.task_losses
                found[k].append(metric.detach().cpu())
    finally:
        learner.train(was_training)
    return {k: torch.cat(v) for k, v in found.items()}


def _feed(digest: Any, batch: Any) -> None:
    for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())


def evaluate(learner: MAML, bench: Benchmark, tasks: int, inner_steps: Sequence[int],
             device: torch.device | str = "cpu", **extra: Any) -> list[dict[str, Any]]:
    """Evaluation records, one per step count: ``{"split", "metric", "inner_steps", "tasks", "mean", "ci95",
    "task_set", "scores", **extra}``; ``scores`` is the list of per-task values (moved to ``scores.json`` by
    :func:`append_records`), ``task_set`` the digest of the evaluated tasks."""
    metric = "accuracy" if bench.task_type == "classification" else "mse"
    digest = hashlib.blake2b(digest_size=8)
    records = []
    for k, values in per_task_metric(learner, bench, tasks, inner_steps, device, digest).items():
        mean, ci = mean_ci95(values)
        records.append({"split": bench.split, "metric": metric, "inner_steps": int(k), "tasks": int(values.numel()),
                        "mean": mean, "ci95": ci, "task_set": digest.hexdigest(), **extra,
                        "scores": [float(f"{v:.8g}") for v in values.double().tolist()]})
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of evaluation records (accuracy shown in percent)."""
    head = f"{'benchmark':<14} {'split':<6} {'metric':<9} {'steps':>5} {'tasks':>6} {'mean ± 95% CI':>22}"
    lines = [head, "-" * len(head)]
    for r in records:
        scale, unit = (100.0, "%") if r["metric"] == "accuracy" else (1.0, "")
        value = f"{r['mean'] * scale:.4f} ± {r['ci95'] * scale:.4f}{unit}"
        lines.append(f"{r.get('benchmark', ''):<14} {r['split']:<6} {r['metric']:<9} {r['inner_steps']:>5} "
                     f"{r['tasks']:>6} {value:>22}")
    return "\n".join(lines)


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "test", tasks: int | None = None,
                 benchmark: str | None = None, data_root: str | None = None,
                 ways: int | None = None, inner_steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Evaluate a run's latest checkpoint, optionally on another benchmark with the same input shape.

    ``ways``: the evaluated episodes' number of ways when it differs from training's (default: the benchmark's
    own fixed number, e.g. 20 for ``omniglot-lake20``, else training's). A classifier trained with other ways
    gets a head of the new size whose rows all start as the mean of the trained rows (see
    :func:`transfer_head`). ``inner_steps``: the step counts scored after (default: the run's
    ``eval.inner_steps``, else its evaluation step count). The records are appended to the run's ``eval.json``
    and returned.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} " + ("is not a directory" if run_dir.exists() else
                                                              "does not exist"))
    with locked(run_dir):   # one writer per run directory (metagrad.runlock)
        return _evaluate_run(open_run(run_dir), split, tasks, benchmark, data_root, ways, inner_steps)


def _evaluate_run(run_dir: Path, split: str, tasks: int | None, benchmark: str | None, data_root: str | None,
                  ways: int | None, inner_steps: Sequence[int] | None) -> list[dict[str, Any]]:
    state = ckpt.load_latest(run_dir)
    cfg = C.from_dict(state["config"])
    device = device_of(cfg.train.device)
    ways = ways or (data.fixed_ways(benchmark) if benchmark else None)
    bench = make_benchmark(cfg, split, cfg.eval.seed, cfg.eval.meta_batch_size or cfg.train.meta_batch_size,
                           name=benchmark, root=data_root, ways=ways)
    info = state.get("info", {})
    if benchmark not in (None, cfg.benchmark.name):
        theirs = {"x_shape": list(bench.x_shape), "task_type": bench.task_type}
        mismatch = [f"{k} {info.get(k)} vs {v}" for k, v in theirs.items() if info.get(k) != v]
        if mismatch:
            raise RunError(f"cannot evaluate a model trained on {cfg.benchmark.name} on {benchmark}: "
                           f"{'; '.join(mismatch)} (cross-domain evaluation needs the same input shape and task type)")
    trained_ways = int(info.get("out_dim", bench.out_dim))
    extra: dict[str, Any] = {}
    try:
        learner = make_learner(cfg, bench).to(device)
        weights = state["learner"]
        if bench.task_type == "classification" and bench.out_dim != trained_ways:
            fitted = transfer_head(weights, learner.state_dict(), trained_ways, bench.out_dim)
            # A learner with no tensor indexed by class (ProtoNet: prototypes from the support set) fits as it is.
            resized = any(fitted[k].shape != weights[k].shape for k in fitted)
            extra = {"ways": bench.out_dim, "trained_ways": trained_ways,
                     "head": "mean of the trained rows" if resized else "support prototypes"}
            weights = fitted
        learner.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"the checkpoint does not fit the model built for {bench.name}: "
                       f"{str(e).splitlines()[0]}") from e
    n_tasks = tasks or cfg.eval.tasks
    limit = bench.num_tasks                         # a fixed set of tasks (Lake's 20 runs): never repeat one
    if limit is not None:
        if tasks is not None and tasks > limit:
            raise RunError(f"{bench.name} has {limit} tasks, --tasks {tasks} asks for more: use --tasks {limit} "
                           "or leave it out")
        n_tasks = min(n_tasks, limit)
    steps = list(inner_steps) if inner_steps else cfg.eval_steps(bench.task_type)
    records = evaluate(learner, bench, n_tasks, steps, device,
                       benchmark=bench.name, iteration=int(state["iteration"]))
    records = [{**r, **extra} for r in records]
    append_records(run_dir, records)
    return records


def transfer_head(trained: dict[str, torch.Tensor], target: dict[str, torch.Tensor], trained_ways: int,
                  ways: int) -> dict[str, torch.Tensor]:
    """A learner's state dict trained for ``trained_ways`` classes, made to fit one built for ``ways``.

    Every tensor indexed by class (the head's weight and bias, their per-element inner rates, a plug-in's
    class-sized head) gets ``ways`` rows, each the mean of its trained rows; everything else must fit as it is.
    MAML's initial head is permutation-sensitive while the labels of an episode are an arbitrary permutation;
    one shared row is its permutation-invariant form (Ye & Chao, "How to train your MAML to excel in few-shot
    classification", ICLR 2022), and the inner steps then pull each class's row towards its support examples.
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


__all__ = [
    "EVAL_FILE",
    "SCORES_FILE",
    "append_records",
    "evaluate",
    "evaluate_run",
    "format_table",
    "mean_ci95",
    "per_task_metric",
    "read_records",
    "read_scores",
    "record_scores",
    "scores_key",
]
