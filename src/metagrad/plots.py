"""The run figure: learning curve, and for regression the fitted curves of a few test tasks.

Figures are ``matplotlib.figure.Figure`` objects drawn by the Agg canvas directly, so plots work on headless
machines and importing this module never changes the backend pyplot uses (a notebook's stays as it is).

Example:
    >>> plot_run("runs/sin10", learner, test_bench, inner_steps=[0, 1, 10])   # → runs/sin10/curves.png
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import Benchmark
from .learners import MAML
from .rundir import PLOT as PLOT_FILE
from .rundir import read_metrics, write_atomic


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG with the Agg canvas and write it to ``path`` atomically; returns the path."""
    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
    return Path(path)


def plot_learning_curve(ax: Axes, rows: Sequence[dict[str, Any]], regression: bool, val_steps: int) -> None:
    """Train query loss and the validation metric (after ``val_steps`` inner steps) against the iteration."""
    its = [r["iteration"] for r in rows]
    ax.plot(its, [r.get("query_loss", float("nan")) for r in rows], label="train query loss", color="C0")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query MSE" if regression else "query cross-entropy")
    val_key = "val_mse" if regression else "val_accuracy"
    val = [(r["iteration"], r[val_key]) for r in rows if val_key in r]
    if regression:
        ax.set_yscale("log")
        if val:
            ax.plot(*zip(*val), "o-", color="C1", label=f"val MSE after {val_steps} steps")
        ax.legend()
    else:
        twin = ax.twinx()
        if val:
            twin.plot(*zip(*val), "o-", color="C1", label=f"val accuracy after {val_steps} steps")
        twin.set_ylabel("val accuracy")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [str(h.get_label()) for h in handles], loc="center right")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)


def plot_fits(axes: Sequence[Axes], learner: MAML, bench: Benchmark, inner_steps: Sequence[int],
              device: torch.device | str = "cpu") -> None:
    """For the first tasks of test batch 0: true function, support points, predictions after each step count."""
    batch = bench.batch(0)
    was_training = learner.training
    learner.eval()
    try:
        for t, ax in enumerate(axes):
            sx, sy = batch.support_x[t], batch.support_y[t]
            xs = torch.cat([sx, batch.query_x[t]]).flatten()
            pad = 0.1 * float(xs.max() - xs.min())
            grid = torch.linspace(float(xs.min()) - pad, float(xs.max()) + pad, 200)
            true = bench.true_function(0, grid)[t].flatten()  # type: ignore[attr-defined]  # regression only
            ax.plot(grid, true, color="black", lw=2, label="true function")
            for i, k in enumerate(inner_steps):
                fast = learner.adapt(sx.to(device), sy.to(device), inner_steps=k, create_graph=False)
                with torch.no_grad():
                    pred = learner.predict(fast, grid.reshape(-1, 1).to(device)).flatten().cpu()
                label = "θ (before adaptation)" if k == 0 else f"after {k} step{'s' if k > 1 else ''}"
                ax.plot(grid, pred, ls="--", color=f"C{i}", label=label)
            ax.scatter(sx.flatten(), sy.flatten(), color="red", zorder=5, label=f"support ({len(sx)})")
            ax.set_title(f"test task {t}")
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
    finally:
        learner.train(was_training)


def plot_run(run_dir: str | Path, learner: MAML, bench: Benchmark, inner_steps: Sequence[int],
             device: torch.device | str = "cpu", tasks: int = 4) -> Path:
    """Write ``curves.png`` in ``run_dir``; returns its path.

    ``inner_steps``: the step counts whose fitted curves are drawn (regression).
    """
    run_dir = Path(run_dir)
    regression = bench.task_type == "regression" and hasattr(bench, "true_function")
    rows = read_metrics(run_dir)
    if regression:
        fig = Figure(figsize=(15, 6), layout="constrained")
        grid = fig.add_gridspec(2, 4)
        plot_learning_curve(fig.add_subplot(grid[:, :2]), rows, True, learner.eval_inner_steps)
        n = min(tasks, 4, bench.meta_batch_size)
        plot_fits([fig.add_subplot(grid[i // 2, 2 + i % 2]) for i in range(n)], learner, bench,
                  sorted(set(inner_steps) | {0}), device)
    else:
        fig = Figure(figsize=(7, 5), layout="constrained")
        plot_learning_curve(fig.subplots(), rows, False, learner.eval_inner_steps)
    fig.suptitle(f"{run_dir.name}: {bench.name}")
    return save_figure(fig, run_dir / PLOT_FILE, dpi=100)


__all__ = ["PLOT_FILE", "plot_fits", "plot_learning_curve", "plot_run", "read_metrics", "save_figure"]
