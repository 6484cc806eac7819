"""Evaluation: the protocol (mean ± 95% CI over test tasks), and a saved run re-evaluated (:func:`evaluate_run`).

The objects come from :mod:`metagrad.build` (its builders are re-exported here, where they were first).

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
from . import data
from .build import (
    RunError,
    device_of,
    evaluation_learner,
    make_benchmark,
    make_learner,
    make_model,
    transfer_head,
)
from .data import Benchmark
from .learners import MAML
from .rundir import EVAL as EVAL_FILE
from .rundir import SCORES as SCORES_FILE
from .rundir import append_records, open_run, read_records, read_scores, record_scores, scores_key
from .runlock import locked

# The records' readers and writers live in metagrad.rundir; they are re-exported here, where they were first.


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
                 benchmark: str | None = None, data_root: str | None = None, ways: int | None = None,
                 inner_steps: Sequence[int] | None = None, head: str | None = None) -> list[dict[str, Any]]:
    """Evaluate a run's latest checkpoint, optionally on another benchmark with the same input shape.

    ``ways``: the evaluated episodes' number of ways (default: the benchmark's own fixed number, e.g. 20 for
    ``omniglot-lake20``, else the run's ``eval.ways``, else training's). ``head``: the head a classifier starts
    each task from (default: the run's ``eval.head``; "auto" is the trained head at training's ways and the
    support set's class prototypes at others, see :func:`metagrad.build.evaluation_learner`); the records say
    which. ``inner_steps``: the step counts scored after (default: the run's ``eval.inner_steps``, else its
    evaluation step count). The records are appended to the run's ``eval.json`` and returned.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} " + ("is not a directory" if run_dir.exists() else
                                                              "does not exist"))
    with locked(run_dir):   # one writer per run directory (metagrad.runlock)
        return _evaluate_run(open_run(run_dir), split, tasks, benchmark, data_root, ways, inner_steps, head)


def _evaluate_run(run_dir: Path, split: str, tasks: int | None, benchmark: str | None, data_root: str | None,
                  ways: int | None, inner_steps: Sequence[int] | None, head: str | None) -> list[dict[str, Any]]:
    state = ckpt.load_latest(run_dir)
    cfg = C.from_dict(state["config"])
    if head is not None and head not in C.HEADS:
        raise C.ConfigError(f"head: expected one of {', '.join(C.HEADS)}, got {head!r}")
    device = device_of(cfg.train.device)
    ways = ways or (data.fixed_ways(benchmark) if benchmark else None) or cfg.eval.ways
    bench = make_benchmark(cfg, split, cfg.eval.seed, cfg.eval.meta_batch_size or cfg.train.meta_batch_size,
                           name=benchmark, root=data_root, ways=ways)
    info = state.get("info", {})
    if benchmark not in (None, cfg.benchmark.name):
        theirs = {"x_shape": list(bench.x_shape), "task_type": bench.task_type}
        mismatch = [f"{k} {info.get(k)} vs {v}" for k, v in theirs.items() if info.get(k) != v]
        if mismatch:
            raise RunError(f"cannot evaluate a model trained on {cfg.benchmark.name} on {benchmark}: "
                           f"{'; '.join(mismatch)} (cross-domain evaluation needs the same input shape and task type)")
    trained_ways = int(info.get("out_dim", cfg.benchmark.ways))
    learner, extra = evaluation_learner(cfg, bench, state["learner"], trained_ways, head)
    learner = learner.to(device)
    n_tasks = tasks or cfg.eval.tasks
    limit = bench.num_tasks                         # a fixed set of tasks (Lake's 20 runs): never repeat one
    if limit is not None:
        if tasks is not None and tasks > limit:
            raise RunError(f"{bench.name} has {limit} tasks, --tasks {tasks} asks for more: use --tasks {limit} "
                           "or leave it out")
        n_tasks = min(n_tasks, limit)
    steps = list(inner_steps) if inner_steps else cfg.eval_steps(bench.task_type)
    records = evaluate(learner, bench, n_tasks, steps, device,
                       benchmark=bench.name, iteration=int(state["iteration"]), **extra)
    append_records(run_dir, records)
    return records


__all__ = [
    "EVAL_FILE",
    "SCORES_FILE",
    "RunError",
    "append_records",
    "device_of",
    "evaluate",
    "evaluate_run",
    "format_table",
    "make_benchmark",
    "make_learner",
    "make_model",
    "mean_ci95",
    "per_task_metric",
    "read_records",
    "read_scores",
    "record_scores",
    "scores_key",
    "transfer_head",
]
