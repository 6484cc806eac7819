"""Second-order meta-step on mini-ImageNet-sized inputs (84×84×3, 5-way 1-shot, 15 queries per class, Conv4-64,
one inner step): metagrad (``meta_backward``'s task chunks, and ``metagrad[graph]``: the whole meta-batch's graph)
against the plain loop on metagrad's Conv4 and on the reference Conv4, in one process, interleaved rounds, median
seconds per step. Random images.

Usage:
    .venv/bin/python benchmarks/large_images.py [--tasks 8] [--rounds 3] [--impls metagrad loop]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
import torch
from scaling import random_batch

from metagrad.models import Conv4

IMPLS = ("metagrad", "metagrad[graph]", "loop+mgmodel", "loop")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=84)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    batch = random_batch(args.tasks, 5, args.size)
    model = Conv4(3, 5, 64, image_size=args.size)
    setup = peers.Setup(0.4, 1, False, "cross_entropy")
    impls = [peers.build(n, model, setup) for n in dict.fromkeys([*args.impls, "loop"])]
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    for r in range(args.rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            impl.step(batch)                                   # untimed: the allocator settles for this impl
            t = time.perf_counter()
            impl.step(batch)
            times[impl.name].append(time.perf_counter() - t)
    loop = statistics.median(times["loop"])
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{args.size}x{args.size}x3, {args.tasks} tasks, {name}: {m:.2f} s per step, {loop / m:.2f}x the loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
