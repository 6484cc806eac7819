"""Meta-training of a run directory from a :class:`~metagrad.config.Config`: the loop, metrics, resume.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
iteration, append-only), ``checkpoint.pt`` (see :mod:`metagrad.checkpoint`), ``eval.json`` (evaluation
records) and ``curves.png``. Batch ``i`` of a benchmark is a pure function of (seed, split, i), so resuming
continues at the checkpoint's iteration with the RNG and optimiser states restored, and the trajectory is
identical, bit for bit, to an uninterrupted run (tests/test_reliability.py kills runs 20+ times to check it).

A meta-update whose loss or gradient is not finite is skipped (no update), reported as a
:class:`NumericalWarning` and a line of ``faults.jsonl`` naming the bad tensors and the task ids; after
``train.max_bad_steps`` in a row the run stops with :class:`NumericalError`, its last checkpoint intact.

Example:
    >>> cfg = metagrad.config.resolve("sinusoid-10shot", ["train.iterations=500"])
    >>> result = train(cfg, "runs/sin10")
    >>> print(format_table(result.records))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import config as C
from . import distributed as D
from .build import RunError, evaluation_learner, head_for, make_benchmark, make_learner
from .chunks import meta_backward
from .data import Benchmark
from .evaluation import append_records, evaluate, per_task_metric, read_records
from .learners import MAML
from .rundir import (
    EVAL,
    FAULTS,
    METRICS,
    append_fault,
    check_files,
    held_files,
    naming,
    open_log,
    open_run,
    truncate_log,
    write_config,
)
from .runlock import locked

# Keys that may change when a run is resumed: they do not alter the training trajectory.
RESUMABLE = ("train.iterations", "train.device", "train.threads", "train.checkpoint_every", "benchmark.data_root",
             "train.keep_checkpoints", "train.max_bad_steps", "train.time_budget_min")


class NumericalError(RunError):
    """Training stopped: ``train.max_bad_steps`` meta-updates in a row had a non-finite loss or gradient."""


class NumericalWarning(UserWarning):
    """One meta-update was skipped because its loss or gradient was not finite."""


@dataclass
class Fault:
    """A skipped meta-update: the non-finite tensors (``loss``, ``grad:<param>``, ``param:<param>``) and tasks."""

    tensors: list[str]
    task_ids: list[int]


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    iteration: int                                   # meta-updates done
    records: list[dict[str, Any]] = field(default_factory=list)  # the final evaluation (empty if skipped)
    plot: Path | None = None
    rank: int = 0                                    # this process's rank (0 alone writes and evaluates)


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
        self.tallies: dict[str, int] = {}  # events counted, not averaged (e.g. skipped_steps)

    def tally(self, key: str) -> None:
        self.tallies[key] = self.tallies.get(key, 0) + 1

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
        out.update(self.tallies)
        return out

    def reset(self) -> None:
        self.sums, self.last, self.count, self.tallies = {}, {}, 0, {}

    def state_dict(self) -> dict[str, Any]:
        cpu = {k: v.cpu() for k, v in self.sums.items()}
        return {"sums": cpu, "last": {k: v.cpu() for k, v in self.last.items()}, "count": self.count,
                "tallies": dict(self.tallies)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.last = dict(state["last"])
        self.count = int(state["count"])
        self.tallies = {k: int(v) for k, v in state.get("tallies", {}).items()}


def sample_loss_quantiles(sample_losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spread of a meta-batch's per-sample query losses (Meta-GNA's argument), logged as ``query_loss_q10``,
    ``query_loss_q50``, ``query_loss_q90`` (over all samples) and ``query_loss_task_std`` (mean within-task std)."""
    s = sample_losses.detach().double()
    q = torch.quantile(s.flatten(), torch.tensor([0.1, 0.5, 0.9], dtype=s.dtype, device=s.device))
    std = s.std(dim=1, unbiased=False).mean() if s.shape[1] > 1 else s.new_zeros(())
    return {"query_loss_q10": q[0], "query_loss_q50": q[1], "query_loss_q90": q[2], "query_loss_task_std": std}


