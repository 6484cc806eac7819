"""What T-Net's folded forward gives: a second-order MAML meta-step on T-Net with and without it, beside MAML.

``tnet`` is the default: :class:`metagrad.models.TNet` on Conv4-64 through its registered batched forward
(``metagrad.batched.tnet``: each transform folded into its layer's weights, Conv4's grouped kernel);
``tnet[per-task]`` is the same network as a TNet subclass without a registered forward (the module's forward with a
hook per transformed layer, task by task: the path before the fold); ``maml`` is Conv4-64 alone (the host T-Net
adds its transforms to). The shapes of the ``tnet-omniglot-5w1s-cpu`` preset (5-way 1-shot, 2 queries per class,
meta-batch 16, one inner step at α 0.4; random images: the cost does not depend on them), the training call
(``meta_backward``). The three run in interleaved rounds in one process on the same tasks; the median of each is
reported, and its time as a multiple of ``maml``'s.

Usage:
    .venv/bin/python benchmarks/tnet_fold.py [--meta-batch 16] [--queries 2] [--rounds 5] [--threads 1]
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
from metagrad.models import Conv4, TNet


class PerTaskTNet(TNet):
    """T-Net without the registered batched forward (registered for the exact class): the module's forward per
    task."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conv = Conv4(1, 5, 64, image_size=28)
    tnet, plain = TNet(Conv4(1, 5, 64, image_size=28)), PerTaskTNet(Conv4(1, 5, 64, image_size=28))
    tnet.model.load_state_dict(conv.state_dict())
    with torch.no_grad():   # off the identity, as after some training
        for t in tnet.transforms.values():
            t.weight.add_(0.05 * torch.randn_like(t.weight))
    plain.load_state_dict(tnet.state_dict())
    batch = random_batch(args.meta_batch, 5, 28, queries=args.queries)
    learners = {"maml": MAML(conv, inner_lr=0.4), "tnet": MAML(tnet, inner_lr=0.4),
                "tnet[per-task]": MAML(plain, inner_lr=0.4)}
    times: dict[str, list[float]] = {k: [] for k in learners}
    for _ in range(args.rounds):
        for k, learner in learners.items():
            times[k].append(step_seconds(learner, batch, "chunks"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); meta-batch {args.meta_batch}, "
          f"{args.queries} queries / class, second order, 1 inner step; median of {args.rounds} rounds\n")
    print("| learner | s / meta-step | × maml |\n|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m:.3f} | {m / med['maml']:.2f} |")
    print(f"\ntnet[per-task] / tnet: {med['tnet[per-task]'] / med['tnet']:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
