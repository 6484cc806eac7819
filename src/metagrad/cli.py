"""The ``metagrad`` command line: the only module that parses arguments.

::

    metagrad train --config PRESET_OR_FILE [--data-root DIR] [--set key=value ...] [--out-dir runs/NAME] [--resume]
    metagrad eval  RUN_DIR [--split test] [--tasks 600] [--benchmark NAME] [--data-root DIR]
    metagrad list  [methods|benchmarks|presets]

Bad input (unknown preset or key, a value of the wrong type, a run directory that exists, a corrupt
checkpoint, missing data) exits with status 2 and one line ``metagrad: error: ...`` on stderr; ``--debug``
shows the traceback instead.

Example:
    $ metagrad train --config sinusoid-10shot --set train.iterations=2000 --out-dir runs/sin10
    $ metagrad eval runs/sin10 --tasks 600
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import config as C
from .checkpoint import CheckpointError

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
                   help="override a config key, e.g. --set train.iterations=500 --set plugins=cml (repeatable)")
    t.add_argument("--out-dir", help="run directory (default: runs/<preset>-<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint; appends to its eval.json")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--tasks", type=int, default=None, help="number of tasks (default: the run's eval.tasks, 600)")
    e.add_argument("--benchmark", help="evaluate on another benchmark with the same input shape (cross-domain)")
    e.add_argument("--data-root", help="data folder of the evaluated benchmark")

    ls = sub.add_parser("list", help="list registered methods, benchmarks or presets")
    ls.add_argument("what", nargs="?", choices=("methods", "benchmarks", "presets"), default=None)
    for sp in (t, e, ls):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _train(args: argparse.Namespace) -> int:
    from .evaluation import format_table
    from .train import train

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"benchmark.data_root={args.data_root}")
    if args.resume:
        if not args.out_dir:
            return _fail("--resume needs --out-dir RUN_DIR (the run to continue)")
        saved = Path(args.out_dir) / "config.json"
        if args.config is None and not saved.is_file():
            return _fail(f"cannot resume: {saved} does not exist")
        base = C.load_preset(args.config) if args.config else C.to_dict(C.load(saved))
    elif args.config is None:
        return _fail("train needs --config PRESET_OR_FILE (metagrad list presets)")
    else:
        base = C.load_preset(args.config)
    cfg = C.resolve(base, overrides)
    out_dir = Path(args.out_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    result = train(cfg, out_dir, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {result.run_dir}  ({result.iteration} iterations, "
          f"{time.perf_counter() - start:.1f} s this session)")
    if result.records:
        print(format_table(result.records))
    else:
        print("already evaluated at this iteration: see eval.json")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run, format_table

    if args.tasks is not None and args.tasks < 1:
        return _fail(f"--tasks must be >= 1, got {args.tasks}")
    records = evaluate_run(args.run_dir, split=args.split, tasks=args.tasks, benchmark=args.benchmark,
                           data_root=args.data_root)
    print(format_table(records))
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import data, methods

    sections = {"methods": methods.available, "benchmarks": data.available, "presets": C.presets}
    for what in [args.what] if args.what else list(sections):
        names = sections[what]()
        if args.what:
            print("\n".join(names))
        else:
            print(f"{what}: {', '.join(names) or '(none)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metagrad`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return {"train": _train, "eval": _eval, "list": _list}[args.command](args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("metagrad: interrupted (the last checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130
    except (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # ConfigError, RunError, DataError and CheckpointError are ValueErrors with one-line messages.
        if debug:
            raise
        return _fail(str(e) or type(e).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
