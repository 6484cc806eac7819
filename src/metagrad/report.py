"""Reports: tables (Markdown and HTML) and plots of finished runs, grouped by benchmark preset and method.

``metagrad report RUN_OR_STUDY_DIR ... --out DIR`` collects every run directory below the given paths
(``config.json`` + ``eval.json`` + ``metrics.jsonl``, and ``diagnostics.json``, computed from the checkpoint
when missing), groups them into rows by (preset, method, resolved config apart from the seed) and writes
``report.md``, ``report.html`` and PNG figures into ``DIR``.

Statistics, per row and evaluated (benchmark, inner steps):

- per seed: the run's final evaluation, mean over its n test tasks;
- pooled: the mean of all seed × task values ± 95% CI = ``1.96 · sd / √n``, sd over all S·n seed × task values
  (it includes the spread between seeds) and n the number of *distinct* test tasks: every seed is scored on the
  same test tasks (``eval.seed`` is fixed), so they are not counted S times. This is wider (more cautious) than
  ``1.96 · sd / √(S·n)``.
- a method differs significantly from MAML on the same preset only when the two pooled 95% intervals do not
  overlap (``▲`` better, ``▼`` worse); otherwise ``n.s.``. Overlapping intervals can still hide a real
  difference: this rule only avoids claiming one that the data do not support. The MAML row compared with is
  the one whose resolved config equals the method's apart from the seed and the plug-ins, when the runs hold
  one (e.g. MAML with ``maml.adapt=no_norm`` for CxGrad run that way), else the preset's plain MAML row.

Example:
    >>> write_report(["runs/study-issue7-cpu"], "runs/study-issue7-cpu/report")
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .diagnostics import read_diagnostics, write_diagnostics
from .evaluation import read_records
from .study import MANIFEST, method_label

# Keys that may differ between the seeds of one row: they do not change what is measured.
SEED_KEYS = ("train.seed", "train.threads", "train.device", "benchmark.data_root", "name")


@dataclass
class Run:
    """One finished run directory."""

    path: Path
    cfg: C.Config
    records: list[dict[str, Any]]           # final evaluation records (the last iteration evaluated)
    metrics: list[dict[str, Any]]
    diagnostics: dict[str, Any] | None
    iteration: int

    @property
    def method(self) -> str:
        return method_label(self.cfg.plugins)

    @property
    def wall(self) -> float | None:
        return next((float(r["wall_s"]) for r in reversed(self.metrics) if "wall_s" in r), None)


@dataclass
class Stat:
    """Pooled statistics of one row on one (benchmark, inner steps)."""

    metric: str
    mean: float
    ci95: float
    tasks: int                 # distinct test tasks
    seed_means: list[float]

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


@dataclass
class Row:
    preset: str
    method: str
    runs: list[Run]
    overrides: list[str] = field(default_factory=list)  # resolved config vs the preset, seed aside
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method} {self.variant}".strip()

    def stats(self) -> dict[tuple[str, int], Stat]:
        """(evaluated benchmark, inner steps) → pooled statistics over the row's seeds."""
        by: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for run in self.runs:
            for r in run.records:
                by.setdefault((r.get("benchmark", run.cfg.benchmark.name), int(r["inner_steps"])), []).append(r)
        return {k: pool(v) for k, v in by.items()}


@dataclass
class NotApplicable:
    preset: str
    method: str
    reason: str
    seeds: int


def pool(records: Sequence[dict[str, Any]]) -> Stat:
    """Pool per-seed records (mean, ci95, tasks over the same test tasks) into one :class:`Stat`."""
    total = sum(int(r["tasks"]) for r in records)
    mean = sum(r["mean"] * r["tasks"] for r in records) / total
    # Each record's population variance, recovered from its ci95 = 1.96·sd/√n (evaluation.mean_ci95).
    second = sum(r["tasks"] * ((r["ci95"] * math.sqrt(r["tasks"]) / 1.96) ** 2 + r["mean"] ** 2) for r in records)
    sd = math.sqrt(max(second / total - mean**2, 0.0))
    n = max(int(r["tasks"]) for r in records)
    return Stat(records[0]["metric"], mean, 1.96 * sd / math.sqrt(n), n, [float(r["mean"]) for r in records])


def compare(stat: Stat, base: Stat) -> str:
    """``▲`` / ``▼`` when the 95% intervals do not overlap (better / worse than ``base``), else ``n.s.``."""
    if stat.low > base.high:
        better = stat.metric == "accuracy"
    elif stat.high < base.low:
        better = stat.metric != "accuracy"
    else:
        return "n.s."
    return "▲ better" if better else "▼ worse"


