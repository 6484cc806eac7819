"""The report's figures, one PNG per (benchmark preset, figure kind), every axis labelled, titled, with a legend.

- learning curves: train query loss (mean over seeds, band min–max) and the validation metric;
- fits (regression): the true function, the support points and each method's prediction on the same test tasks;
- per-sample query losses after adaptation (Meta-GNA's argument: a broad per-sample loss distribution), and their
  spread during training;
- per-layer inner-gradient norms at the first inner step (CxGrad's argument: the head's norm dwarfs the backbone's);
- plug-in internals when present: the figures each registered plug-in declares (``Plugin.figures``: per-tensor
  series, a matrix, its own query metric against the meta-learner's), drawn here from the specs alone.

Example:
    >>> figures = plot_all(rows, Path("runs/study/report"))    # [(caption, path), ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure as MplFigure

from .plots import save_figure
from .seams import FigureSpec, LayerFigure, MatrixFigure, VersusFigure

if TYPE_CHECKING:  # pragma: no cover
    from .report import Row

DPI = 80
Figure = tuple[str, Path]


def _color(i: int) -> str:
    return f"C{i % 10}"


def _series(row: Row, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(iterations, mean, min, max) over the row's seeds of a metrics key (None when no run logs it)."""
    curves = []
    for run in row.runs:
        pts = [(m["iteration"], m[key]) for m in run.metrics if isinstance(m.get(key), (int, float))]
        if pts:
            curves.append(dict(pts))
    if not curves:
        return None
    its = sorted(set.intersection(*(set(c) for c in curves)))
    if not its:
        return None
    v = np.array([[c[i] for i in its] for c in curves], dtype=float)
    return np.array(its), v.mean(0), v.min(0), v.max(0)


def _figure(figsize: tuple[float, float]) -> MplFigure:
    """A figure of its own (no pyplot state, no backend switch), laid out by the constrained engine."""
    return MplFigure(figsize=figsize, layout="constrained")


def _save(fig: MplFigure, path: Path) -> Path:
    return save_figure(fig, path, dpi=DPI)


def _regression(row: Row) -> bool:
    return row.runs[0].records[0]["metric"] == "mse" if row.runs[0].records else True


def plot_learning_curves(preset: str, rows: Sequence[Row], path: Path) -> Path:
    reg = _regression(rows[0])
    fig = _figure((12, 4.5))
    a, b = fig.subplots(1, 2)
    val_key = "val_mse" if reg else "val_accuracy"
    for i, row in enumerate(rows):
        for ax, key, style in ((a, "query_loss", "-"), (b, val_key, "o-")):
            s = _series(row, key)
            if s is None:
                continue
            its, mean, lo, hi = s
            ax.plot(its, mean, style, color=_color(i), label=row.name, ms=3, lw=1.2)
            ax.fill_between(its, lo, hi, color=_color(i), alpha=0.15)
    a.set_title("train query loss (mean over seeds, band: min–max)")
    a.set_ylabel("query MSE" if reg else "query cross-entropy")
    b.set_title(f"validation {'MSE' if reg else 'accuracy'} (after the eval inner steps)")
    b.set_ylabel("val MSE" if reg else "val accuracy")
    for ax in (a, b):
        ax.set_xlabel("meta-iteration")
        if reg:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged (train.val_every=0?)", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{preset}: learning curves")
    return _save(fig, path)


