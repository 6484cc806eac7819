"""Issue 21: train one cell of a study data-parallel on the frozen checkout, under torchrun.

A cell at α 0.01 × 5 takes about 4 hours on one core, longer than a working session, and a session's run
directories need not survive to the next one. Run on both cores as two ranks of one job
(:mod:`metagrad.distributed`: every rank builds the same meta-batch and takes half of its tasks, one
all-reduce per step), its meta-gradient equals the single process's up to floating-point summation order, so
the cell is the same cell, trained in about half the wall time. This script only trains (or resumes) the
cell's run directory to the study's budget, validating on the way as the single process does; keep it
afterwards with ``benchmarks/issue21_cells.py``, which finds it trained and scores its test tasks once.

    PYTHONPATH=../study/src OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/issue21_ddp.py \\
        src/metagrad/configs/studies/issue21-omniglot-a001x5.toml runs/issue21-a001x5 meta_gna 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    from metagrad import study as S
    from metagrad.train import train

    toml, runs, method, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    extra = sys.argv[5:]  # overrides (only for timing trials: a kept cell takes none)
    study = S.load_study(toml)
    cell = next(c for c in S.cells(study, runs) if c.method == method and c.seed == seed)
    torch.set_num_threads(1)
    cfg = S.cell_config(study, cell, extra)
    run_dir = Path(cell.run_dir)
    if S._done(cfg, run_dir):
        print(f"{method}:{seed}: already trained to {cfg.train.iterations}", flush=True)
        return
    # Resume whenever the directory exists: from its checkpoint, or, for a run stopped before its first
    # checkpoint, from iteration 0 (train's own rule), not refused as "already holds a run".
    train(cfg, run_dir, resume=run_dir.is_dir(), progress=False)


if __name__ == "__main__":
    main()
