"""Reports: tables (Markdown and HTML) and plots of finished runs, grouped by benchmark preset and method.

``metagrad report RUN_OR_STUDY_DIR ... --out DIR`` collects every run directory below the given paths
(``config.json`` + ``eval.json`` + ``metrics.jsonl``, and ``diagnostics.json``, computed from the checkpoint
when missing), groups them into rows by (preset, method, resolved config apart from the seed) and writes
``report.md``, ``report.html`` and PNG figures into ``DIR``.

Statistics (:mod:`metagrad.stats`), per row and evaluated (benchmark, inner steps); the seed is the unit:

- per seed: the run's final evaluation, mean over its n test tasks (the per-task scores in ``scores.json``); a
  row whose runs rotate the held-out classes (``benchmark.kwargs.fold``, graphs) joins each seed's folds in fold
  order, so a seed's mean is the mean over the rotations and its tasks are every fold's;
- the row: the mean of the per-seed means ± the 95% t-interval over seeds (none with one seed);
- against the host alone (MAML, or ProtoNet for a ProtoNet): the difference of the means with its 95% interval
  and p-value from the paired t-test on the per-seed mean differences over the same test tasks (equal
  ``task_set`` digests; seeds paired by ``train.seed``, Welch when the seeds differ),
  :func:`metagrad.stats.compare`. The p-values of every comparison in the report form one family, adjusted by
  Holm's method; ``▲``/``▼`` (better / worse) only where the adjusted p < 0.05, else ``n.s.``. The host row
  compared with is the one whose resolved config equals the method's apart from the seed and the plug-ins,
  when the runs hold one (e.g. MAML with ``maml.adapt=no_norm`` for CxGrad run that way), else the preset's row
  without plug-ins.

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

import numpy as np

from . import config as C
from . import rundir as R
from . import stats
from .family import Family, Result, family_table, read_family
from .plateau import POINTS, RELATIVE, plateau
from .rundir import method_label

# Keys that may differ between the runs of one row: the seed and the rotation of held-out classes are its
# replicates; the others do not change what is measured.
SEED_KEYS = ("train.seed", "benchmark.kwargs.fold", "train.threads", "train.device", "benchmark.data_root", "name")


@dataclass
class Run:
    """One finished run directory."""

    path: Path
    cfg: C.Config
    records: list[dict[str, Any]]           # final evaluation records (the last iteration evaluated)
    metrics: list[dict[str, Any]]
    diagnostics: dict[str, Any] | None
    iteration: int
    scores: dict[str, list[float]] = field(default_factory=dict)   # scores.json

    @property
    def method(self) -> str:
        return method_label(self.cfg.plugins)

    @property
    def wall(self) -> float | None:
        return next((float(r["wall_s"]) for r in reversed(self.metrics) if "wall_s" in r), None)


@dataclass
class Stat:
    """One row's scores on one (benchmark, inner steps), over its seeds."""

    metric: str
    mean: float                # mean of the per-seed means
    ci95: float                # half-width of the 95% t-interval over seeds (NaN with one seed)
    tasks: int                 # test tasks per seed
    seed_means: list[float]
    seeds: list[int] = field(default_factory=list)         # train.seed of each seed's run, same order
    values: np.ndarray | None = None                        # [seeds, tasks] per-task scores when all kept them
    task_set: str | None = None                             # the digest of the scored tasks, when recorded

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
    _stats: dict[tuple[str, int], Stat] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The method as the tables show it: a row without plug-ins is named by its learner (``maml``, or
        ``protonet`` for a ProtoNet alone), a plug-in row by its plug-ins."""
        learner = self.runs[0].cfg.learner if self.runs else "maml"
        method = learner if self.method == "maml" else self.method
        return f"{method} {self.variant}".strip()

    def stats(self) -> dict[tuple[str, int], Stat]:
        """(evaluated benchmark, inner steps) → statistics over the row's seeds (computed once per row: the
        comparisons and every table read them)."""
        if self._stats is None:
            by: dict[tuple[str, int], list[tuple[Run, dict[str, Any]]]] = {}
            for run in self.runs:
                for r in run.records:
                    key = (r.get("benchmark", run.cfg.benchmark.name), int(r["inner_steps"]))
                    by.setdefault(key, []).append((run, r))
            self._stats = {k: seed_stat(v) for k, v in by.items()}
        return self._stats


@dataclass
class NotApplicable:
    preset: str
    method: str
    reason: str
    seeds: int


def seed_stat(members: Sequence[tuple[Run, dict[str, Any]]]) -> Stat:
    """The :class:`Stat` of one row on one (benchmark, steps) from its runs and their final records: one
    replicate per ``train.seed``, its folds (rotations of the held-out classes) joined in fold order."""
    by_seed: dict[int, list[tuple[Any, Run, dict[str, Any]]]] = {}
    for run, r in members:
        by_seed.setdefault(run.cfg.train.seed, []).append((run.cfg.benchmark.kwargs.get("fold", -1), run, r))
    seeds = sorted(by_seed)
    means, arrays, sets, tasks = [], [], set(), set()
    for seed in seeds:
        parts = sorted(by_seed[seed], key=lambda x: x[0])
        values = [run.scores.get(r.get("scores_key", "")) for _, run, r in parts]
        n = sum(int(r["tasks"]) for _, _, r in parts)
        means.append(sum(float(r["mean"]) * int(r["tasks"]) for _, _, r in parts) / n)
        arrays.append(None if any(v is None for v in values) else [x for v in values for x in v])
        digests = [r.get("task_set") for *_, r in parts]
        sets.add(None if not all(digests) else digests[0] if len(parts) == 1
                 else "+".join(f"fold{f}:{d}" for (f, *_), d in zip(parts, digests)))
        tasks.add(n)
    mean, ci = stats.seed_interval(means)
    array = None
    if all(a is not None for a in arrays) and len({len(a) for a in arrays}) == 1:
        array = np.asarray(arrays, dtype=np.float64)
    task_set = sets.pop() if len(sets) == 1 else "mixed"
    metric = members[0][1]["metric"]
    return Stat(metric, mean, ci, max(tasks), means, seeds, array, task_set)


def compare(stat: Stat, base: Stat, alternative: str = "two-sided") -> stats.Comparison | str:
    """``stat`` against ``base`` (:func:`metagrad.stats.compare`), or why they cannot be compared."""
    if "mixed" in (stat.task_set, base.task_set) or (stat.task_set and base.task_set
                                                     and stat.task_set != base.task_set):
        return "different test tasks"
    if stat.values is not None and base.values is not None and stat.values.shape[1] == base.values.shape[1]:
        a, b = stat.values, base.values
    else:  # older records without per-task scores: the per-seed means give the same test statistic
        a, b = np.asarray(stat.seed_means)[:, None], np.asarray(base.seed_means)[:, None]
    return stats.compare(a, b, paired=sorted(stat.seeds) == sorted(base.seeds) and len(stat.seeds) == len(base.seeds),
                         alternative=alternative)


def verdict(c: stats.Comparison | str, adjusted: float, metric: str) -> str:
    """``▲ better`` / ``▼ worse`` where the Holm-adjusted p < 0.05, ``n.s.`` otherwise, ``–`` when untestable."""
    if isinstance(c, str) or math.isnan(adjusted):
        return "–"
    if adjusted >= 0.05:
        return "n.s."
    return "▲ better" if (c.diff > 0) == (metric == "accuracy") else "▼ worse"


# ------------------------------------------------------------------------------------------------ collecting
def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding ``config.json``) at or below ``paths``, in sorted order, report folders aside."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / R.CONFIG).is_file():
            found.append(p)
        else:
            found += sorted(c.parent for c in p.rglob(R.CONFIG))
    return list(dict.fromkeys(found))


def load_run(path: Path, compute: bool = True) -> Run | None:
    """A finished run (None when it has no final evaluation yet)."""
    cfg = R.read_config(path)
    records = R.read_records(path)
    if not records:
        return None
    last = max(int(r.get("iteration", 0)) for r in records)
    final: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:  # the latest record per (benchmark, head, split, steps) at the last iteration
        if int(r.get("iteration", 0)) == last and r.get("split") == cfg.eval.split:
            head = r.get("head")
            if head not in (None, "trained"):   # another head is another view of the model: its own row
                r = {**r, "view_of": r.get("benchmark", cfg.benchmark.name),
                     "benchmark": f"{r.get('benchmark', cfg.benchmark.name)} ({head} head)"}
            final[(r.get("benchmark"), r["inner_steps"])] = r
    diag = R.read_diagnostics(path)
    if (diag is None or diag.get("iteration") != last) and compute and (path / R.CHECKPOINT).is_file():
        from .diagnostics import write_diagnostics  # torch and the learner, only when they must be computed

        diag = write_diagnostics(path)
    return Run(path, cfg, list(final.values()), R.read_metrics(path), diag, last, R.read_scores(path))


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
        for manifest in filter(None, [R.read_manifest(p)]):
            for c in manifest.get("cells", []):
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
    scale, digits, unit = (100, 2, "%") if stat.metric == "accuracy" else (1, 4, "")
    ci = "" if math.isnan(stat.ci95) else f" ± {scale * stat.ci95:.{digits}f}"
    return f"{scale * stat.mean:.{digits}f}{ci}{unit}"


def _seed_fmt(stat: Stat) -> str:
    scale = 100 if stat.metric == "accuracy" else 1
    return " / ".join(f"{scale * m:.{2 if scale == 100 else 3}f}" for m in stat.seed_means)


def _diff_fmt(c: stats.Comparison | str, metric: str) -> str:
    """The difference to MAML with its 95% interval (points of accuracy, or MSE units)."""
    if isinstance(c, str):
        return f"– ({c})"
    scale, digits, unit = (100, 2, " pts") if metric == "accuracy" else (1, 4, "")
    if math.isnan(c.low):
        return f"{scale * c.diff:+.{digits}f}{unit} (one seed: no interval)"
    return f"{scale * c.diff:+.{digits}f} [{scale * c.low:+.{digits}f}, {scale * c.high:+.{digits}f}]{unit}"


def _p_fmt(adjusted: float) -> str:
    return "–" if math.isnan(adjusted) else f"{adjusted:.3g}"


def _main_steps(row: Row) -> int:
    return row.runs[0].cfg.test_steps


def comparisons(rows: Sequence[Row]) -> dict[tuple[int, str, int], tuple[stats.Comparison | str, float, Row | None]]:
    """Every comparison the report makes: (row index, benchmark, steps) of a method row → (the comparison with
    its MAML reference, the Holm-adjusted p over the family, the matched MAML row if any). The family: every
    testable comparison at a row's verdict step counts (:func:`verdict_steps`); the others get NaN.

    A method row is compared with the MAML row of the same config apart from the plug-ins (e.g. CxGrad with
    adapt=no_norm against MAML with adapt=no_norm) when the runs hold one, else with the preset's MAML row, on
    every (benchmark, steps) both were scored on.
    """
    base: dict[tuple[str, str, int], Stat] = {}
    matched: dict[tuple[str, str, int], tuple[Row, Stat]] = {}
    for row in rows:
        if row.method == "maml":
            sig, st = _signature(row.runs[0].cfg, plugins=False), row.stats()
            matched.update({(sig, b, k): (row, s) for (b, k), s in st.items()})
            if not row.variant:
                base.update({(row.preset, b, k): s for (b, k), s in st.items()})
    found: dict[tuple[int, str, int], tuple[stats.Comparison | str, Row | None]] = {}
    for i, row in enumerate(rows):
        if row.method == "maml":
            continue
        sig = _signature(row.runs[0].cfg, plugins=False)
        for (bench, steps), s in row.stats().items():
            twin = matched.get((sig, bench, steps))
            ref = twin[1] if twin else base.get((row.preset, bench, steps))
            if ref is not None:
                found[(i, bench, steps)] = (compare(s, ref), twin[0] if twin else None)
    keys = list(found)
    family = [k for k in keys if not isinstance(found[k][0], str) and k[2] in verdict_steps(rows[k[0]])]
    adjusted = dict(zip(family, stats.holm([found[k][0].p for k in family])))
    return {k: (found[k][0], adjusted.get(k, math.nan), found[k][1]) for k in keys}


# ------------------------------------------------------------------------------------------------ a family
def _in_family(run: Run, fam: Family) -> bool:
    leaves = C._leaves(C.to_dict(run.cfg))
    return all(leaves.get(k) == v for k, v in fam.config.items())


def confirm(fam: Family, runs: Sequence[Run]) -> list[Result]:
    """Each hypothesis tested on ``runs`` (:class:`metagrad.report.Run`), Holm-adjusted over the family."""
    runs = [r for r in runs if _in_family(r, fam)]
    out: list[Result] = []
    for h in fam.hypotheses:
        mine = [r for r in runs if r.cfg.name == h.preset and r.cfg.train.seed in h.seeds]
        method_rows = [row for row in group([r for r in mine if r.method == h.method])]
        if len(method_rows) != 1:
            reason = "no runs yet" if not method_rows else f"{len(method_rows)} configs of {h.method}: ambiguous"
            out.append(Result(h, [], None, math.nan, reason=reason))
            continue
        row = method_rows[0]
        sig = _signature(row.runs[0].cfg, plugins=False)
        base = [r for r in mine if r.method == "maml" and _signature(r.cfg, plugins=False) == sig]
        seeds = sorted({r.cfg.train.seed for r in row.runs} & {r.cfg.train.seed for r in base})
        if not seeds:
            out.append(Result(h, [], None, math.nan, reason="no matched MAML run at these seeds yet"))
            continue
        a = Row(h.preset, h.method, [r for r in row.runs if r.cfg.train.seed in seeds]).stats()
        b = Row(h.preset, "maml", sorted((r for r in base if r.cfg.train.seed in seeds),
                                            key=lambda r: r.cfg.train.seed)).stats()
        key = (h.benchmark, h.steps)
        if key not in a or key not in b:
            out.append(Result(h, seeds, None, math.nan, reason=f"not scored on {h.benchmark} after {h.steps} steps"))
            continue
        c = compare(a[key], b[key], alternative=fam.alternative)
        if isinstance(c, str):
            out.append(Result(h, seeds, None, math.nan, reason=c))
            continue
        out.append(Result(h, seeds, c, math.nan, a[key].mean, b[key].mean, metric=a[key].metric))
    ps = [1.0 if r.comparison is None or math.isnan(r.comparison.p) else r.comparison.p for r in out]
    for r, adj in zip(out, stats.holm(ps)):
        r.adjusted = adj
    return out


def verdict_steps(row: Row) -> set[int]:
    """The step counts a row is judged at: its test count only, so that one family never holds two views of the
    same models (after 1 step and after k). Other counts (0 steps, the training count) are shown with their
    difference but are not in the family and get no verdict; a preregistered family (:mod:`metagrad.family`)
    names the count it tests."""
    return {_main_steps(row)}


def tables(rows: Sequence[Row], na: Sequence[NotApplicable]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, cells) of the report's tables; rendered to Markdown and HTML alike."""
    head = ["benchmark", "method", "metric", "mean ± 95% CI (seeds)", "vs host alone: difference [95% CI]",
            "p (Holm)", "verdict", "per-seed means", "tasks", "seeds", "iterations", "train wall s/seed"]
    main, steps_rows = [], []
    comps = comparisons(rows)
    for i, row in enumerate(rows):
        stats_ = row.stats()
        k = _main_steps(row)
        walls = [r.wall for r in row.runs if r.wall is not None]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "–"
        own = row.runs[0].cfg.benchmark.name
        for (bench, steps), s in sorted(stats_.items(), key=lambda kv: (kv[0][0] != own, kv[0])):
            cross = bench != own
            if steps != k and (bench, k) in stats_:   # the other step counts: the step table below
                continue
            if row.method == "maml":
                diff, p, mark = "(reference)", "", ""
            elif (i, bench, steps) in comps:
                c, adj, twin = comps[(i, bench, steps)]
                diff, p, mark = _diff_fmt(c, s.metric), _p_fmt(adj), verdict(c, adj, s.metric)
                if twin and twin.variant:
                    mark += f" (vs {twin.name})"
            else:
                diff, p, mark = "– (no MAML row)", "–", "–"
            label = f"{row.preset} → {bench}" if cross else row.preset
            metric = f"{s.metric} ({steps} step{'' if steps == 1 else 's'})"
            main.append([label, row.name, metric, _fmt(s), diff, p, mark, _seed_fmt(s), str(s.tasks),
                         str(len(s.seed_means)), str(row.runs[0].iteration), wall])
        for bench in sorted({b for b, _ in stats_}, key=lambda b: (b != own, b)):
            counts = sorted(kk for b, kk in stats_ if b == bench)
            if len(counts) < 2:
                continue
            cells = []
            for steps in counts:
                s = stats_[(bench, steps)]
                mark = ""
                if row.method != "maml":
                    c, adj, _ = comps.get((i, bench, steps), ("no MAML row", math.nan, None))
                    mark = f" {verdict(c, adj, s.metric).split()[0]}"
                    if not isinstance(c, str):
                        p = _p_fmt(adj) if steps in verdict_steps(row) else "– (not a verdict step count)"
                        mark += f" {_diff_fmt(c, s.metric)}, p {p}"
                cells.append(f"{steps}: {_fmt(s)}{mark}")
            label = row.preset if bench == own else f"{row.preset} → {bench}"
            steps_rows.append([label, row.name, "; ".join(cells)])
    for n in na:
        main.append([n.preset, n.method, "–", "N/A (see below)", "–", "–", "–", "–", "–", str(n.seeds), "–", "–"])
    main.sort(key=lambda cells: cells[0].split(" → ")[0])  # stable: N/A rows join their benchmark's rows
    family = sum(not math.isnan(adj) for _, adj, _ in comps.values())
    title = (f"Test results (final evaluation, over seeds; a family of {family} comparisons with the host "
             "alone, Holm-adjusted)")
    out = [(title, head, main)]
    if steps_rows:
        title = ("Test metric after each reported number of inner steps (▲/▼/n.s.: against the host alone after "
                 "as many, the difference and Holm-adjusted p of the same family)")
        out.append((title,
                    ["benchmark", "method", "steps: mean ± 95% CI"], steps_rows))
    curves = plateau_rows(rows)
    if curves:
        out.append((PLATEAU_TITLE, ["benchmark", "method", "validation steps", "per seed: start → end (gain)",
                                    "plateau reached"], curves))
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


