"""Multi-process speed-up: meta-training tasks per second with 1 process vs N (torchrun, gloo on CPU).

Runs ``metagrad train`` with ``--nproc`` 1 and N in turn (interleaved, so a machine whose load changes
affects both alike), and reads the training throughput rank 0 logs (``tasks_per_s`` of every metrics
line but the first, which includes warm-up). Startup (process launch, rendezvous, data loading) and the
final evaluation are not counted.

    python benchmarks/distributed_speedup.py                              # Omniglot 5-way 1-shot, 2 processes
    python benchmarks/distributed_speedup.py --config sinusoid-10shot --iterations 300 --log-every 50
    python benchmarks/distributed_speedup.py --nproc 4 --rounds 3 --set model.width=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(args: argparse.Namespace, nproc: int, threads: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "metagrad", "train", "--config", args.config, "--nproc", str(nproc),
           "--no-progress", "--out-dir", str(out), "--set", f"train.iterations={args.iterations}",
           "--set", f"train.log_every={args.log_every}", "--set", "train.val_every=0",
           "--set", "train.checkpoint_every=0", "--set", "eval.tasks=1", "--set", f"train.threads={threads}"]
    for s in args.set:
        cmd += ["--set", s]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["tasks_per_s"] for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="omniglot-5w1s")
    p.add_argument("--data-root", default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="interleaved (1 process, N processes) pairs")
    p.add_argument("--setups", default=None, help="PROCSxTHREADS list, default 1x1,1x<cores>,<N>x<cores/N>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    # 1 process with 1 thread or every core; N processes share the cores (torchrun's default is 1 thread each).
    setups = [(1, 1), (1, cores), (args.nproc, max(1, cores // args.nproc))]
    if args.setups:
        setups = [tuple(int(v) for v in s.split("x")) for s in args.setups.split(",")]
    setups = list(dict.fromkeys(setups))
    results: dict[tuple[int, int], list[float]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for nproc, threads in setups:
                rate = one_run(args, nproc, threads, Path(tmp) / f"r{r}-p{nproc}")
                results[(nproc, threads)].append(rate)
                print(f"round {r}: {nproc} process(es) x {threads} thread(s): {rate:.1f} tasks/s", flush=True)
    mean = {s: statistics.mean(v) for s, v in results.items()}
    single = max(v for (n, _), v in mean.items() if n == 1)   # the best single-process setting
    print(json.dumps({"config": args.config, "set": args.set, "cores": cores, "load_avg": os.getloadavg(),
                      "tasks_per_s": {f"{n}x{t}": [round(v, 2) for v in vs] for (n, t), vs in results.items()},
                      "speedup_vs_best_single": {f"{n}x{t}": round(v / single, 3) for (n, t), v in mean.items()
                                                 if n > 1}}))


if __name__ == "__main__":
    main()
