"""Issue 21: run chosen cells of a study on a frozen checkout of the code, keeping each one as it finishes.

``metagrad study NAME --keep results/OUT --only METHOD:SEED`` does this with the installed code. The issue-21
Omniglot cells must all run on one commit (1515b74, a git worktree FROZEN), whatever the package becomes while
they run: each cell trains in a child process on FROZEN's code (:func:`metagrad.study.run_cell` of that
commit, exactly as its study would), then this process keeps the cell's small results in ``results/OUT`` and
its status record in ``results/OUT/study.json`` (:mod:`metagrad.keep`). Cells already kept at the
study's budget are skipped; one kept at another budget runs on to it (from its checkpoint, if the run directory
still has one). Several lanes may draw from the same cells: a cell another process is training is skipped (an
exclusive ``flock`` on ``<run dir>.lock``, released when its holder exits, however it ends), and the manifest is
merged under a lock of its own.

    python benchmarks/issue21_cells.py --frozen ../study issue21-omniglot-finn issue21-finn maml:0 maml:1
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from metagrad import study as S
from metagrad.keep import cell_key, keep_run, merge_manifest

ROOT = Path(__file__).resolve().parents[1]
CHILD = """import json, sys, torch
from metagrad import study as S
study = S.load_study(sys.argv[1])
cell = next(c for c in S.cells(study, sys.argv[2]) if c.method == sys.argv[3] and c.seed == int(sys.argv[4]))
torch.set_num_threads(1)
print(json.dumps(S.run_cell(cell, S.cell_config(study, cell), study.cross_domain.get(cell.preset, []))))
"""


@contextmanager
def locked(path: Path, wait: bool):
    """Hold an exclusive flock on ``path`` (yield True), or yield False at once if another process holds it and
    ``wait`` is false. The same lock as ``flock(1)`` takes, so shell lanes share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frozen", type=Path, required=True, help="the frozen checkout (its src/ is imported)")
    parser.add_argument("study", help="study name (this checkout's src/metagrad/configs/studies/) or .toml path")
    parser.add_argument("out", help="folder name below runs/ and results/")
    parser.add_argument("cells", nargs="+", metavar="METHOD:SEED")
    args = parser.parse_args()
    toml = Path(args.study)
    if not toml.is_file():
        toml = ROOT / "src/metagrad/configs/studies" / f"{args.study}.toml"
    study = S.load_study(str(toml))
    runs, dest = ROOT / "runs" / args.out, ROOT / "results" / args.out
    grid = S.cells(study, runs)
    chosen: list[S.Cell] = []  # in the order named, so that two lanes can take the cells in different orders
    for name in args.cells:
        chosen += [c for c in S.select(grid, [name]) if c not in chosen]
    env = {**os.environ, "PYTHONPATH": str(args.frozen.resolve() / "src")}
    for cell in chosen:
        kept = dest / Path(cell.run_dir).relative_to(runs)
        name = f"{cell.method}:{cell.seed}"
        with locked(Path(f"{cell.run_dir}.lock"), wait=False) as mine:
            if not mine:
                print(f"{name}: training in another process, skipped", flush=True)
                continue
            if S.is_kept(S.cell_config(study, cell), kept, study.cross_domain.get(cell.preset, [])):
                print(f"{name}: already kept in {kept}", flush=True)
                continue
            child = subprocess.run([sys.executable, "-c", CHILD, str(toml), str(runs), cell.method, str(cell.seed)],
                                   env=env, stdout=subprocess.PIPE, text=True, check=False)
            lines = child.stdout.strip().splitlines()
            if child.returncode != 0 or not lines:
                print(f"{name}: the child process failed (exit {child.returncode})", flush=True)
                continue
            rec = json.loads(lines[-1])
            print(f"{name}: {rec['status']} {rec.get('reason', '')} ({rec.get('seconds', 0):.0f} s)", flush=True)
            if rec["status"] in ("failed", "n/a"):
                continue
            with locked(runs / "keep.lock", wait=True):
                keep_run(cell.run_dir, kept)
                command = f"python benchmarks/issue21_cells.py --frozen FROZEN {args.study} {args.out} {name}"
                header = {"study": asdict(study), "seeds": study.seeds, "overrides": [], "command": command}
                merge_manifest(dest, header, [{**rec, "command": command}], [cell_key(asdict(c)) for c in grid])


if __name__ == "__main__":
    main()