PLATEAU_TITLE = (f"Validation plateau (metagrad.plateau: under {100 * POINTS:.1f} points of accuracy, or "
                 f"{100 * RELATIVE:.0f}% of an error, gained or lost from the validation nearest 0.75·N to N)")


def plateau_rows(rows: Sequence[Row]) -> list[list[str]]:
    """Per row, the plateau criterion on every seed's validation curve (rows without validations left out)."""
    out = []
    for row in rows:
        found = [(run, plateau(run.metrics)) for run in row.runs]
        found = [(run, p) for run, p in found if p is not None]
        if not found:
            continue
        acc = found[0][1].metric == "accuracy"
        cells = [f"seed {run.cfg.train.seed}{_fold(run)}: {_val(p.before, acc)} → {_val(p.after, acc)} "
                 f"({100 * p.gain:+.2f}{' pts' if acc else '%'})" for run, p in found]
        steps = sorted({f"{p.start} → {p.end}" for _, p in found})
        reached = sum(p.reached for _, p in found)
        off = [f"seed {run.cfg.train.seed}{_fold(run)} {p.status}" for run, p in found if not p.reached]
        out.append([row.preset, row.name, ", ".join(steps), "; ".join(cells),
                    f"{'yes' if reached == len(found) else 'no'} ({reached} of {len(found)})"
                    + (f": {', '.join(off)}" if off else "")])
    return out


