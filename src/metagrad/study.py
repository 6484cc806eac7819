"""Studies: a named grid of presets × methods × seeds, run cell by cell (resumable), then reported.

A study is a small TOML file in ``metagrad/configs/studies/`` (or any ``.toml`` path)::

    description = "MAML and the plug-ins on sinusoid regression, CPU budget"
    presets = ["sinusoid-5shot", "sinusoid-10shot"]
    methods = ["maml", "meta_gna", "cxgrad", "trlearner", "cml", "meta_gna+trlearner+cml"]
    seeds = 3
    set = ["train.iterations=5000"]               # every cell: equal budgets per benchmark
    [preset_set]                                  # per preset (optional)
    "omniglot-5w1s" = ["train.iterations=2000"]
    [method_set]                                  # per method (optional), e.g. CxGrad's BN affine outer-only
    cxgrad = ["maml.adapt=no_norm"]
    [cross_domain]                                # after training, also evaluate on these benchmarks
    "omniglot-5w1s" = ["mnist"]
    [folds]                                       # rotations of the held-out classes (optional, graphs)
    "cora-2w5s" = 4                               # cells with benchmark.kwargs.fold = 0 .. 3

A method is ``maml`` (no plug-in) or plug-in keys joined by ``+`` (applied in that order); every cell is the
preset with ``plugins=...`` and ``train.seed=k`` set, so no preset file per method is needed. Cell ``(preset,
method, k)`` runs into ``<out>/<preset>/<method label>/seed<k>`` (label: the sorted keys joined by ``+``); with
``folds``, each fold f of a preset is a cell of its own, ``<out>/<preset>/<method label>/fold<f>/seed<k>``, and
the report averages a method over the folds (see :mod:`metagrad.report`).

After training, each cell is scored after its test step count and, when training used another one (e.g. 1 step
in training, 3 at test), after that one too, on its own benchmark and every cross-domain one.

Resuming: a cell whose ``eval.json`` holds its final evaluation is skipped (scores it lacks are added); a cell
with a checkpoint continues from it; a cell killed before its first checkpoint starts again. A combination the
model cannot take (CxGrad on an MLP) is recorded as N/A with the reason and skipped. ``<out>/study.json`` keeps
the status of every cell; the report reads it to show the N/A rows.

Keeping: with ``keep=DIR`` each cell's small results (:mod:`metagrad.keep`: config, records, per-task scores,
learning curve; no checkpoints) are copied to ``DIR`` as soon as the cell finishes, with its record in
``DIR/study.json``, and a cell ``DIR`` already holds is not run again: a study longer than a machine's life
loses no finished cell, and ``metagrad report DIR --no-compute`` reports what is kept. ``only`` runs a part of
the grid (``METHOD`` or ``METHOD:SEED``, e.g. ``maml:0``).

Example:
    >>> result = run_study("issue7-cpu", "runs/study-issue7-cpu", seeds=3, jobs=2)
    >>> result.report    # runs/study-issue7-cpu/report/report.md
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .keep import cell_key, keep_run, merge_manifest
from .reading import FileFormatError, read_toml
from .rundir import MANIFEST, cell_dir, held_files, method_label, read_manifest
from .runlock import locked

STUDY_DIR = C.PRESET_DIR / "studies"
_KEYS = ("description", "presets", "methods", "seeds", "set", "preset_set", "method_set", "cross_domain", "folds")


@dataclass
class Study:
    """A grid of presets × methods × seeds with the overrides that make its budgets equal."""

    name: str
    presets: list[str]
    methods: list[str]
    seeds: int = 3
    set: list[str] = field(default_factory=list)                      # overrides of every cell
    preset_set: dict[str, list[str]] = field(default_factory=dict)    # overrides per preset
    method_set: dict[str, list[str]] = field(default_factory=dict)    # overrides per method (plug-in key or label)
    cross_domain: dict[str, list[str]] = field(default_factory=dict)  # preset → benchmarks also evaluated on
    folds: dict[str, int] = field(default_factory=dict)               # preset → rotations of held-out classes
    description: str = ""


@dataclass
class Cell:
    preset: str
    method: str        # label: "maml" or the sorted plug-in keys joined by "+"
    plugins: list[str]  # in the order given by the study
    seed: int
    run_dir: str
    fold: int | None = None  # rotation of the held-out classes (benchmark.kwargs.fold), when the study has folds


@dataclass
class StudyResult:
    out_dir: Path
    cells: list[dict[str, Any]]
    report: Path | None = None


def studies() -> list[str]:
    """Names of the studies shipped with the package."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def method_plugins(method: str) -> list[str]:
    """``"maml"`` → ``[]``; ``"meta_gna+cml"`` → ``["meta_gna", "cml"]``."""
    keys = [k.strip() for k in method.split("+") if k.strip()]
    return [] if keys in ([], ["maml"]) else keys