# ------------------------------------------------------------------------------------------------ collecting
def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding ``config.json``) at or below ``paths``, in sorted order, report folders aside."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / "config.json").is_file():
            found.append(p)
        else:
            found += sorted(c.parent for c in p.rglob("config.json"))
    return list(dict.fromkeys(found))


def load_run(path: Path, compute: bool = True) -> Run | None:
    """A finished run (None when it has no final evaluation yet)."""
    from .plots import read_metrics

    cfg = C.load(path / "config.json")
    records = read_records(path)
    if not records:
        return None
    last = max(int(r.get("iteration", 0)) for r in records)
    final: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:  # the latest record per (benchmark, split, steps) at the last iteration
        if int(r.get("iteration", 0)) == last and r.get("split") == cfg.eval.split:
            final[(r.get("benchmark"), r["inner_steps"])] = r
    diag = read_diagnostics(path)
    if (diag is None or diag.get("iteration") != last) and compute and (path / "checkpoint.pt").is_file():
        diag = write_diagnostics(path)
    return Run(path, cfg, list(final.values()), read_metrics(path), diag, last)


def _signature(cfg: C.Config, plugins: bool = True) -> str:
    """The resolved config apart from the seed (and the plug-ins and their arguments when ``plugins`` is false:
    a method row's matching MAML row has the same one)."""
    flat = {k: v for k, v in C._leaves(C.to_dict(cfg)).items() if k not in SEED_KEYS
            and (plugins or not (k == "plugins" or k.startswith("plugin_args")))}
    return json.dumps(flat, sort_keys=True, default=str)


def _changes(cfg: C.Config, base: C.Config) -> list[str]:
    """``key=value`` for every key (seed aside) where ``cfg`` differs from ``base``."""
    now, was = C._leaves(C.to_dict(cfg)), C._leaves(C.to_dict(base))
    return [f"{k}={json.dumps(now.get(k))}" for k in C.diff(base, cfg) if k not in SEED_KEYS and now.get(k) != was.get(k)]


def _overrides(cfg: C.Config) -> list[str]:
    """The resolved config's differences from its preset (seed aside), as ``key=value``."""
    try:
        return _changes(cfg, C.resolve(cfg.name))
    except C.ConfigError:
        return ["(not a preset: see config.json)"]


def group(runs: Sequence[Run]) -> list[Row]:
    """Rows by (preset, method, config apart from the seed); variants of one (preset, method) are numbered."""
    by: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        by.setdefault((run.cfg.name, run.method, _signature(run.cfg)), []).append(run)
    rows: list[Row] = []
    first: dict[tuple[str, str], C.Config] = {}
    for (preset, method, _), members in by.items():
        cfg = members[0].cfg
        variant = ""
        if (preset, method) in first:   # named by what differs from the first row of its (preset, method)
            variant = "[" + ", ".join(_changes(cfg, first[(preset, method)])) + "]"
        first.setdefault((preset, method), cfg)
        rows.append(Row(preset, method, sorted(members, key=lambda r: r.cfg.train.seed), _overrides(cfg), variant))
    order = {"maml": 0}
    return sorted(rows, key=lambda r: (r.preset, order.get(r.method, 1), r.method.count("+"), r.method, r.variant))


def not_applicable(paths: Sequence[str | Path]) -> list[NotApplicable]:
    """N/A and failed cells of the studies (``study.json``) at the given paths."""
    out: dict[tuple[str, str], NotApplicable] = {}
    for p in map(Path, paths):
        for manifest in [p / MANIFEST] if (p / MANIFEST).is_file() else []:
            for c in json.loads(manifest.read_text()).get("cells", []):
                if c.get("status") in ("n/a", "failed"):
                    key = (c["preset"], c["method"])
                    reason = c["reason"] if c["status"] == "n/a" else f"failed: {c['reason']}"
                    if key in out:
                        out[key].seeds += 1
                    else:
                        out[key] = NotApplicable(c["preset"], c["method"], reason, 1)
    return list(out.values())


# ------------------------------------------------------------------------------------------------ formatting
def _fmt(stat: Stat) -> str:
    if stat.metric == "accuracy":
        return f"{100 * stat.mean:.2f} ± {100 * stat.ci95:.2f}%"
    return f"{stat.mean:.4f} ± {stat.ci95:.4f}"


def _seed_fmt(stat: Stat) -> str:
    scale = 100 if stat.metric == "accuracy" else 1
    return " / ".join(f"{scale * m:.{2 if scale == 100 else 3}f}" for m in stat.seed_means)


def _main_steps(row: Row) -> int:
    cfg = row.runs[0].cfg
    m = cfg.maml
    return m.inner_steps if m.eval_inner_steps is None else m.eval_inner_steps


