"""Peak memory of a meta-step: MAML alone and with each plug-in, against the plain per-task loop.

The case of issue 22: Omniglot 5-way 1-shot, 15 queries per class, meta-batch 32, Conv4-64, α 0.4, one inner
step, second order (Finn et al.'s shapes, as in ``benchmarks/speed.py``). For every row the script measures the
peak of live tensors during one meta-gradient (zero grad, then the gradient of every parameter; the profiler's
allocation events, ``speed.peak_tensor_memory``) after an untimed warm-up step, in one process, on the same batch
and the same initial weights, and divides it by the peak of the plain per-task loop (``peers.Loop``:
``torch.func.functional_call``, ``autograd.grad(create_graph=True)``, backward per task) measured the same way.

Rows:
- **loop**: the reference, 1.00 by definition.
- **MAML**: ``metagrad.meta_backward(learner, batch)``, what training runs (chunks of tasks, backward per chunk).
- **MAML + <plug-in>**: the same with each registered plug-in at its defaults, and all of them together.
- **[graph]** rows (``--graph``): ``learner.meta_loss(batch).loss.backward()``, the whole meta-batch's graph at
  once, for comparison.

Memory does not depend on the machine's load, so this may run beside other work (unlike timings). Images are
uniform noise of Omniglot's shape by default (memory does not depend on pixel values); ``--data-root`` uses the
real images.

Usage:
    .venv/bin/python benchmarks/memory.py                       # the table of docs/performance.md
    .venv/bin/python benchmarks/memory.py --graph --out runs/memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch

import metagrad
from metagrad import MAML, methods


def measure(step, params: list[torch.nn.Parameter]) -> int:
    """Peak live-tensor bytes of ``step()`` after a warm-up call (gradients set to None before each)."""
    from speed import peak_tensor_memory

    def run() -> None:
        for p in params:
            p.grad = None
        step()

    run()
    return peak_tensor_memory(run)


def rows(args: argparse.Namespace) -> list[dict]:
    import peers
    from speed import Case

    case = Case("Omniglot 5w1s", "omniglot", 5, 1, args.queries, args.meta_batch, args.inner_lr, "cross_entropy")
    torch.manual_seed(0)
    model = case.model()
    batch = case.batch(args.data_root, random_images=args.data_root is None)
    setup = peers.Setup(args.inner_lr, 1, False, "cross_entropy")
    loop = peers.build("loop", model, setup)
    out = [{"row": "loop", "bytes": measure(lambda: loop.meta_gradient(batch), loop.params())}]
    combos = [("MAML", [])] + [(f"MAML + {k}", [k]) for k in methods.available()]
    combos.append(("MAML + " + " + ".join(methods.available()), list(methods.available())))
    for label, keys in combos:
        torch.manual_seed(0)
        learner = MAML(case.model(), inner_lr=args.inner_lr,
                       plugins=[methods.create(k) for k in keys])
        learner.model.load_state_dict(model.state_dict())
        params = list(learner.parameters())
        out.append({"row": label, "bytes": measure(lambda lr=learner: metagrad.meta_backward(lr, batch), params)})
        if args.graph:
            out.append({"row": f"{label} [graph]",
                        "bytes": measure(lambda lr=learner: lr.meta_loss(batch).loss.backward(), params)})
        print(f"{out[-1]['row']}: {out[-1]['bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    for r in out:
        r["ratio"] = r["bytes"] / out[0]["bytes"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| row | peak tensor MiB | vs loop |", "|---|---|---|"]
    lines += [f"| {r['row']} | {r['bytes'] / 2**20:.1f} | {r['ratio']:.2f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15, help="query images per class")
    ap.add_argument("--inner-lr", type=float, default=0.4)
    ap.add_argument("--data-root", default=None, help="Omniglot's data folder (default: noise images)")
    ap.add_argument("--graph", action="store_true", help="also the whole-graph call of every row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the rows as JSON lines")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = rows(args)
    print(table(results))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps({**r, "meta_batch": args.meta_batch, "queries": args.queries,
                                    "torch": torch.__version__}) + "\n" for r in results)


if __name__ == "__main__":
    main()
