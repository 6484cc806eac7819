"""Run chosen cells of a study one at a time and keep each one's small results as soon as it finishes.

A study run (``metagrad study``) keeps its cells' results only when the whole grid is done; on a machine whose
run directories may not outlive a working session, a grid of 25 CPU hours needs each finished cell kept on its
own. This runs the named cells (``METHOD:SEED``) of STUDY with :func:`metagrad.study.run_cell`, exactly as the
study would, then copies the cell's small files to ``results/OUT`` (benchmarks/keep_results.py) and merges its
status record into ``results/OUT/study.json``, so ``metagrad report results/OUT --no-compute`` sees every cell
kept so far. Cells already kept are skipped.

    PYTHONPATH=../study/src python benchmarks/issue21_cells.py issue21-omniglot-finn issue21-finn maml:0 cml:0
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keep_results import keep

from metagrad import study as S
from metagrad.rundir import write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _key(rec: dict) -> tuple:
    return rec["preset"], rec["method"], rec["seed"], rec.get("fold")


def merge_record(dest: Path, study: S.Study, rec: dict, command: str) -> None:
    """Add (or replace) one cell's status record in ``dest/study.json``, written atomically."""
    path = dest / "study.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {
        "study": asdict(study), "seeds": study.seeds, "overrides": [], "command": command, "cells": []}
    cells = {_key(c): c for c in manifest["cells"]}
    cells[_key(rec)] = rec
    order = {_key(asdict(c)): i for i, c in enumerate(S.cells(study, "x"))}
    manifest["cells"] = sorted(cells.values(), key=lambda c: order.get(_key(c), len(order)))
    dest.mkdir(parents=True, exist_ok=True)
    write_manifest(dest, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study name or .toml path (this checkout's src/metagrad/configs/studies/)")
    parser.add_argument("out", help="folder name below runs/ and results/")
    parser.add_argument("cells", nargs="+", metavar="METHOD:SEED")
    args = parser.parse_args()
    toml = Path(args.study)
    if not toml.is_file():
        toml = ROOT / "src/metagrad/configs/studies" / f"{args.study}.toml"
    study = S.load_study(str(toml))
    runs, dest = ROOT / "runs" / args.out, ROOT / "results" / args.out
    grid = {(c.method, c.seed): c for c in S.cells(study, runs)}
    torch.set_num_threads(1)
    for spec in args.cells:
        method, seed = spec.rsplit(":", 1)
        cell = grid.get((method, int(seed)))
        if cell is None:
            raise SystemExit(f"{spec}: not a cell of {study.name} (cells: {', '.join(f'{m}:{s}' for m, s in grid)})")
        kept = dest / Path(cell.run_dir).relative_to(runs)
        if (kept / "eval.json").is_file():
            print(f"{spec}: already kept in {kept}", flush=True)
            continue
        cfg = S.cell_config(study, cell)
        rec = S.run_cell(cell, cfg, study.cross_domain.get(cell.preset, []))
        print(f"{spec}: {rec['status']} {rec.get('reason', '')} ({rec.get('seconds', 0):.0f} s)", flush=True)
        if rec["status"] == "failed":
            continue
        keep(Path(cell.run_dir), kept)
        command = f"python benchmarks/issue21_cells.py {args.study} {args.out} {spec}"
        merge_record(dest, study, {**rec, "command": command}, command)


if __name__ == "__main__":
    main()