def plot_fits(preset: str, rows: Sequence[Row], path: Path) -> Path | None:
    fits: list[tuple[Row, list[dict[str, Any]]]] = []
    for row in rows:
        found = [r.diagnostics["fits"] for r in row.runs if r.diagnostics and r.diagnostics.get("fits")]
        if found:
            fits.append((row, found[0]))
    if not fits:
        return None
    n = min(len(f) for _, f in fits)
    fig = _figure((4 * n, 3.8))
    axes = fig.subplots(1, n, squeeze=False)
    for t, ax in enumerate(axes[0]):
        ref = fits[0][1][t]
        ax.plot(ref["x"], ref["true"], color="black", lw=2, label="true function")
        for i, (row, f) in enumerate(fits):
            k = str(max(int(s) for s in f[t]["pred"]))
            ax.plot(f[t]["x"], f[t]["pred"][k], "--", color=_color(i), lw=1.3, label=f"{row.name} ({k} steps)")
        ax.scatter(ref["support_x"], ref["support_y"], color="red", zorder=5, s=18,
                   label=f"support ({len(ref['support_x'])})")
        ax.set_title(f"test task {t}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(f"{preset}: fits after adaptation (seed of the first run of each method)")
    return _save(fig, path)


def plot_sample_losses(preset: str, rows: Sequence[Row], path: Path) -> Path | None:
    data, names = [], []
    for row in rows:
        diags = [r.diagnostics for r in row.runs if r.diagnostics]
        if not diags:
            continue
        k = str(max(int(s) for s in diags[0]["sample_losses"]))
        vals = [x for d in diags for task in d["sample_losses"][k] for x in task]
        data.append(np.log10(np.maximum(np.array(vals), 1e-8)))
        names.append(row.name.replace("+", "+\n").replace(" [", "\n[") + f"\n({k} steps)")  # narrow ticks
    if not data:
        return None
    fig = _figure((13, 4.8))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    parts = a.violinplot(data, showmedians=True, showextrema=False)
    for i, body in enumerate(parts["bodies"]):  # type: ignore[index]
        body.set_facecolor(_color(i))
    parts["cmedians"].set_color("black")  # type: ignore[index]
    a.set_xticks(range(1, len(names) + 1), names, fontsize="x-small")
    a.set_ylabel("log10 per-sample query loss")
    a.set_xlabel("method")
    a.set_title("per-sample query losses on test tasks (all seeds)")
    a.plot([], [], color="k", label="median (bar)")
    a.legend(fontsize="small")
    a.grid(alpha=0.3, axis="y")
    for i, row in enumerate(rows):
        lo, hi = _series(row, "query_loss_q10"), _series(row, "query_loss_q90")
        if lo is None or hi is None:
            continue
        b.plot(hi[0], hi[1], color=_color(i), label=f"{row.name} q90")
        b.plot(lo[0], lo[1], ":", color=_color(i), label=f"{row.name} q10")
    b.set_yscale("log")
    b.set_xlabel("meta-iteration")
    b.set_ylabel("per-sample query loss quantile")
    b.set_title("spread during training: q10 (dotted) and q90 (solid)")
    b.grid(alpha=0.3)
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize="x-small", ncol=2)
    fig.suptitle(f"{preset}: per-sample query-loss distribution (Meta-GNA's argument)")
    return _save(fig, path)


def _last_mean(row: Row, key: str, frac: float = 0.1) -> float | None:
    vals = []
    for run in row.runs:
        pts = [m[key] for m in run.metrics if isinstance(m.get(key), (int, float))]
        if pts:
            tail = pts[-max(1, int(len(pts) * frac)):]
            vals.append(sum(tail) / len(tail))
    return sum(vals) / len(vals) if vals else None


