"""What Conv4's grouped forward over tasks gives: a second-order MAML meta-step with and without it.

``metagrad`` is the default learner (Conv4's registered batched forward, ``metagrad.batched.conv4``: the tasks of a
chunk as grouped convolutions, at most ``GROUP_IMAGES`` images per call); ``metagrad[per-task]`` is the same learner
on a Conv4 subclass without a batched forward (one ``functional_call`` per task, the module's plain forward). Omniglot 5-way 1-shot shapes (random images: the cost does
not depend on them), Conv4-64, one inner step, for several query counts per class; ``--step chunks``
(``metagrad.meta_backward``, task chunks: the training call) and ``--step graph``
(``meta_loss(batch).loss.backward()``, the whole meta-batch's graph). The two run in interleaved
rounds in one process on the same tasks and weights; the median of each is reported, and the ratio.
``--group-images`` also times other values of ``GROUP_IMAGES`` (the value it was chosen from).

Usage:
    .venv/bin/python benchmarks/grouped_forward.py [--queries 1 2 5 15] [--meta-batch 32] [--rounds 3]
    .venv/bin/python benchmarks/grouped_forward.py --queries 1 5 15 --group-images 32 64 128 100000
    python3 benchmarks/grouped_forward.py --device cuda --group-images 256 1024 100000   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers
import torch
from scaling import random_batch

from metagrad import MAML, meta_backward
from metagrad.batched import conv4 as conv4_module
from metagrad.models import Conv4


def meta_step(learner: MAML, batch, step: str) -> None:
    """The meta-gradient, by task chunks ("chunks") or through the whole meta-batch's graph ("graph")."""
    learner.zero_grad()
    if step == "chunks":
        meta_backward(learner, batch)
    else:
        learner.meta_loss(batch).loss.backward()


def step_seconds(learner: MAML, batch, step: str, steps: int = 2) -> float:
    cuda = batch.support_x.is_cuda
    meta_step(learner, batch, step)          # warm-up of this round, not timed
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        meta_step(learner, batch, step)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 5, 15])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--step", nargs="+", default=["chunks", "graph"], choices=["chunks", "graph"])
    ap.add_argument("--group-images", type=int, nargs="*", default=[],
                    help="also time these values of batched.conv4.GROUP_IMAGES (default: only the shipped one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shipped = conv4_module.GROUP_IMAGES
    settings = ["per-task", shipped] + [g for g in args.group_images if g != shipped]
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; meta-batch {args.meta_batch}, "
          f"second order, 1 inner step; GROUP_IMAGES = {shipped}\n")
    print("| step | queries / class | metagrad[per-task] s | " + " | ".join(
        f"GROUP_IMAGES={g} s (×)" for g in settings[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(settings) - 1))
    for step in args.step:
        for q in args.queries:
            torch.manual_seed(0)
            grouped = Conv4(1, 5, 64, image_size=28).to(device)
            plain = peers.per_task(Conv4(1, 5, 64, image_size=28)).to(device)
            plain.load_state_dict(grouped.state_dict())
            batch = random_batch(args.meta_batch, 5, 28, queries=q).to(device)
            times: dict = {s: [] for s in settings}
            for _ in range(args.rounds):
                for s in settings:
                    if s != "per-task":
                        conv4_module.GROUP_IMAGES = s
                    model = plain if s == "per-task" else grouped
                    times[s].append(step_seconds(MAML(model, inner_lr=0.4), batch, step))
            conv4_module.GROUP_IMAGES = shipped
            med = {s: statistics.median(v) for s, v in times.items()}
            cells = " | ".join(f"{med[s]:.3f} ({med['per-task'] / med[s]:.2f}×)" for s in settings[1:])
            print(f"| {step} | {q} | {med['per-task']:.3f} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