def _val(v: float, accuracy: bool) -> str:
    return f"{100 * v:.2f}%" if accuracy else f"{v:.4g}"


def _fold(run: Run) -> str:
    fold = run.cfg.benchmark.kwargs.get("fold")
    return "" if fold is None else f" fold {fold}"


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
RULE = ("The seed is the unit of replication. Each row: the mean of its per-seed means ± the 95% t-interval "
        "over seeds. Against the host alone (the same learner without plug-ins: MAML, or ProtoNet for a "
        "ProtoNet): the difference of the means with its 95% interval and p from the paired t-test "
        "on the per-seed mean differences over the same test tasks (seeds paired by train.seed; Welch when the "
        "seeds differ); the p-values of every comparison at a row's test step count form one exploratory family "
        "over the whole report, Holm-adjusted (other step counts, e.g. 0 or the training count, are descriptive). ▲/▼ "
        "only where the adjusted p < 0.05, else n.s. The host row is the one with the method's config apart "
        "from the plug-ins when there is one (named in the column, e.g. vs maml [maml.adapt=\"no_norm\"]), else "
        "the preset's row without plug-ins.")


def write_report(paths: Sequence[str | Path], out_dir: str | Path | None = None, compute: bool = True,
                 command: str | None = None, family: str | Path | None = None,
                 exclude: Sequence[str] = ()) -> Path:
    """Collect the runs below ``paths``, write ``report.md``, ``report.html`` and PNGs into ``out_dir``.

    With ``family`` (a preregistration file, :mod:`metagrad.family`), the confirmatory table of its hypotheses
    comes first, apart from the exploratory tables of every run. ``exclude`` names evaluated benchmarks (e.g. a
    cross-domain view) whose records are left out of every table and family. Returns the path of ``report.md``.
    """
    from . import report_plots as RP
    fam = read_family(family) if family is not None else None   # a bad file stops before anything is written
    roots = [Path(p) for p in paths]
    out = Path(out_dir) if out_dir else roots[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = [d for d in find_runs(roots) if out not in d.parents]
    loaded = [(d, load_run(d, compute)) for d in dirs]
    runs = [r for _, r in loaded if r is not None]
    for run in runs:
        run.records = [r for r in run.records
                       if r.get("view_of", r.get("benchmark", run.cfg.benchmark.name)) not in exclude]
    pending = [d for d, r in loaded if r is None]
    rows = group(runs)
    na = not_applicable(roots)
    figures = RP.plot_all(rows, out)
    commands = [command] if command else []
    for p in roots:
        cmd = (R.read_manifest(p) or {}).get("command")
        if cmd and cmd not in commands:
            commands.insert(0, cmd)
    tabs = tables(rows, na)
    if fam is not None:
        tabs = [family_table(fam, confirm(fam, runs)),
                *[(f"Exploratory: {t[0]}" if i == 0 else t[0], t[1], t[2]) for i, t in enumerate(tabs)]]

    md = ["# metagrad report", ""]
    html_parts = [HTML_HEAD]
    if commands:
        md += ["Produced by:", "", "```", *commands, "```", ""]
        html_parts.append("<p>Produced by:</p><pre>" + html.escape("\n".join(commands)) + "</pre>")
    md += [f"{len(runs)} finished runs in {len(rows)} rows, from {', '.join(map(str, roots))}."
           + (f" Left out: the records on {', '.join(exclude)}." if exclude else ""), "", RULE, ""]
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
    R.write_atomic(out / "report.html", "\n".join(html_parts) + "\n")
    path = out / "report.md"
    R.write_atomic(path, "\n".join(md))
    return path


__all__ = ["Row", "Run", "Stat", "compare", "comparisons", "confirm", "find_runs", "group", "load_run", "seed_stat", "tables",
           "verdict", "write_report"]