def flatten_diagnostics(diag: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"inner_grad_norm": {"layers.0.weight": t}}`` → ``{"inner_grad_norm/layers.0.weight": t}``."""
    flat: dict[str, Any] = {}
    for k, v in diag.items():
        if isinstance(v, dict):
            flat.update(flatten_diagnostics(v, f"{prefix}{k}/"))
        elif isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = v
    return flat


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
    test_bench: Benchmark | None = None                  # the final evaluation's split, built before the first step
    dctx: D.Context = field(default_factory=D.Context)   # rank and world size (1: a single process)
    group_size: int | None = None                        # tasks a plug-in relates: shards keep them together
    precision: str = "fp32"
    bad_in_row: int = 0       # consecutive skipped (non-finite) meta-updates, checkpointed
    saved: int | None = None  # iteration of the last checkpoint on disk (None: none yet)


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
    run_dir, cfg = Path(out_dir), config
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Under torchrun (WORLD_SIZE > 1) join the process group: each rank trains on its share of every meta-batch.
    dctx, device = D.setup(cfg.train.device)
    try:
        # One writer per run directory, from before it is read until the end (rank 0 alone writes; _session
        # takes the lock, so that the other ranks learn of a refusal too).
        with contextlib.ExitStack() as held:
            s = _session(cfg, run_dir, resume, device, dctx, held)
            done = _loop(cfg, run_dir, s, device, progress, callback)
            D.teardown(dctx, synchronize=True)   # every rank leaves the group together; rank 0 then evaluates alone
            if not dctx.is_main:
                return RunResult(run_dir, done, rank=dctx.rank)
            assert s.test_bench is not None
            return _finish(cfg, run_dir, s.learner, s.test_bench, done, device, plot, int(s.info["out_dim"]))
    finally:
        D.teardown(dctx)   # a no-op after the normal end; on an error leave at once (a peer may be dead)
        torch.set_num_threads(threads)


def _session(cfg: C.Config, run_dir: Path, resume: bool, device: torch.device,
             dctx: D.Context | None = None, held: contextlib.ExitStack | None = None) -> _Session:
    """Open (``held``: and lock, for as long as ``held`` lasts) the run directory, build and restore the run."""
    dctx = dctx or D.Context()
    # Rank 0 alone reads the run directory; the others get its checkpoint (or its error) by broadcast.
    state, error = None, None
    if dctx.is_main:
        try:
            if resume and not run_dir.is_dir():
                raise RunError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
            if held is not None:
                held.enter_context(locked(run_dir))
            state = _open_run(run_dir, cfg, resume)
        except (ValueError, OSError) as e:
            error = e
    state, error = D.broadcast((state, error), dctx)
    if error is not None:
        raise error
    s = build(cfg, device, dctx)
    if dctx.is_main and state is not None:   # a readable checkpoint that does not fit the model: an older one
        try:
            state = _fitting(run_dir, s.learner, state)
        except (ValueError, OSError) as e:
            error = e
    state, error = D.broadcast((state, error), dctx)
    if error is not None:
        raise error
    # Everything is built and checked: only now touch the disk (rank 0 only).
    if state is None:
        if dctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume:  # a run stopped before its first checkpoint: drop what it logged, start over
                open_run(run_dir)
                truncate_log(run_dir / METRICS, 0)
                truncate_log(run_dir / FAULTS, 0)
    else:
        s.learner.load_state_dict(state["learner"])
        s.opt.load_state_dict(state["optimizer"])
        if "meter" in state:   # older checkpoints have none: the first window's averages start afresh
            s.meter.load_state_dict(state["meter"], device)
        s.start, s.wall = int(state["iteration"]), float(state.get("wall", 0.0))
        s.bad_in_row, s.saved = int(state.get("bad_in_row", 0)), s.start
        ckpt.set_rng_state(state["rng"])
        if dctx.is_main:
            open_run(run_dir)   # removes the temporary files of a process killed mid-write
            _repair_checkpoints(run_dir, state.pop("_fallback", None))
            truncate_log(run_dir / METRICS, s.start)
            truncate_log(run_dir / FAULTS, s.start)
    D.broadcast_module(s.learner, dctx)
    if dctx.is_main:
        write_config(run_dir, cfg)
    return s


def build(cfg: C.Config, device: torch.device, dctx: D.Context | None = None) -> _Session:
    """Every object a run uses, built and checked before the run directory is touched: the training split, the
    validation split (when ``train.val_every``), the final evaluation's split, the learner and its optimiser.
    A setting that one split cannot serve (e.g. ``eval.queries`` too many for a class) fails here, not after
    training. ``metagrad train --dry-run`` stops after this."""
    dctx = dctx or D.Context()
    t, e = cfg.train, cfg.eval
    seed_everything(t.seed)
    eval_batch = e.meta_batch_size or t.meta_batch_size
    with _allocating(cfg, "the model"):
        bench = make_benchmark(cfg, "train", t.seed, t.meta_batch_size)
        val_bench = make_benchmark(cfg, "val", e.seed, eval_batch) if t.val_every else None
        learner = make_learner(cfg, bench).to(device)
    rng = ckpt.rng_state()  # built out of the old order: it must not move the initialisation or the trajectory
    with _allocating(cfg, "the evaluation split"):
        test_bench = make_benchmark(cfg, e.split, e.seed, eval_batch, ways=e.ways)
    _probe(cfg, learner, bench, test_bench, device)
    ckpt.set_rng_state(rng)
    if e.ways is not None and bench.task_type != "classification":
        raise C.ConfigError(f"eval.ways applies to classification; {bench.name} is {bench.task_type}: leave it out")
    if bench.task_type == "classification":
        head_for(e.head, test_bench.out_dim, bench.out_dim, cfg.learner)  # a head that cannot serve them fails here
    s = _Session(bench, val_bench, learner, torch.optim.Adam(learner.parameters(), lr=t.meta_lr), Meter(),
                 info={"benchmark": bench.name, "x_shape": list(bench.x_shape), "out_dim": bench.out_dim,
                       "task_type": bench.task_type, "world_size": dctx.world},
                 test_bench=test_bench, dctx=dctx, group_size=D.group_size_of(learner), precision=t.precision)
    if dctx.active and dctx.is_main:
        D.warn_idle(t.meta_batch_size, dctx.world, s.group_size)
    if t.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise C.ConfigError("train.precision=bf16 needs a GPU with bfloat16 support (Ampere or newer): use fp32")
    return s


@contextlib.contextmanager
def _allocating(cfg: C.Config, what: str):
    """Turn a failure to allocate or place tensors (sizes below 2³¹ that do not fit in memory, a device that
    cannot run a step) into one ConfigError, before the run directory is touched."""
    try:
        yield
    except (RuntimeError, MemoryError, NotImplementedError, OverflowError) as e:
        if isinstance(e, D.DistributedError):
            raise
        cause = " ".join(str(e).split())[:160] or type(e).__name__
        raise C.ConfigError(f"cannot build {what} with this config on train.device={cfg.train.device} ({cause}): "
                            "lower the sizes (model.kwargs, benchmark.shots/queries, "
                            "train.meta_batch_size, eval.meta_batch_size, plug-in sizes) or use another device"
                            ) from None


def _probe(cfg: C.Config, learner: MAML, bench: Benchmark, test_bench: Benchmark, device: torch.device) -> None:
    """One meta-gradient on the first training meta-batch and the first evaluation batch built, on ``device``,
    gradients then cleared and every RNG put back: what the run will allocate and compute, checked before
    anything is written (``--dry-run`` does it too)."""
    rng, state = ckpt.rng_state(), {k: v.clone() for k, v in learner.state_dict().items()}  # buffers (batch norm)
    try:
        with _allocating(cfg, "a meta-batch"):
            batch = bench.batch(0).to(device)
            with autocast(device, cfg.train.precision):
                out = meta_backward(learner, batch, first_order=True)
            float(out.loss.detach().float().sum().cpu())   # a device that cannot compute fails here
        with _allocating(cfg, "an evaluation batch"):
            next(iter(test_bench.tasks(1))).to(device)
    finally:
        learner.zero_grad(set_to_none=True)
        learner.load_state_dict(state)
        ckpt.set_rng_state(rng)


def meta_lr(t: C.TrainConfig, it: int) -> float:
    """The meta step size of iteration ``it`` (0-based): ``meta_lr``, or with ``meta_lr_schedule="cosine"``
    (MAML++, Antoniou et al., "How to train your MAML", ICLR 2019) ``meta_lr_min + (meta_lr − meta_lr_min) ·
    (1 + cos(π·it/iterations))/2``, or with ``"step"`` ``meta_lr`` until ``meta_lr_step_at · iterations``, then
    ``meta_lr_min`` (the classic late drop of the step size once the accuracy plateaus), or with ``"halving"``
    ``meta_lr · 0.5^⌊it / meta_lr_halve_every⌋`` (Snell et al., "Prototypical Networks for Few-shot Learning",
    NeurIPS 2017: halved every 2,000 episodes; it does not depend on ``iterations``, so a longer budget continues
    the same trajectory). A function of the iteration alone, so a resumed run takes the same steps."""
    if t.meta_lr_schedule == "constant":
        return t.meta_lr
    if t.meta_lr_schedule == "halving":
        return t.meta_lr * 0.5 ** (it // t.meta_lr_halve_every)
    if t.meta_lr_schedule == "step":
        return t.meta_lr if it < t.meta_lr_step_at * t.iterations else t.meta_lr_min
    return t.meta_lr_min + (t.meta_lr - t.meta_lr_min) * (1 + math.cos(math.pi * it / t.iterations)) / 2


def first_order_at(m: C.MAMLConfig, it: int) -> bool:
    """Whether meta-iteration ``it`` (0-based) takes a first-order meta-gradient: always with ``first_order``,
    else below ``first_order_iterations`` (MAML++'s derivative-order annealing, Antoniou et al., "How to train
    your MAML", ICLR 2019). The training loop decides it per step, as it does the step size."""
    return m.first_order or it < m.first_order_iterations


def _step(s: _Session, it: int, device: torch.device, grad_clip: float | None,
          first_order: bool) -> dict[str, Any] | Fault:
    """One meta-update on training batch ``it``; returns the values to log, or a :class:`Fault` if it was skipped.

    With several ranks each takes its share of the batch (whole task groups of the plug-ins) and the gradients,
    scaled by share/T, are summed over ranks: the single-process meta-gradient (see :mod:`metagrad.distributed`).
    The logged loss, query loss and accuracy are the whole batch's; other diagnostics are rank 0's share's.
    """
    d = s.dctx
    part, weight = D.shard(s.bench.batch(it), d.rank, d.world, s.group_size)
    s.opt.zero_grad(set_to_none=True)
    values: dict[str, Any] = {"loss": None, "query_loss": None, "accuracy": None}
    diagnostics: dict[str, Any] = {}
    out = None
    s.learner.set_iteration(it)   # the plug-ins' schedules (the multi-step loss weights)
    if len(part):
        with autocast(device, s.precision):   # the forwards only: meta_backward's backwards leave autocast
            out = meta_backward(s.learner, part.to(device), first_order=first_order)
        values = {"loss": out.loss, "query_loss": out.query_loss, "accuracy": out.query_accuracy}
        diagnostics = {**sample_loss_quantiles(out.sample_losses), **flatten_diagnostics(out.diagnostics)}
    if d.active:
        values = D.allreduce_grads(list(s.learner.parameters()), weight, values, d)
    params = [p for p in s.learner.parameters() if p.grad is not None]
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    fault = _check_finite(s, values, grad_norm, part, out, s.opt.param_groups[0]["lr"])
    if fault is not None:
        s.opt.zero_grad(set_to_none=True)  # the step is skipped: no update, the optimiser state untouched
        return fault
    s.opt.step()
    return {**values, "grad_norm": grad_norm, "meta_lr": s.opt.param_groups[0]["lr"], **diagnostics}


def _check_finite(s: _Session, values: dict[str, Any], grad_norm: torch.Tensor, part: Any,
                  out: Any, lr: float) -> Fault | None:
    """None when the loss and the gradient norm are finite (one host sync) and the step size ``lr`` about to be
    applied is finite and > 0; else what went bad, and where."""
    if not 0 < lr < math.inf:  # the schedule's value: nan or a negative step would poison or ascend
        ids = list(part.task_ids) if part.task_ids is not None else list(range(len(part)))
        return Fault(["meta_lr"], [int(i) for i in ids])
    checks = [v.detach().float().reshape(()) for v in (values["loss"], grad_norm) if isinstance(v, torch.Tensor)]
    if not checks or bool(torch.isfinite(torch.stack(checks)).all()):
        return None
    # The slow path, only on a bad step: name every non-finite tensor and the tasks with a non-finite loss.
    bad = [k for k in ("loss", "query_loss")
           if isinstance(values.get(k), torch.Tensor) and not bool(torch.isfinite(values[k]).all())]
    for n, p in s.learner.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad.append(f"param:{n}")
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad.append(f"grad:{n}")
    ids = list(part.task_ids) if part.task_ids is not None else list(range(len(part)))
    if out is not None:
        finite = torch.isfinite(out.task_losses.detach())
        if not bool(finite.all()):
            ids = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
    return Fault(bad or ["grad_norm"], [int(i) for i in ids])


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the meta-training forwards (``train.precision="bf16"``), else a no-op context.

    Autocast casts only the inputs of matmuls and convolutions: parameters, fast weights, the inner update
    θ' = θ − α·g, gradient norms and the losses (cross-entropy, MSE run in fp32 under autocast) stay fp32,
    so the inner-loop arithmetic is that of fp32 with bf16 products. No fp16: it would need loss scaling
    inside the inner loop as well.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _loop(cfg: C.Config, run_dir: Path, s: _Session, device: torch.device, progress: bool,
          callback: Callable[[int, dict[str, Any]], None] | None) -> int:
    """Meta-train from ``s.start`` to ``train.iterations`` (or the time budget); returns the iterations done."""
    t = cfg.train
    budget_s = None if t.time_budget_min is None else 60.0 * t.time_budget_min
    done = max(s.start, t.iterations)
    if budget_s is not None and s.wall >= budget_s:   # resumed with the budget already spent
        return s.start
    t0 = time.perf_counter() - s.wall
    window_t, window_it = time.perf_counter(), s.start
    main = s.dctx.is_main   # rank 0 alone logs, validates and checkpoints; the others only train
    bar = tqdm(total=t.iterations, initial=s.start, disable=not progress or not sys.stderr.isatty() or not main,
               dynamic_ncols=True, desc=cfg.name)
    with contextlib.ExitStack() as files, bar:
        log = files.enter_context(open_log(run_dir / METRICS)) if main else None
        for it in range(s.start, t.iterations):
            lr = meta_lr(t, it)
            for group in s.opt.param_groups:
                group["lr"] = lr
            res = _step(s, it, device, t.grad_clip, first_order_at(cfg.maml, it))
            done = it + 1
            if isinstance(res, Fault):
                _bad_step(cfg, run_dir, s, it, res)
            else:
                s.bad_in_row = 0
                s.meter.add(res)
            val_bench = s.val_bench if s.val_bench is not None and done % t.val_every == 0 else None
            # The budget is judged on rank 0's clock, so that every rank stops after the same iteration.
            out_of_time = budget_s is not None and D.broadcast(time.perf_counter() - t0 >= budget_s, s.dctx)
            if not main:
                if out_of_time:
                    break
                continue
            if done % t.log_every == 0 or done == t.iterations or val_bench is not None or out_of_time:
                now = time.perf_counter()
                rec = {"iteration": done, **s.meter.summary(),
                       "tasks_per_s": (done - window_it) * t.meta_batch_size / max(now - window_t, 1e-9),
                       "wall_s": now - t0}
                if val_bench is not None:
                    rec.update(_validate(cfg, s.learner, val_bench, device))
                assert log is not None
                with naming(run_dir / METRICS):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                s.meter.reset()
                window_t, window_it = time.perf_counter(), done
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4g}", tasks_s=f"{rec['tasks_per_s']:.0f}")
                if callback is not None:
                    callback(done, rec)
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.iterations or out_of_time:
                assert log is not None
                with naming(run_dir / METRICS):
                    log.flush()
                    os.fsync(log.fileno())  # every line up to the checkpoint survives a power cut
                _check_state_finite(s, done)
                ckpt.save(run_dir, {"learner": s.learner.state_dict(), "optimizer": s.opt.state_dict(),
                                    "iteration": done, "rng": ckpt.rng_state(), "config": C.to_dict(cfg),
                                    "meter": s.meter.state_dict(), "wall": time.perf_counter() - t0,
                                    "info": s.info, "bad_in_row": s.bad_in_row}, keep=t.keep_checkpoints)
                s.saved = done
            bar.update(1)
            if out_of_time:
                break
    return done


