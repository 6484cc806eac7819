"""Keeping a study's small results where they outlive its run directories (e.g. in the repository).

Run directories hold checkpoints and can be lost with a machine; a long study should lose no finished cell.
:func:`keep_run` copies what a report needs from a finished run: ``config.json``, ``eval.json``, ``scores.json``
(per-task scores) and ``metrics.jsonl`` thinned to the learning-curve keys, never checkpoints, plots or
per-layer diagnostics. ``metagrad report KEPT --no-compute`` then reproduces every number of the study's tables
(the per-sample diagnostics table needs checkpoints and is left out). :func:`merge_manifest` adds a cell's status
record to the kept ``study.json``, so the report shows N/A and failed cells too. ``metagrad study --keep DIR``
does both as each cell finishes and skips the cells DIR already holds.

Example:
    >>> keep_study("runs/issue21-regression", "results/issue21-regression")   # every finished run below
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .reading import read_jsonl
from .rundir import CONFIG, EVAL, METRICS, SCORES, read_manifest, write_atomic, write_manifest

KEEP = (CONFIG, EVAL, SCORES)
CURVE_KEYS = ("iteration", "loss", "query_loss", "accuracy", "grad_norm", "meta_lr", "wall_s", "val_accuracy",
              "val_mse")


def keep_run(run_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> bool:
    """Copy the small files of the finished run ``run_dir`` to ``dest``; False (nothing copied) if unfinished."""
    src, out = Path(run_dir), Path(dest)
    if not (src / CONFIG).is_file() or not (src / EVAL).is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src / name).is_file():
            write_atomic(out / name, (src / name).read_bytes())
    rows, _ = read_jsonl(src / METRICS)   # a line cut by a kill, or damaged: the curve keeps every whole record
    lines = [json.dumps({k: row[k] for k in CURVE_KEYS if k in row}) for row in rows]
    write_atomic(out / METRICS, "".join(f"{x}\n" for x in lines))
    return True


def keep_study(study_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """:func:`keep_run` for every finished run below ``study_dir`` (and its ``study.json``); returns the count."""
    study, out = Path(study_dir), Path(dest)
    if (study / "study.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(study / "study.json", out / "study.json")
    runs = 0
    for config in sorted(study.rglob(CONFIG)):
        src = config.parent
        if "report" not in src.relative_to(study).parts:
            runs += keep_run(src, out / src.relative_to(study))
    return runs


def cell_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What names a cell in a study: ``(preset, method label, seed, fold)``."""
    return record["preset"], record["method"], record["seed"], record.get("fold")


def merge_manifest(dest: str | os.PathLike[str], header: dict[str, Any], records: Sequence[dict[str, Any]],
                   grid: Sequence[tuple[Any, ...]] | None = None) -> None:
    """Add (or replace) cells' status ``records`` in ``dest/study.json``; the other fields come from ``header``.

    The records of cells written earlier (other runs of the command, other machines) stay. With ``grid`` (the
    study's cell keys in order), the cells are sorted by it and records of cells no longer in it are dropped.
    """
    old = read_manifest(dest) or {}
    cells = {cell_key(c): c for c in old.get("cells", [])}
    cells.update({cell_key(r): r for r in records})
    if grid is not None:
        at = {k: i for i, k in enumerate(grid)}
        cells = {k: cells[k] for k in sorted(set(cells) & set(at), key=at.__getitem__)}
    Path(dest).mkdir(parents=True, exist_ok=True)
    write_manifest(dest, {**header, "cells": list(cells.values())})


__all__ = ["CURVE_KEYS", "KEEP", "cell_key", "keep_run", "keep_study", "merge_manifest"]
