"""The ``metagrad`` command line: the only module that parses arguments.

::

    metagrad train --config PRESET_OR_FILE [--data-root DIR] [--set key=value ...] [--out-dir runs/NAME] [--resume]
                   [--dry-run]
    metagrad eval  RUN_DIR [--split test] [--tasks 600] [--steps K ...] [--benchmark NAME] [--ways N]
                   [--head auto|trained|prototype|mean] [--data-root DIR]
    metagrad list  [learners|methods|models|benchmarks|presets]
    metagrad study NAME_OR_TOML [--seeds 3] [--out runs/study-NAME] [--set key=value ...] [--jobs 1]
                   [--keep results/NAME] [--only [PRESET/]METHOD[:SEED] ...]
    metagrad report RUN_OR_STUDY_DIR ... [--out DIR] [--family PREREGISTRATION.md] [--exclude BENCHMARK]

Bad input (unknown preset or key, a value of the wrong type, a run directory that exists, a corrupt
checkpoint, missing data) and any OS error (disk full, a directory where a run file belongs, permissions) exit
with status 2 and one line ``metagrad: error: ...`` on stderr naming the file and the cause; ``--debug`` shows
the traceback instead. ``train --dry-run`` builds and checks everything a run needs and writes nothing.

Example:
    $ metagrad train --config sinusoid-10shot --set train.iterations=2000 --out-dir runs/sin10
    $ metagrad eval runs/sin10 --tasks 600
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import config as C
from . import rundir as R
from .checkpoint import CheckpointError, candidates
from .rundir import describe

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other bad-input error
        raise SystemExit(_fail(f"{message} (see {self.prog} --help)"))


def _fail(message: str) -> int:
    print(f"metagrad: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metagrad", description="Few-shot meta-learning: MAML and composable plug-ins.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="meta-train a preset or config file, then evaluate on the test split")
    t.add_argument("--config", help="preset name (metagrad list presets) or a .toml path; with --resume, "
                                    "defaults to the run's own config")
    t.add_argument("--data-root", help="folder of the benchmark's data (sets benchmark.data_root)")
    t.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.iterations=500 --set plugins=KEY (repeatable)")
    t.add_argument("--out-dir", help="run directory (default: runs/<preset>-<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dry-run", action="store_true",
                   help="build and check everything the run needs (config, every split, the model, the run "
                        "directory), print the plan, write nothing")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="meta-train with N processes on this machine (runs torchrun's module; gloo on CPU, nccl "
                        "with one GPU each); several nodes: torchrun ... -m metagrad train, see docs/distributed.md")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint; appends to its eval.json")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--tasks", type=int, default=None, help="number of tasks (default: the run's eval.tasks, 600)")
    e.add_argument("--steps", type=int, nargs="+", default=None, metavar="K",
                   help="inner-step counts to score after (default: the run's, e.g. 3 for Omniglot)")
    e.add_argument("--benchmark", help="evaluate on another benchmark with the same input shape (cross-domain)")
    e.add_argument("--data-root", help="data folder of the evaluated benchmark")
    e.add_argument("--ways", type=int, default=None,
                   help="ways of the evaluated episodes (default: the benchmark's own, e.g. 20 for omniglot-lake20, "
                        "else the run's eval.ways, else training's)")
    e.add_argument("--head", choices=C.HEADS, default=None,
                   help="the head each task starts from (default: the run's eval.head, auto): trained, prototype "
                        "(the support set's class prototypes, Proto-MAML), mean (rows the mean of the trained "
                        "ones); auto: trained at training's ways, else prototype")

    ls = sub.add_parser("list", help="list learners (with the plug-ins each supports), methods, models, benchmarks "
                                     "or presets")
    ls.add_argument("what", nargs="?", choices=("learners", "methods", "models", "benchmarks", "presets"),
                    default=None)
    st = sub.add_parser("study", help="run a study's grid (presets × methods × seeds; resumable), then report")
    st.add_argument("name", metavar="NAME_OR_TOML", help="a study (metagrad/configs/studies/) or a .toml path")
    st.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the study's)")
    st.add_argument("--out", help="output folder (default: runs/study-NAME)")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every cell (repeatable)")
    st.add_argument("--jobs", type=int, default=1, help="cells run at once, one process each (default 1)")
    st.add_argument("--no-report", action="store_true", help="skip the report at the end")
    st.add_argument("--keep", metavar="DIR", help="copy each finished cell's small results (config, records, "
                    "per-task scores, curve; no checkpoints) to DIR as it finishes; skip cells DIR holds already")
    st.add_argument("--only", action="append", default=[], metavar="[PRESET/]METHOD[:SEED]",
                    help="run only these cells (repeatable), e.g. --only maml:0 --only maml:2 "
                         "--only sinusoid-10shot/maml:1")

    rp = sub.add_parser("report", help="Markdown/HTML tables and plots of run directories or study folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_OR_STUDY_DIR")
    rp.add_argument("--out", help="output folder (default: <first dir>/report)")
    rp.add_argument("--family", metavar="FILE",
                    help="a preregistration file (docs/preregistration.md): its hypotheses as a confirmatory table, "
                         "apart from the exploratory ones")
    rp.add_argument("--exclude", action="append", default=[], metavar="BENCHMARK",
                    help="leave out the records on this evaluated benchmark (repeatable), e.g. omniglot-lake20")
    rp.add_argument("--no-compute", action="store_true",
                    help="do not compute missing diagnostics.json from checkpoints (plots use what exists)")
    for sp in (t, e, ls, st, rp):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _train(args: argparse.Namespace) -> int:
    from . import distributed as D
    from .runlock import locked

    if args.out_dir is not None and not args.out_dir.strip():
        return _fail("--out-dir is empty: name the run directory, or leave --out-dir out for runs/<name>-<time>")
    with contextlib.ExitStack() as held:
        if args.resume and args.out_dir and not args.dry_run and not D.launched() and (args.nproc or 1) == 1:
            if not Path(args.out_dir).is_dir():
                return _fail(f"cannot resume: run directory {args.out_dir!r} does not exist")
            held.enter_context(locked(args.out_dir))   # before its config is read (train holds it on)
        return _train_locked(args)


def _train_locked(args: argparse.Namespace) -> int:
    from .evaluation import format_table
    from .train import train

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"benchmark.data_root={args.data_root}")
    if args.resume:
        if not args.out_dir:
            return _fail("--resume needs --out-dir RUN_DIR (the run to continue)")
        saved = Path(args.out_dir) / R.CONFIG
        if args.config is None and not saved.exists() and not candidates(args.out_dir):
            return _fail(f"cannot resume: {saved} does not exist")
        base = C.load_preset(args.config) if args.config else _saved_config(Path(args.out_dir))
    elif args.config is None:
        return _fail("train needs --config PRESET_OR_FILE (metagrad list presets)")
    else:
        base = C.load_preset(args.config)
    cfg = C.resolve(base, overrides)
    if not args.out_dir and (cfg.name in ("", ".", "..") or Path(cfg.name).name != cfg.name):
        return _fail(f"name {cfg.name!r} is not a plain name, so runs/<name>-<time> would not be a folder of runs/: "
                     "pass --out-dir, or --set name=PLAIN_NAME")
    out_dir = Path(args.out_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.nproc is not None:
        from . import distributed as D

        if args.nproc < 1:
            return _fail(f"--nproc must be >= 1, got {args.nproc}")
        if D.launched():  # already a torchrun worker: torchrun made the processes, do not launch again
            world = D.world_size()
            if world != args.nproc:
                return _fail(f"--nproc {args.nproc} but torchrun started {world} processes: leave --nproc out "
                             "under torchrun")
        elif args.nproc > 1:
            from .runlock import locked
            from .train import _open_run

            if args.resume and not out_dir.is_dir():
                return _fail(f"cannot resume: run directory {str(out_dir)!r} does not exist")
            with locked(out_dir):   # held for the workers (metagrad.runlock.environment)
                _open_run(out_dir, cfg, args.resume)  # a bad run directory fails here in one line, not once per rank
                return _launch(args, out_dir)
    if args.dry_run:
        return _dry_run(cfg, out_dir, args.resume)
    start = time.perf_counter()
    result = train(cfg, out_dir, resume=args.resume, progress=not args.no_progress)
    if result.rank != 0:
        return 0
    print(f"run directory: {result.run_dir}  ({result.iteration} iterations, "
          f"{time.perf_counter() - start:.1f} s this session)")
    if result.records:
        print(format_table(result.records))
    else:
        print("already evaluated at this iteration: see eval.json")
    return 0


def _saved_config(run_dir: Path) -> dict:
    """The config of the run to resume: its config.json, else (missing or damaged) the one its checkpoint holds."""
    from .checkpoint import find_latest

    try:
        return C.to_dict(R.read_config(run_dir))
    except C.ConfigError as e:
        try:
            path, state, _ = find_latest(run_dir)
            cfg = C.from_dict(state["config"])
        except (ValueError, OSError):
            raise e from None
        warnings.warn(f"{e}; using the config stored in {path.name} (iteration {int(state['iteration'])}) "
                      "instead, and writing it back to config.json", R.RunFileWarning, stacklevel=2)
        return C.to_dict(cfg)


def _dry_run(cfg: C.Config, out_dir: Path, resume: bool) -> int:
    """Check everything a run needs, as :func:`metagrad.train.train` would before its first step; write nothing."""
    from .evaluation import device_of
    from .runlock import RunInUseError, holder, in_use_message
    from .train import _open_run, build

    pid = holder(out_dir)
    if pid is not None:   # the run would be refused: say so now
        raise RunInUseError(in_use_message(out_dir, pid))
    if resume and not out_dir.is_dir():
        raise CheckpointError(f"cannot resume: run directory {str(out_dir)!r} does not exist")
    state = _open_run(out_dir, cfg, resume)
    s = build(cfg, device_of(cfg.train.device))
    start = 0 if state is None else int(state["iteration"])
    splits = ", ".join(f"{b.split} ({b.name})" for b in (s.bench, s.val_bench, s.test_bench) if b is not None)
    params = sum(p.numel() for p in s.learner.parameters())
    print(f"dry run: {cfg.name} checks out; would train iterations {start}..{cfg.train.iterations} into {out_dir} "
          f"(splits: {splits}; {params} parameters); nothing written")
    return 0


def _launch(args: argparse.Namespace, out_dir: Path) -> int:
    """Run this same command under torchrun's module with ``--nproc`` processes; report a failed job in one line."""
    import os
    import subprocess

    from .checkpoint import load_latest

    # The workers run without --nproc (WORLD_SIZE tells them); torchrun's parser would also take it for its own
    # --nproc-per-node. Every rank must agree on the run directory (the default has a timestamp).
    argv, skip = [], False
    for a in args.argv:
        name = a.split("=", 1)[0]
        if skip or (name.startswith("--np") and "--nproc".startswith(name)):
            skip = not skip and "=" not in a
            continue
        argv.append(a)
    if not args.out_dir:
        argv += ["--out-dir", str(out_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "metagrad", *argv]
    from .runlock import environment

    env = {**os.environ, **environment(out_dir)}   # the workers write under this process's lock
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes, without its warning
    rc = subprocess.call(cmd, env=env)
    if rc == 0:
        return 0
    try:
        kept = f"the last good checkpoint (iteration {load_latest(out_dir)['iteration']}) is kept in {out_dir}: " \
               f"continue with --resume --out-dir {out_dir} (any --nproc)"
    except (ValueError, OSError):
        kept = f"no checkpoint was written in {out_dir} yet"
    print(f"metagrad: error: distributed training stopped: a rank failed or was killed (exit status {rc}; "
          f"the ranks' errors and torchrun's report above name it); {kept}", file=sys.stderr)
    return rc if 0 < rc < 128 else 1


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import RunError, evaluate_run, format_table
    from .train import check_scores

    if args.tasks is not None and args.tasks < 1:
        return _fail(f"--tasks must be >= 1, got {args.tasks}")
    if args.ways is not None and args.ways < 2:
        return _fail(f"--ways must be >= 2, got {args.ways}")
    if args.steps is not None and min(args.steps) < 0:
        return _fail(f"--steps must be >= 0, got {' '.join(map(str, args.steps))}")
    from .runlock import locked

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():   # checked first: the lock would make it
        raise RunError(f"run directory {str(run_dir)!r} " + ("is not a directory: pass the run's folder"
                                                              if run_dir.exists() else "does not exist"))
    with locked(run_dir):      # one writer, from before anything is read
        _check_eval_dir(run_dir)
        records = evaluate_run(run_dir, split=args.split, tasks=args.tasks, benchmark=args.benchmark,
                               data_root=args.data_root, ways=args.ways, inner_steps=args.steps,
                               head=args.head)
    print(format_table(records))
    check_scores(records)
    return 0


def _check_eval_dir(run_dir: Path) -> None:
    """Before evaluating: the run directory holds a checkpoint, its files are files, and its config.json (when
    readable) describes the checkpoint's run, so that no record is appended to another run's eval.json."""
    from .checkpoint import find_latest
    from .evaluation import RunError
    from .train import RESUMABLE

    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} " + ("is not a directory: pass the run's folder"
                                                              if run_dir.exists() else "does not exist"))
    R.check_files(run_dir)
    R.read_records(run_dir)
    if not candidates(run_dir):
        raise RunError(f"{str(run_dir)!r} holds no checkpoint (checkpoint.pt is missing): nothing to evaluate; "
                       "train the run first")
    try:
        saved = R.read_config(run_dir)
    except C.ConfigError:
        return  # damaged or missing: the checkpoint's own config is used, as always
    _, state, _ = find_latest(run_dir)
    changed = [k for k in C.diff(saved, C.from_dict(state["config"])) if k not in RESUMABLE
               and not k.startswith("eval.")]
    if changed:
        raise RunError(f"{run_dir / R.CONFIG} does not describe the run in its checkpoint ({', '.join(changed[:5])} "
                       "differ): the checkpoint belongs to another run; evaluate it from its own directory")