def _bad_step(cfg: C.Config, run_dir: Path, s: _Session, it: int, fault: Fault) -> None:
    """Count, log and report a skipped meta-update; stop the run after ``train.max_bad_steps`` in a row."""
    s.bad_in_row += 1
    s.meter.tally("skipped_steps")
    limit = cfg.train.max_bad_steps
    what = f"{', '.join(fault.tensors[:6])}{' …' if len(fault.tensors) > 6 else ''}"
    tasks = f"{fault.task_ids[:10]}{' …' if len(fault.task_ids) > 10 else ''}"
    if s.dctx.is_main:
        append_fault(run_dir, {"iteration": it + 1, "batch": it, "event": "non_finite", "tensors": fault.tensors,
                               "task_ids": fault.task_ids, "in_a_row": s.bad_in_row, "action": "skipped"})
        warnings.warn(f"iteration {it + 1}: non-finite {what} on tasks {tasks}; meta-update skipped "
                      f"({s.bad_in_row} of {limit} in a row allowed)", NumericalWarning, stacklevel=2)
    if s.bad_in_row >= limit:
        kept = (f"the last good checkpoint (iteration {s.saved}) is kept" if s.saved is not None
                else "no checkpoint was written")
        advice = ("the meta step size was not finite and > 0: check train.meta_lr, train.meta_lr_schedule and "
                  "train.meta_lr_min" if fault.tensors == ["meta_lr"] else
                  "lower train.meta_lr or maml.inner_lr, or set train.grad_clip")
        raise NumericalError(f"training stopped at iteration {it + 1}: {limit} meta-updates in a row had a "
                             f"non-finite loss, gradient or step size (last: {what} on tasks {tasks}; see {FAULTS}); "
                             f"{kept}: {advice}, and start a new run")


