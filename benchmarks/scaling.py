"""Scaling of one second-order MAML meta-step: seconds and peak memory against meta-batch size, inner steps,
ways and image size, for metagrad (``meta_backward``, task chunks) and the plain per-task loop (the fastest peer
on Omniglot).

One factor varies at a time around the base setting (5-way 1-shot, 15 queries per class, 1 inner step,
meta-batch 32, 28×28 single-channel images, Conv4-64). Images are random (the cost does not depend on them):
28×28×1 is Omniglot's shape, 84×84×3 mini-ImageNet's. Results are appended as JSON lines; ``--plot`` turns a
results file into the table and the PNG of docs/performance.md.

Usage:
    .venv/bin/python benchmarks/scaling.py --sweep meta_batch --out /tmp/scaling.jsonl
    .venv/bin/python benchmarks/scaling.py --sweep inner_steps ways image_size --out /tmp/scaling.jsonl
    .venv/bin/python benchmarks/scaling.py --plot /tmp/scaling.jsonl --png docs/scaling.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers
import torch
from speed import peak_step_memory, peak_tensor_memory

from metagrad import TaskBatch
from metagrad.models import Conv4

BASE = {"meta_batch": 32, "inner_steps": 1, "ways": 5, "image_size": 28}
SWEEPS = {"meta_batch": [1, 4, 16, 32, 64], "inner_steps": [1, 2, 5, 10], "ways": [5, 20],
          "image_size": [28, 84]}


def random_batch(T: int, ways: int, size: int, queries: int = 15, seed: int = 0) -> TaskBatch:
    channels = 1 if size <= 28 else 3
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).expand(T, -1).clone()
    yq = torch.arange(ways).repeat_interleave(queries).expand(T, -1).clone()
    return TaskBatch(torch.rand(T, ways, channels, size, size, generator=g), ys,
                     torch.rand(T, ways * queries, channels, size, size, generator=g), yq)


def measure(point: dict, impls: list[str], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    size = point["image_size"]
    model = Conv4(1 if size <= 28 else 3, point["ways"], 64, image_size=size)
    batch = random_batch(point["meta_batch"], point["ways"], size)
    setup = peers.Setup(0.4, point["inner_steps"], False, "cross_entropy")
    built = [peers.build(n, model, setup) for n in impls]
    for b in built:
        b.step(batch, update=False)   # warm-up
    times: dict[str, list[float]] = {b.name: [] for b in built}
    for r in range(rounds):
        for b in (built if r % 2 == 0 else built[::-1]):
            t0 = time.perf_counter()
            b.step(batch)
            times[b.name].append(time.perf_counter() - t0)
    rows = []
    for b in built:
        rss = peak_step_memory(lambda b=b: b.step(batch))
        peak = peak_tensor_memory(lambda b=b: b.step(batch))
        rows.append({**point, "impl": b.name, "wall_s": statistics.median(times[b.name]), "peak_bytes": peak,
                     "peak_rss_bytes": rss})
    return rows


def plot(path: Path, png: Path | None) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| sweep | value | implementation | s / meta-step | peak tensor MiB | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r[r['sweep']]} | {r['impl']} | {r['wall_s']:.3f} | "
                     f"{(r['peak_bytes'] or 0) / 2**20:.0f} | {(r.get('peak_rss_bytes') or 0) / 2**20:.0f} |")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sweeps = [s for s in SWEEPS if any(r["sweep"] == s for r in rows)]
        fig, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 6.5), squeeze=False)
        for j, s in enumerate(sweeps):
            for impl in sorted({r["impl"] for r in rows if r["sweep"] == s}):
                pts = sorted((r[s], r["wall_s"], (r["peak_bytes"] or 0) / 2**20) for r in rows
                             if r["sweep"] == s and r["impl"] == impl)
                xs = [p[0] for p in pts]
                axes[0][j].plot(xs, [p[1] for p in pts], "o-", label=impl)
                axes[1][j].plot(xs, [p[2] for p in pts], "o-", label=impl)
            for i, ylabel in enumerate(("s / meta-step", "peak tensor MiB")):
                ax = axes[i][j]
                ax.set_xlabel(s.replace("_", " "))
                ax.set_ylabel(ylabel)
                if s == "meta_batch":
                    ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
            axes[0][j].legend(fontsize=8)
        fig.suptitle("Second-order MAML meta-step, Conv4-64 (one factor varied around 5w1s, T=32, 1 step, 28×28)")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--values", nargs="+", type=int, default=None, help="override the sweep's values")
    ap.add_argument("--impls", nargs="+", default=["metagrad", "loop"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="a results file: print the table (and --png)")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.plot:
        print(plot(args.plot, args.png))
        return 0
    for sweep in args.sweep:
        for v in args.values or SWEEPS[sweep]:
            point = {**BASE, sweep: v}
            for row in measure(point, args.impls, args.rounds):
                row["sweep"] = sweep
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