def load_study(name_or_path: str) -> Study:
    """A study by name (``metagrad/configs/studies/NAME.toml``) or ``.toml`` path; ConfigError if bad."""
    path = Path(name_or_path).expanduser()
    if not (path.suffix == ".toml" or path.is_file()):
        path = STUDY_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise C.ConfigError(f"unknown study {name_or_path!r}: choose one of {', '.join(studies()) or '(none)'} "
                                "or pass a .toml path")
    if not path.is_file():
        raise C.ConfigError(f"study file {str(path)!r} does not exist")
    try:
        raw = read_toml(path)
    except FileFormatError as e:
        raise C.ConfigError(str(e)) from None
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise C.ConfigError(f"{path}: unknown study keys {', '.join(unknown)} (known: {', '.join(_KEYS)})")
    _check_types(path, raw)
    study = Study(name=path.stem, **raw)
    check_study(study, where=str(path))
    return study


# What each key of a study file holds: a check and its words (a string is not a list of names, nor 1.5 a count).
def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _table(check: Any) -> Any:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPES: dict[str, tuple[Any, str]] = {
    "description": (lambda v: isinstance(v, str), "a string"),
    "presets": (lambda v: _names(v) and bool(v), "a non-empty list of preset names, e.g. [\"sinusoid-5shot\"]"),
    "methods": (lambda v: _names(v) and bool(v), "a non-empty list of method names (metagrad list methods)"),
    "seeds": (_count, "a whole number of seeds, e.g. 3"),
    "set": (_names, "a list of \"key=value\" strings"),
    "preset_set": (_table(_names), "a table: preset name = a list of \"key=value\" strings"),
    "method_set": (_table(_names), "a table: method name = a list of \"key=value\" strings"),
    "cross_domain": (_table(_names), "a table: preset name = a list of benchmark names"),
    "folds": (_table(_count), "a table: preset name = a number of folds"),
}
MAX_SEEDS = 1000      # seeds per cell; beyond, a typo that would queue cells for ever
MAX_FOLDS = 100
MAX_CELLS = 100_000


def _check_types(path: Path, raw: dict[str, Any]) -> None:
    for key, value in raw.items():
        ok, what = _TYPES[key]
        if not ok(value):
            raise C.ConfigError(f"{path}: {key} must be {what}, got {value!r:.60}")


def check_study(study: Study, seeds: int | None = None, where: str | None = None) -> None:
    """Everything about a study that needs no cell built: seeds and folds within bounds, folds and per-preset
    tables naming presets of the study, every method made of registered plug-ins, the grid not absurdly large.

    Raises:
        ConfigError: one line naming the study file (``where``) and the key.
    """
    from . import methods as M

    where = where or study.name
    n = study.seeds if seeds is None else seeds
    if not 1 <= n <= MAX_SEEDS:
        raise C.ConfigError(f"{where}: seeds must be in 1..{MAX_SEEDS}, got {n}")
    bad = {k: v for k, v in study.folds.items() if k not in study.presets or not 1 <= v <= MAX_FOLDS}
    if bad:
        raise C.ConfigError(f"{where}: folds must map presets of the study to a number in 1..{MAX_FOLDS}, got {bad}")
    for key in ("preset_set", "cross_domain"):
        stray = sorted(set(getattr(study, key)) - set(study.presets))
        if stray:
            raise C.ConfigError(f"{where}: {key} names {', '.join(stray)}, not presets of the study "
                                f"({', '.join(study.presets)})")
    known = M.available()
    for method in study.methods:
        unknown = [k for k in method_plugins(method) if k not in known]
        if unknown:
            raise C.ConfigError(f"{where}: method {method!r}: unknown plug-in {', '.join(map(repr, unknown))} "
                                f"(known: maml, {', '.join(known)}; join several with +)")
    total = sum(study.folds.get(p, 1) for p in study.presets) * len(study.methods) * n
    if total > MAX_CELLS:
        raise C.ConfigError(f"{where}: the grid has {total} cells, more than {MAX_CELLS}: fewer seeds or methods")
    return study


