"""Copy a study's small results into the repository, so no finished cell is lost with its run directory.

For every run directory below STUDY_DIR (and the study's ``study.json``): ``config.json``, ``eval.json``,
``scores.json`` (per-task scores) and ``metrics.jsonl`` thinned to the learning-curve keys (loss, accuracy,
validation, step size, wall time); never checkpoints, plots or per-layer diagnostics. ``metagrad report DEST
--no-compute`` then reproduces every number of the study's tables (the per-sample diagnostics table needs the
run directories' checkpoints and is left out).

    python benchmarks/keep_results.py runs/issue21-regression results/issue21-regression
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEEP = ("config.json", "eval.json", "scores.json")
CURVE_KEYS = ("iteration", "loss", "query_loss", "accuracy", "grad_norm", "meta_lr", "wall_s", "val_accuracy",
              "val_mse")


def keep(study: Path, dest: Path) -> int:
    """Copy the small files of every finished run below ``study`` to ``dest``; returns the number of runs."""
    runs = 0
    if (study / "study.json").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(study / "study.json", dest / "study.json")
    for config in sorted(study.rglob("config.json")):
        src = config.parent
        if "report" in src.relative_to(study).parts or not (src / "eval.json").is_file():
            continue
        out = dest / src.relative_to(study)
        out.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        lines = []
        for line in (src / "metrics.jsonl").read_text().splitlines() if (src / "metrics.jsonl").is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            lines.append(json.dumps({k: row[k] for k in CURVE_KEYS if k in row}))
        (out / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines))
        runs += 1
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    print(f"kept {keep(args.study, args.dest)} runs in {args.dest}")


if __name__ == "__main__":
    main()