def _check_state_finite(s: _Session, done: int) -> None:
    """Refuse to write a checkpoint whose parameters are not finite (the last good one stays)."""
    bad = [n for n, v in s.learner.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        kept = f"iteration {s.saved}" if s.saved is not None else "none written"
        raise NumericalError(f"parameters {', '.join(bad[:6])} are not finite at iteration {done}: checkpoint not "
                             f"written (last good one: {kept}); lower train.meta_lr or set train.grad_clip")


def _repair_checkpoints(run_dir: Path, fallback: tuple[Path, list[Path]] | None) -> None:
    """After resuming from an older checkpoint: set unusable newer ones aside, make checkpoint.pt the good one."""
    if fallback is None:
        return
    good, bad = fallback
    for p in bad:
        os.replace(p, p.with_name(p.name + ".corrupt"))
    if good != ckpt.path_of(run_dir):
        ckpt.write_atomic(ckpt.path_of(run_dir), good.read_bytes())


def _open_run(run_dir: Path, cfg: C.Config, resume: bool) -> dict[str, Any] | None:
    """Check the run directory; with ``resume``, its checkpoint (config checked against ``cfg``).

    Any run file, kept checkpoint copies and ``faults.jsonl`` included, makes a directory hold a run; every run
    file, and every place the run will write (``curves.png``, a future kept copy), must be a regular file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{str(run_dir)!r} exists and is not a directory")
    if not resume:
        check_files(run_dir)   # a directory, FIFO or link where a run file, curves.png or a kept copy will go
        held = held_files(run_dir)
        if held:
            shown = ", ".join(held[:6]) + (" …" if len(held) > 6 else "")
            raise RunError(f"run directory {str(run_dir)!r} already holds a run ({shown}): pass --resume "
                           "to continue it, or choose another --out-dir")
        return None
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
    check_files(run_dir)        # a directory, a FIFO or an unreadable file fails now, not mid-run
    read_records(run_dir)       # a malformed eval.json too
    if not ckpt.candidates(run_dir) and not (run_dir / EVAL).exists():
        # Stopped before its first checkpoint: nothing was kept for good, so the run starts over (same trajectory),
        # but only as the run its config.json describes.
        _same_run(run_dir, cfg)
        warnings.warn(f"{str(run_dir)!r} holds no checkpoint yet (stopped before the first one): starting it "
                      "from iteration 0", ckpt.CheckpointWarning, stacklevel=2)
        return None
    path, state, errors = ckpt.find_latest(run_dir)
    if errors:  # a newer checkpoint is corrupt: resume from the previous good one (repaired in _session)
        warnings.warn(ckpt.fallback_message(path, state, errors), ckpt.CheckpointWarning, stacklevel=2)
        found = ckpt.candidates(run_dir)
        state["_fallback"] = (path, found[:found.index(path)])
    saved = C.from_dict(state["config"])
    changed = [k for k in C.diff(saved, cfg) if k not in RESUMABLE and not k.startswith("eval.")]
    if changed:
        raise RunError(f"cannot resume {str(run_dir)!r} with a different config ({', '.join(changed)} differ); "
                       f"only {', '.join(RESUMABLE)} and eval.* may change")
    return state


def _fitting(run_dir: Path, learner: MAML, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` when its learner fits ``learner``; else the newest older checkpoint that does (with a warning and
    the same repair as for a corrupt one), or CheckpointError."""
    def fits(path: Path, st: dict[str, Any]) -> None:
        try:
            learner.load_state_dict(st["learner"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not fit the model of this config "
                                       f"({' '.join(str(e).split())[:120]})") from None

    try:
        fits(Path(run_dir), state)
        return state
    except ckpt.CheckpointError:
        pass
    path, found_state, errors = ckpt.find_latest(run_dir, accept=fits)
    warnings.warn(ckpt.fallback_message(path, found_state, errors), ckpt.CheckpointWarning, stacklevel=2)
    found = ckpt.candidates(run_dir)
    found_state["_fallback"] = (path, found[:found.index(path)])
    return found_state


def _same_run(run_dir: Path, cfg: C.Config) -> None:
    """Refuse ``cfg`` when the run's readable ``config.json`` describes another run (a key outside RESUMABLE and
    ``eval.*`` differs)."""
    from .rundir import CONFIG, read_config

    if not (run_dir / CONFIG).exists():
        return
    try:
        saved = read_config(run_dir)
    except C.ConfigError:
        return   # damaged: nothing to compare with, and it is rewritten from cfg
    changed = [k for k in C.diff(saved, cfg) if k not in RESUMABLE and not k.startswith("eval.")]
    if changed:
        raise RunError(f"cannot resume {str(run_dir)!r} with a different config ({', '.join(changed[:5])} differ "
                       f"from its {CONFIG}); only {', '.join(RESUMABLE)} and eval.* may change: leave --config "
                       "out, or start a new run in another --out-dir")


def _validate(cfg: C.Config, learner: MAML, bench: Benchmark, device: torch.device) -> dict[str, float]:
    k = cfg.test_steps
    values = per_task_metric(learner, bench, cfg.train.val_tasks, [k], device)[k]
    return {f"val_{'accuracy' if bench.task_type == 'classification' else 'mse'}": values.mean().item()}


def check_scores(records: list[dict[str, Any]]) -> None:
    """Refuse to call an evaluation a success when a mean or interval is not finite."""
    bad = [r for r in records if not all(math.isfinite(float(r[k])) for k in ("mean", "ci95"))]
    if bad:
        what = ", ".join(f"{r['metric']} after {r['inner_steps']} steps = {r['mean']} ± {r['ci95']}" for r in bad)
        raise NumericalError(f"the evaluation is not finite ({what}; kept in eval.json): the adapted model diverges, "
                             "lower maml.inner_lr or train.meta_lr")


def _finish(cfg: C.Config, run_dir: Path, learner: MAML, test: Benchmark, done: int, device: torch.device,
            plot: bool, trained_ways: int) -> RunResult:
    """Final evaluation on ``cfg.eval`` (skipped if this iteration was already evaluated) and the plot; at other
    ways (``eval.ways``) or with another head (``eval.head``) by a learner built for them.

    Raises:
        NumericalError: a score is not finite (the records are kept in eval.json all the same).
    """
    e = cfg.eval
    result = RunResult(run_dir, done)
    extra: dict[str, Any] = {}
    if test.task_type == "classification":
        extra = {"head": head_for(e.head, test.out_dim, trained_ways, cfg.learner)}
        # The training learner serves its own ways and head (a ProtoNet's prototypes are its head at any ways).
        if test.out_dim != trained_ways or (extra["head"] != "trained" and cfg.learner != "protonet"):
            learner, extra = evaluation_learner(cfg, test, learner.state_dict(), trained_ways)
            learner = learner.to(device)
    seen = any(r.get("iteration") == done and r.get("split") == e.split and r.get("benchmark") == test.name
               for r in read_records(run_dir))
    if not seen:
        result.records = evaluate(learner, test, e.tasks, cfg.eval_steps(test.task_type), device,
                                  benchmark=test.name, iteration=done, **extra)
        append_records(run_dir, result.records)
        check_scores(result.records)
    if not plot:
        return result
    from .plots import plot_run  # matplotlib is imported only when a plot is made

    result.plot = plot_run(run_dir, learner, test, cfg.eval_steps(test.task_type), device)
    return result


__all__ = ["Fault", "Meter", "NumericalError", "NumericalWarning", "RunError", "RunResult", "flatten_diagnostics",
           "train"]