def tables(rows: Sequence[Row], na: Sequence[NotApplicable]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, cells) of the report's tables; rendered to Markdown and HTML alike."""
    head = ["benchmark", "method", "metric", "mean ± 95% CI", "vs MAML", "per-seed means", "tasks", "seeds",
            "iterations", "train wall s/seed"]
    main, steps_rows = [], []
    # A method row is compared with the MAML row of the same config apart from the plug-ins (e.g. CxGrad with
    # adapt=no_norm against MAML with adapt=no_norm) when the runs hold one, else with the preset's MAML row.
    base: dict[tuple[str, str, int], Stat] = {}
    matched: dict[tuple[str, str, int], tuple[Row, Stat]] = {}
    for row in rows:
        if row.method == "maml":
            sig, stats = _signature(row.runs[0].cfg, plugins=False), row.stats()
            matched.update({(sig, b, k): (row, s) for (b, k), s in stats.items()})
            if not row.variant:
                base.update({(row.preset, b, k): s for (b, k), s in stats.items()})

    def reference(row: Row, sig: Any, bench: str, steps: int) -> tuple[Stat | None, Row | None]:
        """The MAML statistics a row is compared with on (bench, steps), and the matched MAML row if any."""
        twin = matched.get((sig, bench, steps))
        return (twin[1], twin[0]) if twin else (base.get((row.preset, bench, steps)), None)

    for row in rows:
        stats = row.stats()
        k = _main_steps(row)
        sig = _signature(row.runs[0].cfg, plugins=False)
        walls = [r.wall for r in row.runs if r.wall is not None]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "–"
        own = row.runs[0].cfg.benchmark.name
        for (bench, steps), s in sorted(stats.items(), key=lambda kv: (kv[0][0] != own, kv[0])):
            cross = bench != own
            if steps != k and (bench, k) in stats:   # the other step counts: the step table below
                continue
            ref, twin = reference(row, sig, bench, steps)
            vs = "(reference)" if row.method == "maml" else compare(s, ref) if ref else "–"
            if twin and twin.variant and row.method != "maml":
                vs += f" (vs {twin.name})"
            label = f"{row.preset} → {bench}" if cross else row.preset
            metric = f"{s.metric} ({steps} step{'' if steps == 1 else 's'})"
            main.append([label, row.name, metric, _fmt(s), vs, _seed_fmt(s), str(s.tasks),
                         str(len(s.seed_means)), str(row.runs[0].iteration), wall])
        for bench in sorted({b for b, _ in stats}, key=lambda b: (b != own, b)):
            counts = sorted(kk for b, kk in stats if b == bench)
            if len(counts) < 2:
                continue
            cells = []
            for steps in counts:
                s = stats[(bench, steps)]
                ref, _ = reference(row, sig, bench, steps)
                mark = "" if row.method == "maml" else f" {compare(s, ref).split()[0]}" if ref else " –"
                cells.append(f"{steps}: {_fmt(s)}{mark}")
            label = row.preset if bench == own else f"{row.preset} → {bench}"
            steps_rows.append([label, row.name, "; ".join(cells)])
    for n in na:
        main.append([n.preset, n.method, "–", "N/A (see below)", "–", "–", "–", str(n.seeds), "–", "–"])
    main.sort(key=lambda cells: cells[0].split(" → ")[0])  # stable: N/A rows join their benchmark's rows
    out = [("Test results (final evaluation, pooled over seeds)", head, main)]
    if steps_rows:
        out.append(("Test metric after each reported number of inner steps (▲/▼/n.s.: against MAML after as many)",
                    ["benchmark", "method", "steps: mean ± 95% CI"], steps_rows))
    diag = diagnostic_rows(rows)
    if diag:
        out.append((DIAG_TITLE,
                    ["benchmark", "method", "steps", "per-sample loss median", "q90", "q90/median",
                     "within-task sd (mean ± 95% CI)", "tasks", "inner grad norm: first / last layer weight"],
                    diag))
    if na:
        out.append(("Not applicable or failed", ["benchmark", "method", "seeds", "reason"],
                    [[n.preset, n.method, str(n.seeds), n.reason] for n in na]))
    out.append(("Run directories and resolved configs (differences from the preset, seed aside)",
                ["benchmark", "method", "config overrides", "run directories"],
                [[r.preset, r.name, ", ".join(r.overrides) or "(preset as is)",
                  ", ".join(str(x.path) for x in r.runs)] for r in rows]))
    return out


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def diagnostic_rows(rows: Sequence[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        diags = [r.diagnostics for r in row.runs if r.diagnostics]
        if not diags:
            continue
        norms = [d.get("inner_grad_norm", {}) for d in diags]
        weights = [n for n in norms[0] if n.endswith("weight")]
        gn = "–"
        if weights:
            first = sum(n[weights[0]] for n in norms) / len(norms)
            last = sum(n[weights[-1]] for n in norms) / len(norms)
            gn = f"{first:.3g} / {last:.3g}"
        # The main (test) step count, then the training one when the diagnostics hold it (older files may not).
        main, trained = _main_steps(row), row.runs[0].cfg.maml.inner_steps
        for k in map(str, dict.fromkeys([main, trained])):
            samples = [x for d in diags for task in d["sample_losses"].get(k, []) for x in task]
            sds = [_sd(task) for d in diags for task in d["sample_losses"].get(k, [])]
            if not samples:
                continue
            med, q90 = _quantile(samples, 0.5), _quantile(samples, 0.9)
            n_tasks = max(len(d["sample_losses"].get(k, [])) for d in diags)  # distinct tasks (shared by seeds)
            sd_mean = sum(sds) / len(sds)
            sd_ci = 1.96 * _sd(sds) / math.sqrt(n_tasks)
            out.append([row.preset, row.name, k, f"{med:.4g}", f"{q90:.4g}", f"{q90 / max(med, 1e-12):.3g}",
                        f"{sd_mean:.4g} ± {sd_ci:.2g}", str(n_tasks), gn])
    return out


def _sd(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc])


def html_table(header: list[str], cells: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


DIAG_TITLE = ("Per-sample query losses after adaptation and first-step inner-gradient norms on the first test "
              "tasks, all seeds (diagnostics.json; CI: 1.96·sd/√tasks)")
HTML_HEAD = ("<!doctype html><html><head><meta charset='utf-8'><title>metagrad report</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>"
             "</head><body><h1>metagrad report</h1>")
RULE = ("Pooled mean over seeds × test tasks ± 95% CI = 1.96·sd/√n, sd over all seed × task values and n the "
        "number of distinct test tasks (the seeds share the test tasks). A method is marked ▲/▼ against MAML on "
        "the same benchmark only when the two 95% intervals do not overlap; otherwise n.s. (not significant). "
        "The MAML row is the one with the method's config apart from the plug-ins when there is one (named "
        "in the column, e.g. vs maml [maml.adapt=\"no_norm\"]), else the preset's plain MAML row.")


def write_report(paths: Sequence[str | Path], out_dir: str | Path | None = None, compute: bool = True,
                 command: str | None = None) -> Path:
    """Collect the runs below ``paths``, write ``report.md``, ``report.html`` and PNGs into ``out_dir``.

    Returns the path of ``report.md``.
    """
    from . import report_plots as RP

    roots = [Path(p) for p in paths]
    out = Path(out_dir) if out_dir else roots[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = [d for d in find_runs(roots) if out not in d.parents]
    loaded = [(d, load_run(d, compute)) for d in dirs]
    runs = [r for _, r in loaded if r is not None]
    pending = [d for d, r in loaded if r is None]
    rows = group(runs)
    na = not_applicable(roots)
    figures = RP.plot_all(rows, out)
    commands = [command] if command else []
    for p in roots:
        if (p / MANIFEST).is_file():
            cmd = json.loads((p / MANIFEST).read_text()).get("command")
            if cmd and cmd not in commands:
                commands.insert(0, cmd)
    tabs = tables(rows, na)

    md = ["# metagrad report", ""]
    html_parts = [HTML_HEAD]
    if commands:
        md += ["Produced by:", "", "```", *commands, "```", ""]
        html_parts.append("<p>Produced by:</p><pre>" + html.escape("\n".join(commands)) + "</pre>")
    md += [f"{len(runs)} finished runs in {len(rows)} rows, from {', '.join(map(str, roots))}.", "", RULE, ""]
    html_parts.append(f"<p>{len(runs)} finished runs in {len(rows)} rows.</p><p>{html.escape(RULE)}</p>")
    if pending:
        line = f"Not finished (no evaluation yet, left out): {', '.join(map(str, pending))}"
        md += [line, ""]
        html_parts.append(f"<p>{html.escape(line)}</p>")
    for title, head, cells in tabs:
        md += [f"## {title}", "", markdown_table(head, cells), ""]
        html_parts.append(f"<h2>{html.escape(title)}</h2>{html_table(head, cells)}")
    md += ["## Figures", ""]
    html_parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        md += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
        html_parts.append(f"<h3>{html.escape(caption)}</h3><img src='{html.escape(path.name)}' alt=''>")
    html_parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(html_parts) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


__all__ = ["Row", "Run", "Stat", "compare", "find_runs", "group", "load_run", "pool", "tables", "write_report"]
