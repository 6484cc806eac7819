"""Meta-training of a run directory from a :class:`~metagrad.config.Config`: the loop, metrics, resume.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
iteration, append-only), ``checkpoint.pt`` (see :mod:`metagrad.checkpoint`), ``eval.json`` (evaluation
records) and ``curves.png``. Batch ``i`` of a benchmark is a pure function of (seed, split, i), so resuming
continues at the checkpoint's iteration with the RNG and optimiser states restored, and the trajectory is
identical, bit for bit, to an uninterrupted run.

Example:
    >>> cfg = metagrad.config.resolve("sinusoid-10shot", ["train.iterations=500"])
    >>> result = train(cfg, "runs/sin10")
    >>> print(format_table(result.records))
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import config as C
from .data import Benchmark
from .evaluation import (
    RunError,
    append_records,
    device_of,
    evaluate,
    make_benchmark,
    make_learner,
    per_task_metric,
    read_records,
)
from .maml import MAML

RUN_FILES = ("config.json", ckpt.FILENAME, "metrics.jsonl", "eval.json")
# Keys that may change when a run is resumed: they do not alter the training trajectory.
RESUMABLE = ("train.iterations", "train.device", "train.threads", "train.checkpoint_every", "benchmark.data_root")


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    iteration: int                                   # meta-updates done
    records: list[dict[str, Any]] = field(default_factory=list)  # the final evaluation (empty if skipped)
    plot: Path | None = None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------ metrics
class Meter:
    """Averages of the scalars of every iteration since the last log line (float64 tensors: exact on resume)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if v is None:
                continue
            v = torch.as_tensor(v).detach()
            if v.numel() == 1:
                self.sums[k] = self.sums.get(k, 0) + v.double().reshape(())
            elif v.numel() <= 64:  # small tensor diagnostics (e.g. per-step values): logged as lists, last value
                self.last[k] = v
        self.count += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: (s / max(self.count, 1)).item() for k, s in self.sums.items()}
        out.update({k: v.cpu().tolist() for k, v in self.last.items()})
        return out

    def reset(self) -> None:
        self.sums, self.last, self.count = {}, {}, 0

    def state_dict(self) -> dict[str, Any]:
        cpu = {k: v.cpu() for k, v in self.sums.items()}
        return {"sums": cpu, "last": {k: v.cpu() for k, v in self.last.items()}, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.last = dict(state["last"])
        self.count = int(state["count"])


def flatten_diagnostics(diag: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"inner_grad_norm": {"layers.0.weight": t}}`` → ``{"inner_grad_norm/layers.0.weight": t}``."""
    flat: dict[str, Any] = {}
    for k, v in diag.items():
        if isinstance(v, dict):
            flat.update(flatten_diagnostics(v, f"{prefix}{k}/"))
        elif isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = v
    return flat


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics lines up to ``iteration`` (drops lines logged after the checkpoint, and a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class _Session:
    """Everything one training session works on, built and checked before the run directory is touched."""

    bench: Benchmark
    val_bench: Benchmark | None
    learner: MAML
    opt: torch.optim.Optimizer
    meter: Meter
    start: int = 0            # iterations already done (resume)
    wall: float = 0.0         # seconds of training in earlier sessions
    info: dict[str, Any] = field(default_factory=dict)


def train(config: C.Config, out_dir: str | os.PathLike[str], resume: bool = False, progress: bool = True,
          callback: Callable[[int, dict[str, Any]], None] | None = None, plot: bool = True) -> RunResult:
    """Meta-train ``config`` into ``out_dir``, then evaluate on ``config.eval`` and plot.

    Args:
        config: a resolved config (:func:`metagrad.config.resolve`).
        out_dir: the run directory; it must not hold a run unless ``resume``.
        resume: continue from ``out_dir``'s checkpoint; only the keys in ``RESUMABLE`` (and ``eval.*``) may
            differ from the saved config, e.g. raise ``train.iterations`` to train longer.
        progress: show a progress bar (also off when stderr is not a terminal).
        callback: called as ``callback(iteration, record)`` after every logged iteration, ``record`` being
            the metrics line (e.g. to stop early by raising; the last checkpoint stays resumable).
        plot: write ``curves.png`` at the end.

    Returns:
        The run directory, iterations done, the final evaluation records and the plot path.
    """
    run_dir, cfg, device = Path(out_dir), config, device_of(config.train.device)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        s = _session(cfg, run_dir, resume, device)
        _loop(cfg, run_dir, s, device, progress, callback)
        return _finish(cfg, run_dir, s.learner, max(s.start, cfg.train.iterations), device, plot)
    finally:
        torch.set_num_threads(threads)


def _session(cfg: C.Config, run_dir: Path, resume: bool, device: torch.device) -> _Session:
    state = _open_run(run_dir, cfg, resume)
    seed_everything(cfg.train.seed)
    t = cfg.train
    bench = make_benchmark(cfg, "train", t.seed, t.meta_batch_size)
    val_bench = make_benchmark(cfg, "val", cfg.eval.seed, cfg.eval.meta_batch_size or t.meta_batch_size) \
        if t.val_every else None
    learner = make_learner(cfg, bench).to(device)
    s = _Session(bench, val_bench, learner, torch.optim.Adam(learner.parameters(), lr=t.meta_lr), Meter(),
                 info={"benchmark": bench.name, "x_shape": list(bench.x_shape), "out_dim": bench.out_dim,
                       "task_type": bench.task_type})
    # Everything is built and checked: only now touch the disk.
    if state is None:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        learner.load_state_dict(state["learner"])
        s.opt.load_state_dict(state["optimizer"])
        s.meter.load_state_dict(state["meter"], device)
        s.start, s.wall = int(state["iteration"]), float(state.get("wall", 0.0))
        ckpt.set_rng_state(state["rng"])
        _truncate_metrics(run_dir / "metrics.jsonl", s.start)
    C.save(cfg, run_dir / "config.json")
    return s


def _step(s: _Session, it: int, device: torch.device, grad_clip: float | None) -> dict[str, Any]:
    """One meta-update on training batch ``it``; returns the values to log."""
    out = s.learner.meta_loss(s.bench.batch(it).to(device), iteration=it)
    s.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for p in s.learner.parameters() if p.grad is not None]
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    s.opt.step()
    return {"loss": out.loss, "query_loss": out.query_loss, "accuracy": out.query_accuracy, "grad_norm": grad_norm,
            **flatten_diagnostics(out.diagnostics)}


def _loop(cfg: C.Config, run_dir: Path, s: _Session, device: torch.device, progress: bool,
          callback: Callable[[int, dict[str, Any]], None] | None) -> None:
    t = cfg.train
    t0 = time.perf_counter() - s.wall
    window_t, window_it = time.perf_counter(), s.start
    bar = tqdm(total=t.iterations, initial=s.start, disable=not progress or not sys.stderr.isatty(),
               dynamic_ncols=True, desc=cfg.name)
    with open(run_dir / "metrics.jsonl", "a") as log, bar:
        for it in range(s.start, t.iterations):
            s.meter.add(_step(s, it, device, t.grad_clip))
            done = it + 1
            val_bench = s.val_bench if s.val_bench is not None and done % t.val_every == 0 else None
            if done % t.log_every == 0 or done == t.iterations or val_bench is not None:
                now = time.perf_counter()
                rec = {"iteration": done, **s.meter.summary(),
                       "tasks_per_s": (done - window_it) * t.meta_batch_size / max(now - window_t, 1e-9),
                       "wall_s": now - t0}
                if val_bench is not None:
                    rec.update(_validate(cfg, s.learner, val_bench, device))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                s.meter.reset()
                window_t, window_it = time.perf_counter(), done
                bar.set_postfix(loss=f"{rec['loss']:.4g}", tasks_s=f"{rec['tasks_per_s']:.0f}")
                if callback is not None:
                    callback(done, rec)
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.iterations:
                ckpt.save(run_dir, {"learner": s.learner.state_dict(), "optimizer": s.opt.state_dict(),
                                    "iteration": done, "rng": ckpt.rng_state(), "config": C.to_dict(cfg),
                                    "meter": s.meter.state_dict(), "wall": time.perf_counter() - t0,
                                    "info": s.info})
            bar.update(1)


def _open_run(run_dir: Path, cfg: C.Config, resume: bool) -> dict[str, Any] | None:
    """Check the run directory; with ``resume``, its checkpoint (config checked against ``cfg``)."""
    held = [f for f in RUN_FILES if (run_dir / f).exists()]
    if not resume:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"{str(run_dir)!r} exists and is not a directory")
        if held:
            raise RunError(f"run directory {str(run_dir)!r} already holds a run ({', '.join(held)}): pass --resume "
                           "to continue it, or choose another --out-dir")
        return None
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
    state = ckpt.load_latest(run_dir)
    saved = C.from_dict(state["config"])
    changed = [k for k in C.diff(saved, cfg) if k not in RESUMABLE and not k.startswith("eval.")]
    if changed:
        raise RunError(f"cannot resume {str(run_dir)!r} with a different config ({', '.join(changed)} differ); "
                       f"only {', '.join(RESUMABLE)} and eval.* may change")
    return state


def _validate(cfg: C.Config, learner: MAML, bench: Benchmark, device: torch.device) -> dict[str, float]:
    k = cfg.maml.inner_steps if cfg.maml.eval_inner_steps is None else cfg.maml.eval_inner_steps
    values = per_task_metric(learner, bench, cfg.train.val_tasks, [k], device)[k]
    return {f"val_{'accuracy' if bench.task_type == 'classification' else 'mse'}": values.mean().item()}


def _finish(cfg: C.Config, run_dir: Path, learner: MAML, done: int, device: torch.device,
            plot: bool) -> RunResult:
    """Final evaluation on ``cfg.eval`` (skipped if this iteration was already evaluated) and the plot."""
    e = cfg.eval
    test = make_benchmark(cfg, e.split, e.seed, e.meta_batch_size or cfg.train.meta_batch_size)
    result = RunResult(run_dir, done)
    seen = any(r.get("iteration") == done and r.get("split") == e.split and r.get("benchmark") == test.name
               for r in read_records(run_dir))
    if not seen:
        result.records = evaluate(learner, test, e.tasks, cfg.eval_steps(test.task_type), device,
                                  benchmark=test.name, iteration=done)
        append_records(run_dir, result.records)
    if not plot:
        return result
    from .plots import plot_run  # matplotlib is imported only when a plot is made

    result.plot = plot_run(run_dir, learner, test, cfg.eval_steps(test.task_type), device)
    return result


__all__ = ["Meter", "RunError", "RunResult", "flatten_diagnostics", "train"]
