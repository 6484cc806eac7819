"""How far apart the two normalisations of TRLearner's probes are under batch-statistics BN.

TRLearner's default P_ii (``own="query"``) reads task i's probe features off the core's query forward, normalised
with the statistics of the whole query set; its partners' P_ij are normalised with the statistics of the probe set
alone. This prints, for Conv4-64 at initialisation on Omniglot 5-way 1-shot tasks (15 queries per class), the mean
squared difference between the two, relative to the features' variance over the probes, for the evenly spaced
probes (``probes="spread"``, the default) and the first ``probe_size`` queries (``probes="first"``).

    .venv/bin/python benchmarks/trlearner_probe_bn.py [--tasks 8] [--probe-size 16]
"""

from __future__ import annotations

import argparse

import torch

import metagrad
from metagrad.methods.trlearner import TRLearner
from metagrad.models import Conv4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--probe-size", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    batch = metagrad.data.create("omniglot", "train", ways=5, shots=1, queries=15, meta_batch_size=args.tasks,
                                 seed=0).batch(0)
    model = Conv4(1, 5, 64)
    for probes in ("spread", "first"):
        rows = TRLearner(probe_size=args.probe_size, probes=probes).probe_rows(batch.query_x.shape[1])
        ratios = []
        with torch.no_grad():
            for t in range(args.tasks):
                _, whole = model(batch.query_x[t], return_features=True)
                _, alone = model(batch.query_x[t, rows], return_features=True)
                ratios.append(((whole[rows] - alone) ** 2).mean() / ((alone - alone.mean(0)) ** 2).mean())
        print(f"probes={probes:6s} classes {sorted(set(batch.query_y[0, rows].tolist()))}: mean squared difference "
              f"= {100 * torch.stack(ratios).mean().item():.1f}% of the features' variance over the probes")


if __name__ == "__main__":
    main()
