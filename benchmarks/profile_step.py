"""Where the time of one second-order MAML meta-step goes: torch.profiler over metagrad and the plain loop.

Omniglot 5-way 1-shot shapes (random images: the cost does not depend on them), Conv4-64 with batch-statistics BN,
15 queries per class, 1 inner step, meta-batch 32. Prints, per implementation, the operators with the most self
CPU time and the share of all self CPU time spent in convolutions (forward, backward and double backward), which
is the part no reorganisation of the loop can remove.

Usage:
    .venv/bin/python benchmarks/profile_step.py [--meta-batch 32] [--steps 2] [--top 12]
    .venv/bin/python benchmarks/profile_step.py --size 84 --meta-batch 4   # mini-ImageNet shapes (3 channels)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers
import torch
from scaling import random_batch
from torch.profiler import ProfilerActivity, profile

from metagrad.models import Conv4

CONV = ("conv", "mkldnn_convolution", "convolution_backward", "_convolution", "unfold", "im2col")


def is_conv(name: str) -> bool:
    return any(k in name for k in CONV)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="profiled meta-steps (after one warm-up step)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--impls", nargs="+", default=["metagrad", "loop"])
    ap.add_argument("--size", type=int, default=28, help="image height = width (3 channels above 28)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = random_batch(args.meta_batch, 5, args.size)
    channels = batch.support_x.shape[2]
    setup = peers.Setup(inner_lr=0.4, inner_steps=1, first_order=False, loss="cross_entropy")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; meta-batch {args.meta_batch}, "
          f"{args.steps} profiled steps, {channels}×{args.size}×{args.size} images\n")
    for name in args.impls:
        impl = peers.build(name, Conv4(channels, 5, 64, image_size=args.size), setup)
        impl.step(batch)                                            # warm-up, not profiled
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                impl.step(batch)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        conv = sum(e.self_cpu_time_total for e in events if is_conv(e.key))
        print(f"## {name}: {total / 1e6 / args.steps:.2f} s self CPU time per meta-step, "
              f"{100 * conv / total:.0f}% in convolutions\n")
        print("| operator | calls / step | self CPU s / step | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"| `{e.key}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / 1e6 / args.steps:.3f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
