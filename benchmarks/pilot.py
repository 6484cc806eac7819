"""Fix a study's budget on validation: train one cell to N steps with ``eval.split=val``, then print its plateau.

The cell (by default the host alone, seed 0) trains into its own study directory, so that once the budget is
fixed the study resumes it to N and scores the test tasks once; until then it has seen validation tasks only.
Run again with a larger N to go on from its checkpoint (the meta step size is constant, so a longer run continues
the same trajectory). The budget is the first N in a fixed ladder (2,000, 4,000, ...) at which the plateau
criterion (:mod:`metagrad.plateau`) holds on every seed; write it into the study's ``[preset_set]``.

    python benchmarks/pilot.py hosts-trlearner-omniglot runs/hosts-trlearner-omniglot anil-omniglot-5w1s-cpu 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metagrad import checkpoint as ckpt
from metagrad import study as S
from metagrad.plateau import plateau
from metagrad.rundir import read_metrics
from metagrad.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("out", help="the study's run folder (as metagrad study --out)")
    ap.add_argument("preset")
    ap.add_argument("iterations", type=int)
    ap.add_argument("--cell", default="maml:0", help="METHOD:SEED (default: the host alone, seed 0)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides (smoke runs only)")
    args = ap.parse_args()
    study = S.load_study(args.study)
    (cell,) = S.select(S.cells(study, args.out), [f"{args.preset}/{args.cell}"])
    cfg = S.cell_config(study, cell, [*args.set, f"train.iterations={args.iterations}", "eval.split=val"])
    run_dir = Path(cell.run_dir)
    torch.set_num_threads(cfg.train.threads or 1)
    train(cfg, run_dir, resume=ckpt.path_of(run_dir).is_file(), progress=False, plot=False)
    metrics = read_metrics(run_dir)
    curve = [(m["iteration"], m["val_accuracy"]) for m in metrics if "val_accuracy" in m]
    print(f"{args.preset} {args.cell}: validation " + " / ".join(f"{i}: {100 * a:.2f}%" for i, a in curve))
    p = plateau(metrics)
    if p is not None:
        print(f"plateau at {p.end}: {100 * p.before:.2f} -> {100 * p.after:.2f}% from {p.start}, "
              f"{100 * p.gain:+.2f} points: {p.status}")


if __name__ == "__main__":
    main()