def plot_grad_norms(preset: str, rows: Sequence[Row], path: Path) -> Path | None:
    prefix = "inner_grad_norm/"
    layers = [k[len(prefix):] for k in (rows[0].runs[0].metrics[-1] if rows[0].runs[0].metrics else {})
              if k.startswith(prefix)]
    if not layers:
        return None
    fig = _figure((max(7, 1.1 * len(layers) + 3), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    x = np.arange(len(layers))
    for i, row in enumerate(rows):
        vals = [_last_mean(row, prefix + n) for n in layers]
        ax.bar(x + i * width - 0.4 + width / 2, [np.nan if v is None else v for v in vals], width,
               color=_color(i), label=row.name)
    ax.set_xticks(x, layers, rotation=30, ha="right", fontsize="small")
    ax.set_yscale("log")
    ax.set_xlabel("adapted tensor (input → output)")
    ax.set_ylabel("‖∂L_support/∂W‖ at inner step 0")
    ax.set_title(f"{preset}: per-layer inner-gradient norms, last 10% of training, mean over seeds "
                 "(CxGrad's argument)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _keys(row: Row, prefix: str) -> list[str]:
    last = row.runs[0].metrics[-1] if row.runs[0].metrics else {}
    return [k for k in last if k.startswith(prefix)]


def plot_layers(preset: str, rows: Sequence[Row], spec: LayerFigure, path: Path) -> Path | None:
    """Per-tensor series logged under ``spec.series.key`` over training, one panel per row that logs them."""
    prefix = spec.series.key + "/"
    having = [row for row in rows if _keys(row, prefix)]
    if not having:
        return None
    fig = _figure((max(9.0, 6 * len(having)), 4.2))
    axes = fig.subplots(1, len(having), squeeze=False)
    for ax, row in zip(axes[0], having):
        for j, key in enumerate(_keys(row, prefix)):
            s = _series(row, key)
            if s is not None:
                ax.plot(s[0], s[1], color=_color(j), label=key[len(prefix):])
        ax.set_title(row.name)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(spec.series.label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{preset}: {spec.title}\n(mean over seeds)")
    return _save(fig, path)


def plot_matrix(preset: str, rows: Sequence[Row], spec: MatrixFigure, path: Path) -> Path | None:
    """The last logged value of the matrix ``spec.series.key`` as a heat map, one panel per row that logs it."""
    key = spec.series.key
    mats = []
    for row in rows:
        for run in row.runs:
            rel = next((m[key] for m in reversed(run.metrics) if key in m), None)
            if rel is not None:
                mats.append((row, run, np.array(rel, dtype=float)))
                break
    if not mats:
        return None
    fig = _figure((max(8.0, 4.6 * len(mats)), 4.2))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, (row, run, m) in zip(axes[0], mats):
        im = ax.imshow(m, cmap="viridis", vmin=0)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_title(f"{row.name}, seed {run.cfg.train.seed}")
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(spec.ylabel)
        fig.colorbar(im, ax=ax, label=spec.series.label)
    fig.suptitle(f"{preset}: {spec.title} (last logged meta-batch)")
    return _save(fig, path)


def plot_versus(preset: str, rows: Sequence[Row], spec: VersusFigure, path: Path) -> Path | None:
    """A plug-in's adapted-query metric against the meta-learner's (accuracy when logged, else loss)."""
    having = [row for row in rows if _series(row, spec.loss.key) is not None]
    if not having:
        return None
    cls = any(_series(row, spec.accuracy.key) is not None for row in having)
    fig = _figure((9, 4.8))
    ax = fig.subplots()
    for i, row in enumerate(having):
        pairs = ((spec.accuracy.key, spec.accuracy.label), ("accuracy", "meta-learner")) if cls else \
            ((spec.loss.key, spec.loss.label), ("query_loss", "meta-learner"))
        for (key, who), style in zip(pairs, ("--", "-")):
            s = _series(row, key)
            if s is not None:
                ax.plot(s[0], s[1], style, color=_color(i), label=f"{row.name}: {who}")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query accuracy" if cls else "query loss (MSE)")
    if not cls:
        ax.set_yscale("log")
    ax.set_title(f"{preset}: {spec.title}\n(adapted query {'accuracy' if cls else 'loss'}, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_spec(preset: str, rows: Sequence[Row], spec: FigureSpec, path: Path) -> Path | None:
    """A plug-in's declared figure (``Plugin.figures``), or None when no row logs its diagnostics."""
    if isinstance(spec, LayerFigure):
        return plot_layers(preset, rows, spec, path)
    if isinstance(spec, MatrixFigure):
        return plot_matrix(preset, rows, spec, path)
    if isinstance(spec, VersusFigure):
        return plot_versus(preset, rows, spec, path)
    raise TypeError(f"no drawing for figure spec {type(spec).__name__}")


def plot_all(rows: Sequence[Row], out: Path) -> list[Figure]:
    """Every figure for every preset; returns (caption, path) pairs in report order."""
    from . import methods

    specs = methods.figures()
    figures: list[Figure] = []
    presets: dict[str, list[Row]] = {}
    for row in rows:
        presets.setdefault(row.preset, []).append(row)
    for preset, group in presets.items():
        made: list[tuple[str, Any]] = [
            ("learning curves", plot_learning_curves(preset, group, out / f"{preset}-curves.png")),
            ("fits", plot_fits(preset, group, out / f"{preset}-fits.png")),
            ("per-sample query losses", plot_sample_losses(preset, group, out / f"{preset}-sample-losses.png")),
            ("per-layer inner-gradient norms", plot_grad_norms(preset, group, out / f"{preset}-grad-norms.png")),
        ]
        made += [(spec.caption, plot_spec(preset, group, spec, out / f"{preset}-{spec.file}.png")) for spec in specs]
        figures += [(f"{preset}: {caption}", p) for caption, p in made if p is not None]
    return figures


__all__ = ["plot_all", "plot_fits", "plot_grad_norms", "plot_layers", "plot_learning_curves", "plot_matrix",
           "plot_sample_losses", "plot_spec", "plot_versus"]
