"""Overhead of each plug-in per meta-step, relative to plain MAML, measured side by side in one process.

Omniglot 5-way 1-shot (15 queries per class), Conv4-64, second order, one inner step, meta-batch 32, Adam:
one meta-step = ``metagrad.meta_backward`` (the training call, task chunks) + optimiser step. The learners are
timed in interleaved rounds (every round runs each learner once, in a rotated order) so that load from elsewhere
on the machine hits all of them alike; the report gives the median seconds per step and the ratio to MAML's
median.

    python benchmarks/method_overhead.py                 # all plug-ins, 7 rounds
    python benchmarks/method_overhead.py --rounds 3 --meta-batch 8 --threads 2
    python benchmarks/method_overhead.py --methods trlearner,trlearner:own=probe   # a plug-in option: KEY:ARG=VALUE
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import metagrad
from metagrad import MAML, methods
from metagrad.models import Conv4

TARGETS = {"meta_gna": 1.15, "cxgrad": 1.3, "cml": 1.2, "trlearner": 1.75}


def plugin(spec: str):
    """``key`` or ``key:arg=value,...`` (values parsed as int, float, or kept as strings)."""
    key, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.split(";")):
        name, _, value = item.partition("=")
        for cast in (int, float, str):
            try:
                kwargs[name] = cast(value)
                break
            except ValueError:
                continue
    return methods.create(key, **kwargs)


def build(plugins: list[str], seed: int) -> tuple[MAML, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    learner = MAML(Conv4(1, ways=5, width=64), inner_lr=0.4, inner_steps=1, plugins=[plugin(p) for p in plugins])
    return learner, torch.optim.Adam(learner.parameters(), 1e-3)


def step(learner: MAML, opt: torch.optim.Optimizer, batch: metagrad.TaskBatch) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    metagrad.meta_backward(learner, batch)
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--methods", default="meta_gna,cxgrad,trlearner,cml")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = metagrad.data.create("omniglot", "train", ways=5, shots=1, queries=15,
                                 meta_batch_size=args.meta_batch, seed=0)
    cases = {"maml": []} | {m: [m] for m in args.methods.split(",") if m}
    learners = {name: build(plugins, 0) for name, plugins in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for name in names:  # warm-up: first calls allocate and pick kernels
        step(*learners[name], bench.batch(0))
    for r in range(args.rounds):
        batch = bench.batch(r + 1)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(step(*learners[name], batch))
    base = statistics.median(times["maml"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, meta-batch {args.meta_batch}, "
          f"{args.rounds} interleaved rounds")
    print(f"{'learner':20s} {'median s/step':>14s} {'ratio to MAML':>14s} {'target':>8s}")
    for name in names:
        med = statistics.median(times[name])
        key = name.partition(":")[0]
        target = f"≤{TARGETS[key]:.2f}" if key in TARGETS else ""
        print(f"{name:20s} {med:14.3f} {med / base:14.3f} {target:>8s}")


if __name__ == "__main__":
    main()