def cells(study: Study, out_dir: str | Path, seeds: int | None = None) -> list[Cell]:
    """The grid, preset-major (every method and seed of the first preset first)."""
    n = study.seeds if seeds is None else seeds
    grid = []
    for preset in study.presets:
        folds = study.folds.get(preset)
        for method in study.methods:
            plugins = method_plugins(method)
            label = method_label(plugins)
            for fold in range(folds) if folds else [None]:
                grid += [Cell(preset, label, plugins, k, str(cell_dir(out_dir, preset, label, k, fold)), fold)
                         for k in range(n)]
    return grid


def select(grid: Sequence[Cell], only: Sequence[str]) -> list[Cell]:
    """The cells of ``grid`` named by ``only`` (``[PRESET/]METHOD[:SEED]``, e.g. ``maml:0`` in every preset,
    ``sinusoid-10shot/maml:1`` in one); ConfigError for a name of none."""
    chosen: set[int] = set()
    for name in only:
        preset, _, rest = name.strip().rpartition("/")
        method, _, seed = rest.partition(":")
        label = method_label(method_plugins(method))
        hits = {i for i, c in enumerate(grid) if c.method == label and (not seed or str(c.seed) == seed.strip())
                and (not preset or c.preset == preset.strip())}
        if not hits:
            several = len({c.preset for c in grid}) > 1    # then a name may need its preset: show them
            names = sorted({f"{c.preset + '/' if several else ''}{c.method}:{c.seed}" for c in grid})
            raise C.ConfigError(f"--only {name!r} names no cell of the study (cells: {', '.join(names)})")
        chosen |= hits
    return [c for i, c in enumerate(grid) if i in chosen]


def cell_config(study: Study, cell: Cell, overrides: Sequence[str] = ()) -> C.Config:
    """The resolved config of a cell: preset, study overrides, plug-ins, seed, then the command line's."""
    per_method = [*study.method_set.get(cell.method, [])]
    for key in cell.plugins:
        if key != cell.method:
            per_method += study.method_set.get(key, [])
    fold = [] if cell.fold is None else [f"benchmark.kwargs.fold={cell.fold}"]
    return C.resolve(cell.preset, [*study.set, *study.preset_set.get(cell.preset, []),
                                   f"plugins={','.join(cell.plugins)}", *per_method, *fold,
                                   f"train.seed={cell.seed}", *overrides])


# ------------------------------------------------------------------------------------------------ one cell
def _done(cfg: C.Config, run_dir: Path) -> bool:
    from .evaluation import read_records

    return any(r.get("iteration") == cfg.train.iterations and r.get("split") == cfg.eval.split
               and r.get("benchmark", cfg.benchmark.name) == cfg.benchmark.name for r in read_records(run_dir))


def check_cell(cfg: C.Config) -> str | None:
    """None if the learner can be built for this cell, else the reason it cannot (N/A)."""
    from .build import make_benchmark, make_learner

    try:
        bench = make_benchmark(cfg, "train", cfg.train.seed, cfg.train.meta_batch_size)
    except (ValueError, OSError) as e:
        return f"benchmark unavailable: {' '.join(str(e).split())}"
    try:
        make_learner(cfg, bench)
    except ValueError as e:  # a TypeError is a bug, not a combination the model cannot take: run_cell records it
        return " ".join(str(e).split())
    return None


