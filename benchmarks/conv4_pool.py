"""Conv4 with max-pooling against Finn et al.'s strided Omniglot network: a second-order MAML meta-step.

``pool="max"`` (3×3 convolutions of stride 1, MaxPool2d(2) per block, flattened features; MAML++ and most
reproductions) and ``pool="stride"`` (3×3 convolutions of stride 2, no pooling, the last map averaged; Finn et
al.'s code for Omniglot): the strided net computes every convolution at a quarter of the positions. Omniglot
5-way 1-shot shapes (random images: the cost does not depend on them), Conv4-64, one inner step, metagrad's
default learner; the two run in interleaved rounds in one process on the same tasks, the median of each is
reported, and the ratio.

Usage:
    .venv/bin/python benchmarks/conv4_pool.py [--queries 1 2 5 15] [--meta-batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch
from grouped_forward import step_seconds
from scaling import random_batch

from metagrad import MAML
from metagrad.models import Conv4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 5, 15])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; meta-batch {args.meta_batch}, "
          f"second order, 1 inner step\n")
    print("| queries / class | pool=max s | pool=stride s | max / stride |")
    print("|---|---|---|---|")
    for q in args.queries:
        torch.manual_seed(0)
        models = {p: Conv4(1, 5, 64, pool=p, image_size=28) for p in ("max", "stride")}
        batch = random_batch(args.meta_batch, 5, 28, queries=q)
        times: dict = {p: [] for p in models}
        for _ in range(args.rounds):
            for p, model in models.items():
                times[p].append(step_seconds(MAML(model, inner_lr=0.4), batch))
        med = {p: statistics.median(v) for p, v in times.items()}
        print(f"| {q} | {med['max']:.3f} | {med['stride']:.3f} | {med['max'] / med['stride']:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
