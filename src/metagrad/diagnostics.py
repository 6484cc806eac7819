"""Post-training diagnostics of a run, for the report: ``diagnostics.json`` in the run directory.

What the papers argue with, measured on the first ``tasks`` test tasks of the run's own evaluation stream:

- per-sample query losses after each reported inner-step count and after the training step count (Meta-GNA: a
  broad per-sample loss distribution is what the Arbiter narrows),
- per-layer inner-gradient norms at the first inner step of evaluation (CxGrad: the head's gradient dwarfs the
  backbone's),
- for regression benchmarks with a known function, the fitted curves of the first four test tasks.

It is derived data: computed from ``checkpoint.pt`` and ``config.json`` alone, so it can be (re)made for any run,
old or new, by :func:`write_diagnostics` (the study runner calls it after training, the report when it is missing).

Example:
    >>> diag = write_diagnostics("runs/sin10")        # → runs/sin10/diagnostics.json
    >>> diag["sample_losses"]["10"][0]                # per-sample query losses of test task 0 after 10 steps
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import config as C
from . import rundir
from .build import device_of, make_benchmark, make_learner
from .rundir import DIAGNOSTICS as DIAG_FILE
from .rundir import read_diagnostics
from .runlock import locked

FIT_TASKS = 4


def write_diagnostics(run_dir: str | Path, tasks: int = 100) -> dict[str, Any]:
    """Compute the diagnostics of a run's latest checkpoint on its test split and write ``diagnostics.json``.

    ``tasks``: the first test tasks used, at most the run's ``eval.tasks``. Holds the run's lock
    (:mod:`metagrad.runlock`) while it reads and writes.
    """
    if not Path(run_dir).is_dir():
        raise ckpt.CheckpointError(f"no checkpoint in {str(run_dir)!r} (it is not a directory)")
    with locked(run_dir):
        return _write_diagnostics(rundir.open_run(run_dir), tasks)


def _write_diagnostics(run_dir: Path, tasks: int) -> dict[str, Any]:
    state = ckpt.load_latest(run_dir)
    cfg = C.from_dict(state["config"])
    device = device_of(cfg.train.device)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        e = cfg.eval
        bench = make_benchmark(cfg, e.split, e.seed, e.meta_batch_size or cfg.train.meta_batch_size)
        tasks = min(tasks, e.tasks)
        learner = make_learner(cfg, bench).to(device)
        learner.load_state_dict(state["learner"])
        learner.eval()
        steps = diagnostic_steps(cfg, bench.task_type)
        samples: dict[str, list[list[float]]] = {str(k): [] for k in steps}
        metric: dict[str, list[float]] = {str(k): [] for k in steps}
        grad_norms: dict[str, list[float]] = {}
        for batch in bench.tasks(tasks):
            batch = batch.to(device)
            for k in steps:
                out = learner.evaluate(batch, inner_steps=k)
                samples[str(k)] += out.sample_losses.cpu().double().tolist()
                per_task = out.task_accuracies if out.task_accuracies is not None else out.task_losses
                metric[str(k)] += per_task.cpu().double().tolist()
                if k == max(steps) and k > 0:
                    for name, v in out.diagnostics.get("inner_grad_norm", {}).items():
                        grad_norms.setdefault(name, []).append(float(v))
        diag: dict[str, Any] = {
            "iteration": int(state["iteration"]), "split": e.split, "benchmark": bench.name,
            "task_type": bench.task_type, "tasks": len(next(iter(metric.values()))),
            "metric": "accuracy" if bench.task_type == "classification" else "mse",
            "sample_losses": samples, "task_metric": metric,
            "inner_grad_norm": {n: sum(v) / len(v) for n, v in grad_norms.items()},
        }
        if bench.task_type == "regression" and hasattr(bench, "true_function"):
            diag["fits"] = _fits(learner, bench, sorted(set(steps) | {0}), device)
    finally:
        torch.set_num_threads(threads)
    rundir.write_diagnostics(run_dir, diag)
    return diag


def diagnostic_steps(cfg: C.Config, task_type: str) -> list[int]:
    """The inner-step counts the diagnostics are taken after: the evaluation's and the training's."""
    return sorted(set(cfg.eval_steps(task_type)) | {cfg.train_steps})


def _fits(learner: Any, bench: Any, steps: list[int], device: torch.device) -> list[dict[str, Any]]:
    """True function, support points and predictions after each step count for the first test tasks."""
    batch = bench.batch(0)
    fits = []
    for t in range(min(FIT_TASKS, len(batch))):
        sx, sy = batch.support_x[t], batch.support_y[t]
        xs = torch.cat([sx, batch.query_x[t]]).flatten()
        pad = 0.1 * float(xs.max() - xs.min())
        grid = torch.linspace(float(xs.min()) - pad, float(xs.max()) + pad, 200)
        pred = {}
        for k in steps:
            fast = learner.adapt(sx.to(device), sy.to(device), inner_steps=k, create_graph=False)
            with torch.no_grad():
                pred[str(k)] = learner.predict(fast, grid.reshape(-1, 1).to(device)).flatten().cpu().tolist()
        fits.append({"x": grid.tolist(), "true": bench.true_function(0, grid)[t].flatten().tolist(),
                     "support_x": sx.flatten().tolist(), "support_y": sy.flatten().tolist(), "pred": pred})
    return fits


__all__ = ["DIAG_FILE", "diagnostic_steps", "read_diagnostics", "write_diagnostics"]