def _list(args: argparse.Namespace) -> int:
    from . import data, learners, methods, models

    def with_plugins() -> list[str]:   # each learner and the plug-ins that declare it (Plugin.learners)
        plugins = {k: type(methods.create(k)).learners for k in methods.available()}
        return [f"{name} (plug-ins: {', '.join(k for k, ls in plugins.items() if name in ls) or 'none'})"
                for name in learners.available()]

    sections = {"learners": with_plugins, "methods": methods.available,
                "models": lambda: [*models.available(), *(f"{w} (wrapper: model.wrap)" for w in models.wrappers())],
                "benchmarks": data.available, "presets": C.presets}
    for what in [args.what] if args.what else list(sections):
        names = sections[what]()
        if args.what:
            print("\n".join(names))
        else:
            print(f"{what}: {', '.join(names) or '(none)'}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study import run_study

    if args.seeds is not None and args.seeds < 1:
        return _fail(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        return _fail(f"--jobs must be >= 1, got {args.jobs}")
    command = " ".join(["metagrad", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else None
    result = run_study(args.name, args.out, seeds=args.seeds, overrides=args.overrides, jobs=args.jobs,
                       report=not args.no_report, command=command, keep=args.keep, only=args.only)
    failed = [c for c in result.cells if c["status"] == "failed"]
    print(f"study folder: {result.out_dir}  ({len(result.cells)} cells, {len(failed)} failed)")
    if result.report:
        print(f"report: {result.report}")
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from .report import find_runs, write_report

    command = " ".join(["metagrad", *sys.argv[1:]]) if sys.argv[1:2] == ["report"] else None
    runs = find_runs(args.runs)
    if not runs:
        return _fail(f"no run directories (folders holding config.json) in {', '.join(args.runs)}: nothing to "
                     "report")
    for folder in args.runs:   # every file the report reads, checked before its folder is made
        R.read_manifest(folder)
    for run in runs:
        R.read_config(run), R.read_records(run), R.read_scores(run)
    path = write_report(args.runs, args.out, compute=not args.no_compute, command=command, family=args.family,
                        exclude=args.exclude)
    print(f"report: {path}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """metagrad's own warnings (a corrupt checkpoint skipped, a non-finite step skipped) as one line each."""
    if getattr(category, "__module__", "").startswith("metagrad"):
        print(f"metagrad: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]


# What a Ctrl-C leaves, by command.
_INTERRUPTED = {"train": "the last checkpoint is kept; continue with --resume",
                "study": "each cell keeps its last checkpoint; the same command resumes the study",
                "eval": "no record was added to eval.json; run the same command again"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metagrad`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = [a for a in argv if a != "--debug"] + (["--debug"] if debug else [])
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return {"train": _train, "eval": _eval, "list": _list, "study": _study,
                    "report": _report}[args.command](args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"metagrad: interrupted ({_INTERRUPTED.get(command, 'nothing half-written is kept')})",
              file=sys.stderr)
        return 130
    except (ValueError, CheckpointError) as e:
        # ConfigError, RunError, DataError and CheckpointError are ValueErrors with one-line messages.
        if debug:
            raise
        return _fail(str(e) or type(e).__name__)
    except OSError as e:  # disk full, a directory where a file belongs, permissions: the file and the cause
        if debug:
            raise
        return _fail(describe(e))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
