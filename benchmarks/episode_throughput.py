"""Episode sampling speed: milliseconds per meta-batch (default Omniglot 5-way 1-shot, 15 queries, 32 tasks).

With ``--maml-steps N`` (default 3) it also times N second-order MAML meta-steps (Conv4-64, one inner step, Adam)
on the same meta-batches in the same process and prints sampling time as a share of a meta-step.

    python benchmarks/episode_throughput.py                      # shared Omniglot copy, default cache
    python benchmarks/episode_throughput.py --threads 1 --batches 200
    python benchmarks/episode_throughput.py --cache-dir /tmp/c   # an empty folder also times the first decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metagrad import data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="omniglot")
    p.add_argument("--split", default="train")
    p.add_argument("--root", default=None, help="data root (default: the benchmark's default root)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=50, help="timed batches (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--maml-steps", type=int, default=3, help="timed MAML meta-steps for the share (0: none)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    bench = data.create(a.benchmark, a.split, ways=a.ways, shots=a.shots, queries=a.queries,
                        meta_batch_size=a.meta_batch_size, seed=0, root=a.root, cache_dir=a.cache_dir)
    create_s = time.perf_counter() - t0
    bench.batch(0)  # warm-up: first page-in of the memory-mapped cache
    times, cpu = [], []
    for i in range(1, a.batches + 1):
        t, c = time.perf_counter(), time.process_time()
        bench.batch(i)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # CPU time of all threads: robust to a busy shared machine
    ms, cpu_ms = statistics.median(times) * 1e3, statistics.median(cpu) * 1e3
    cache = getattr(bench, "cache", None)
    print(f"{a.benchmark} {a.split} {a.ways}-way {a.shots}-shot {a.queries}q x {a.meta_batch_size}: "
          f"{ms:.2f} ms per meta-batch (median of {a.batches}, {torch.get_num_threads()} threads; CPU {cpu_ms:.2f} ms); "
          f"create {create_s:.2f} s ({'cache hit' if cache and cache.hit else 'decoded'})")
    step_ms = None
    if a.maml_steps > 0:
        from metagrad import MAML, meta_backward
        from metagrad.models import Conv4

        torch.manual_seed(0)
        learner = MAML(Conv4(bench.x_shape[0], a.ways, 64, image_size=bench.x_shape[-1]), inner_lr=0.4)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        steps = []
        for i in range(a.maml_steps + 1):                 # the first step warms up and is not timed
            batch = bench.batch(i)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            meta_backward(learner, batch)
            opt.step()
            steps.append(time.perf_counter() - t)
        step_ms = statistics.median(steps[1:]) * 1e3
        print(f"second-order MAML meta-step on these batches: {step_ms:.0f} ms (median of {a.maml_steps}); "
              f"sampling is {100 * ms / step_ms:.2f}% of it")
    print(json.dumps({"benchmark": a.benchmark, "ms_per_batch_median": round(ms, 3),
                      "maml_step_ms_median": None if step_ms is None else round(step_ms, 1),
                      "sampling_share_of_step": None if step_ms is None else round(ms / step_ms, 5),
                      "ms_per_batch_p90": round(statistics.quantiles(times, n=10)[-1] * 1e3, 3),
                      "cpu_ms_per_batch_median": round(cpu_ms, 3),
                      "threads": torch.get_num_threads(), "create_s": round(create_s, 3),
                      "cache_hit": bool(cache and cache.hit)}))


if __name__ == "__main__":
    main()