def run_cell(cell: Cell, cfg: C.Config, cross_domain: Sequence[str] = (), diagnostics: bool = True,
             progress: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip) one cell; returns its status record. Never raises for a failing run."""
    run_dir = Path(cell.run_dir)
    record: dict[str, Any] = {**asdict(cell), "status": "", "reason": ""}
    start = time.perf_counter()
    try:
        reason = check_cell(cfg)
        if reason is not None:
            return {**record, "status": "n/a", "reason": reason}
        with locked(run_dir):   # one writer per cell, from its first read to its diagnostics
            record["status"] = _train_cell(cfg, run_dir, cross_domain, diagnostics, progress)
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid; recorded in study.json
        return {**record, "status": "failed", "reason": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    record["seconds"] = time.perf_counter() - start
    return record


def _train_cell(cfg: C.Config, run_dir: Path, cross_domain: Sequence[str], diagnostics: bool,
                progress: bool) -> str:
    """Train, resume or skip a cell whose run directory this process holds locked; score and diagnose it."""
    from . import checkpoint as ckpt
    from .diagnostics import diagnostic_steps, read_diagnostics, write_diagnostics
    from .evaluation import evaluate_run, read_records
    from .train import train

    if _done(cfg, run_dir):
        status = "skipped (done)"
    else:
        resume = bool(ckpt.candidates(run_dir))
        if not resume:  # killed before its first checkpoint: start again
            for name in held_files(run_dir):
                if (run_dir / name).is_file():
                    (run_dir / name).unlink()
        train(cfg, run_dir, resume=resume, progress=progress)
        status = "resumed" if resume else "trained"
    have = {r.get("benchmark") for r in read_records(run_dir) if r.get("iteration") == cfg.train.iterations}
    for name in cross_domain:
        if name not in have:
            evaluate_run(run_dir, split=cfg.eval.split, benchmark=name)
    _score_trained_steps(cfg, run_dir, cross_domain)
    diag = read_diagnostics(run_dir)
    if diagnostics and (diag is None or diag.get("iteration") != cfg.train.iterations
                        or not {str(k) for k in diagnostic_steps(cfg, diag.get("task_type", ""))}
                        <= set(diag.get("sample_losses", {}))):
        write_diagnostics(run_dir)
    return status


def _score_trained_steps(cfg: C.Config, run_dir: Path, cross_domain: Sequence[str]) -> None:
    """Also score the step count the cell was trained with when the evaluation uses another one.

    A learner trained with k inner steps and tested after more (e.g. 1 and 3) can overshoot what it learned
    (Meta-GNA's normalised steps do); the report shows both counts side by side so no method is judged only
    at a step count it never trained for.
    """
    from .evaluation import evaluate_run, read_records

    k = cfg.train_steps
    final = [r for r in read_records(run_dir) if r.get("iteration") == cfg.train.iterations]
    for name in (cfg.benchmark.name, *cross_domain):
        done = {int(r["inner_steps"]) for r in final if r.get("benchmark", cfg.benchmark.name) == name}
        if done and k not in done:
            evaluate_run(run_dir, split=cfg.eval.split, benchmark=None if name == cfg.benchmark.name else name,
                         inner_steps=[k])


def _run_cell_job(args: tuple[Cell, C.Config, list[str]]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return run_cell(*args)


# ------------------------------------------------------------------------------------------------ the grid
def is_kept(cfg: C.Config, kept: Path, cross_domain: Sequence[str] = ()) -> bool:
    """True if the kept copy ``kept`` of a cell holds its final scores (``eval.split``) at the cell's budget,
    cross-domain included.

    A copy kept at another budget (the study's N changed since) is not kept: the cell runs on to the new N.
    """
    from .evaluation import read_records

    if not (kept / "eval.json").is_file() or not _done(cfg, kept):
        return False
    have = {r.get("benchmark") for r in read_records(kept) if r.get("iteration") == cfg.train.iterations}
    return set(cross_domain) <= have


def run_study(study: Study | str, out_dir: str | Path | None = None, seeds: int | None = None,
              overrides: Sequence[str] = (), jobs: int = 1, report: bool = True, progress: bool = True,
              command: str | None = None, keep: str | Path | None = None,
              only: Sequence[str] = ()) -> StudyResult:
    """Run every cell of ``study`` into ``out_dir`` (default ``runs/study-NAME``), then write the report.

    Args:
        study: a :class:`Study` or a study name / path.
        seeds: seeds per cell (default: the study's).
        overrides: ``key=value`` applied to every cell after the study's own (e.g. a smaller budget).
        jobs: cells run at once, each in its own process (1: in this process, in order).
        report: write ``<out>/report`` (:func:`metagrad.report.write_report`) at the end.
        command: the command line to record in ``study.json`` and the report.
        keep: copy each finished cell's small results here as it finishes; skip the cells kept here already.
        only: run only these cells (``METHOD`` or ``METHOD:SEED``); the other cells' records stay.
    """
    study = load_study(study) if isinstance(study, str) else study
    check_study(study, seeds)                                    # the whole study, before any cell trains
    out = Path(out_dir or f"runs/study-{study.name}")
    full = cells(study, out, seeds)
    grid = select(full, only) if only else full
    order = [cell_key(asdict(c)) for c in full]
    configs = [cell_config(study, c, overrides) for c in grid]  # all checked before any run starts
    for folder in (out, keep):
        if folder is not None:
            read_manifest(folder)                                # a damaged study.json fails now, naming it
    out.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"study": asdict(study), "seeds": seeds or study.seeds, "overrides": list(overrides),
                              "command": command or " ".join(sys.argv)}
    records: dict[int, dict[str, Any]] = {}

    def kept_dir(cell: Cell) -> Path:
        return Path(keep) / Path(cell.run_dir).relative_to(out)  # type: ignore[arg-type]

    def note(i: int, rec: dict[str, Any]) -> None:
        records[i] = rec
        merge_manifest(out, header, [rec], order)
        if keep is not None and rec["status"] != "kept":  # a kept cell's record there says how it was made
            if rec["status"] not in ("n/a", "failed"):
                keep_run(rec["run_dir"], kept_dir(grid[i]))
            merge_manifest(keep, header, [rec], order)
        if progress:
            extra = f": {rec['reason']}" if rec.get("reason") else f" ({rec.get('seconds', 0):.0f} s)"
            fold = "" if rec.get("fold") is None else f" fold{rec['fold']}"
            print(f"[{len(records)}/{len(grid)}] {rec['preset']} {rec['method']}{fold} seed{rec['seed']}: "
                  f"{rec['status']}{extra}", flush=True)

    jobs_args = [(c, cfg, study.cross_domain.get(c.preset, [])) for c, cfg in zip(grid, configs)]
    todo = []
    for i, (c, cfg, cross) in enumerate(jobs_args):
        if keep is not None and is_kept(cfg, kept_dir(c), cross):
            note(i, {**asdict(c), "status": "kept", "reason": "", "kept": str(kept_dir(c))})
        else:
            todo.append(i)
    if jobs <= 1:
        for i in todo:
            note(i, run_cell(*jobs_args[i]))
    else:
        _run_pool([jobs_args[i] for i in todo], jobs, lambda j, rec: note(todo[j], rec))
    result = StudyResult(out, [records[i] for i in sorted(records)])
    if report:
        from .report import write_report

        # With keep, the kept folder holds every cell (also those whose run directories are gone elsewhere).
        source, compute = ([Path(keep)], False) if keep is not None else ([out], True)
        result.report = write_report(source, out / "report", compute=compute, command=header["command"])
    return result


def _run_pool(jobs_args: list[tuple[Cell, C.Config, list[str]]], jobs: int, note: Any) -> None:
    """Cells over ``jobs`` worker processes. Stopping the study (Ctrl-C, or ``kill`` of this process alone)
    stops the workers too: each cell keeps its last checkpoint and the same command resumes it."""
    ctx = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main_thread else None
    try:
        pending = {pool.submit(_run_cell_job, a): i for i, a in enumerate(jobs_args)}
        for f in futures.as_completed(pending):
            note(pending[f], f.result())
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


__all__ = ["MANIFEST", "MAX_SEEDS", "Cell", "Study", "StudyResult", "cell_config", "cells", "check_cell",
           "check_study", "load_study",
           "method_label", "method_plugins", "run_cell", "run_study", "select", "studies"]
