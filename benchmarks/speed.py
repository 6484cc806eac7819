"""metagrad against higher, learn2learn and a plain per-task loop: one process, identical tasks and weights.

For every case the script first checks that all implementations give the same meta-gradient (float64, the
first ``--check-tasks`` tasks, 1e-5 relative per tensor; it stops if one does not), then times meta-steps
(zero grad, meta-gradient, Adam step) in interleaved rounds (each a block of consecutive steps whose first is
not timed, so that every library is timed in its own allocator steady state) and reports the median seconds per meta-step,
tasks/s and the peak memory of a meta-step (live tensors, from the profiler's allocation events; and the
process's peak RSS above its RSS before the step, which also counts the allocator's caching), each with its
ratio to the fastest peer. It also reports the median CPU seconds (process time), which other
processes' load disturbs less than wall-clock time.

Usage:
    .venv/bin/python benchmarks/speed.py --install-peers        # once: benchmarks/.peers-venv with the peers
    .venv/bin/python benchmarks/speed.py                        # re-runs itself in benchmarks/.peers-venv
    .venv/bin/python benchmarks/speed.py --cases omniglot5 --orders second --steps 1 --rounds 5
    python3 benchmarks/speed.py --device cuda --random-images --no-reexec   # a GPU machine without the data

``metagrad`` is the training call, ``metagrad.meta_backward(learner, batch)`` (task chunks, bounded memory);
the ablation ``metagrad[graph]`` is ``learner.meta_loss(batch).loss.backward()`` (the whole meta-batch's graph).

Without the peers' environment only metagrad and the plain loop run. On CUDA, every timed step ends with a
synchronisation and the memory columns are the CUDA allocator's peak above its level before the step (live
tensors) and its peak reserved memory (with the caching); the CPU-seconds column is then host time only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch

import metagrad
from metagrad.models import MLP, Conv4

PEERS = ("loop", "higher", "learn2learn")
ABLATIONS = ("loop+mgmodel", "metagrad[graph]", "metagrad[per-task]")


@dataclass(frozen=True)
class Case:
    name: str
    bench: str
    ways: int
    shots: int
    queries: int
    meta_batch: int
    inner_lr: float
    loss: str

    def model(self) -> torch.nn.Module:
        if self.bench == "sinusoid":
            return MLP(1, (40, 40), 1)
        return Conv4(1, self.ways, 64, image_size=28)

    def batch(self, root: str | None, index: int = 0, random_images: bool = False) -> metagrad.TaskBatch:
        if random_images and self.bench != "sinusoid":   # same shapes and labels, uniform noise as images
            from scaling import random_batch

            return random_batch(self.meta_batch, self.ways, 28, queries=self.queries)
        bench = metagrad.data.create(self.bench, "train", ways=self.ways, shots=self.shots, queries=self.queries,
                                     meta_batch_size=self.meta_batch, seed=0,
                                     root=None if self.bench == "sinusoid" else root)
        return bench.batch(index)


CASES = {
    # Finn et al.'s settings (shared/specs/maml.md): Omniglot 5-way 1-shot, 15 queries/class, meta-batch 32, α 0.4;
    # 20-way 1-shot, 5 queries/class, meta-batch 16, α 0.1; sinusoid 10-shot, 10 queries, meta-batch 25, α 0.01.
    "omniglot5": Case("Omniglot 5w1s", "omniglot", 5, 1, 15, 32, 0.4, "cross_entropy"),
    "omniglot20": Case("Omniglot 20w1s", "omniglot", 20, 1, 5, 16, 0.1, "cross_entropy"),
    "sinusoid": Case("sinusoid 10-shot", "sinusoid", 1, 10, 10, 25, 0.01, "mse"),
}


# -- memory ------------------------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_step_memory(fn) -> int | None:
    """Bytes by which the process's peak RSS during ``fn()`` exceeds its RSS before (Linux; else None)."""
    if _LIBC is None or not os.path.exists("/proc/self/clear_refs"):
        return None
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024


def peak_tensor_memory(fn) -> int:
    """Peak bytes of live tensors allocated during ``fn()`` (above those alive before), from the profiler's
    allocation and free events: what the computation needs, free of the allocator's caching and fragmentation
    that peak RSS also counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:   # allocations count from an op's start, frees from its end
            events.append((e.time_range.start if d > 0 else e.time_range.end, d))
    current = peak = 0
    for _, d in sorted(events):
        current += d
        peak = max(peak, current)
    return peak


def peak_cuda_memory(fn) -> tuple[int, int]:
    """(peak allocated bytes above those allocated before ``fn()``, peak reserved bytes above the reserve before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - alloc, torch.cuda.max_memory_reserved() - reserved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the measurement -----------------------------------------------------------------------------------------------
def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max|a − b| / max|b| (the project's test metric)."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def check_gradients(names, case, setup, model, batch, tasks: int) -> dict[str, float]:
    """float64 meta-gradients of every implementation on the first ``tasks`` tasks, vs the plain loop."""
    import peers

    sub = batch.select(slice(0, tasks))
    sub = metagrad.TaskBatch(*(t.double() if t.is_floating_point() else t for t in
                               (sub.support_x, sub.support_y, sub.query_x, sub.query_y)))
    grads = {}
    for n in names:
        impl = peers.build(n, model.double(), setup)
        impl.step(sub, update=False)
        grads[n] = impl.grads()
    model.float()
    return {n: rel_error(g, grads["loop"]) for n, g in grads.items()}


def run_case(key: str, order: str, steps: int, names: list[str], args) -> dict:
    import peers

    case = CASES[key]
    setup = peers.Setup(case.inner_lr, steps, order == "first", case.loss)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = case.model().to(device)
    batch = case.batch(args.data_root, random_images=args.random_images).to(device)
    label = f"{case.name}, {order} order, {steps} step{'s' if steps > 1 else ''}, meta-batch {case.meta_batch}"
    if device.type != "cpu":
        label += f", {device.type}"
    print(f"\n### {label}", flush=True)
    errors = check_gradients(names, case, setup, model, batch, args.check_tasks)
    bad = {n: e for n, e in errors.items() if not e <= 1e-5}
    report = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    print(f"gradient check (float64, first {args.check_tasks} tasks, max rel. error vs loop): {report}", flush=True)
    if bad:
        raise SystemExit(f"meta-gradients disagree: {bad}; nothing timed")
    impls = [peers.build(n, model, setup) for n in names]
    for impl in impls:                       # warm-up, and the float32 meta-gradients on the full batch
        impl.step(batch, update=False)
    f32 = {impl.name: rel_error(impl.grads(), impls[names.index("loop")].grads()) for impl in impls}
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    mem: dict[str, list[int]] = {n: [] for n in names}
    live: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.rounds):
        order_r = impls if r % 2 == 0 else impls[::-1]      # alternate the order: no position advantage
        for impl in order_r:
            # A block of consecutive steps, the first untimed: after another library ran, the allocator's state
            # (glibc's mmap threshold, the free heap) is that library's; a training run repeats one library.
            for j in range(args.block):
                synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                impl.step(batch)
                synchronize(device)
                if j > 0 or args.block == 1:
                    wall[impl.name].append(time.perf_counter() - t0)
                    cpu[impl.name].append(time.process_time() - c0)
    for _ in range(args.memory_rounds):
        for impl in impls:
            if device.type == "cuda":
                allocated, reserved = peak_cuda_memory(lambda impl=impl: impl.step(batch))
                live[impl.name].append(allocated)
                mem[impl.name].append(reserved)
                continue
            m = peak_step_memory(lambda impl=impl: impl.step(batch))
            if m is not None:
                mem[impl.name].append(m)
            live[impl.name].append(peak_tensor_memory(lambda impl=impl: impl.step(batch)))
    rows = []
    for n in names:
        rows.append({"impl": n, "wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n]),
                     "wall_all": wall[n], "peak_bytes": max(live[n]),
                     "peak_rss_bytes": max(mem[n]) if mem[n] else None,
                     "grad_rel_f64": errors[n], "grad_rel_f32": f32[n]})
    peer_rows = [r for r in rows if r["impl"] in PEERS]
    fastest = min(peer_rows, key=lambda r: r["wall_s"])
    result = {"case": key, "label": label, "order": order, "steps": steps, "meta_batch": case.meta_batch,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "fastest_peer": fastest["impl"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "random_images": bool(args.random_images),
              "rows": rows}
    print(table(result), flush=True)
    return result


def _mb(b: int | None) -> str:
    return "n/a" if b is None else (f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}")


def table(result: dict) -> str:
    rows, T = result["rows"], result["meta_batch"]
    fastest = next(r for r in rows if r["impl"] == result["fastest_peer"])
    loop = next(r for r in rows if r["impl"] == "loop")
    gpu = result.get("device", "cpu") != "cpu"
    out = [(f"| implementation | s / meta-step | tasks/s | × vs fastest peer | {'host' if gpu else 'CPU'} s / step "
            f"| peak tensor MiB | memory vs loop | {'peak reserved' if gpu else 'peak RSS'} MiB "
            "| grad rel. err (f64 / f32) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = fastest["wall_s"] / r["wall_s"]
        memr = (f"{r['peak_bytes'] / loop['peak_bytes']:.2f}" if r["peak_bytes"] and loop["peak_bytes"] else "n/a")
        name = f"**{r['impl']}**" if r["impl"] == "metagrad" else r["impl"]
        out.append(f"| {name} | {r['wall_s']:.3f} | {T / r['wall_s']:.1f} | {speed:.2f}× | {r['cpu_s']:.3f} | "
                   f"{_mb(r['peak_bytes'])} | {memr} | {_mb(r.get('peak_rss_bytes'))} | "
                   f"{r['grad_rel_f64']:.0e} / {r['grad_rel_f32']:.0e} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install-peers", action="store_true", help="create benchmarks/.peers-venv and exit")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--impls", nargs="+", default=None, help="default: metagrad, the peers found, the ablations")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per implementation")
    ap.add_argument("--block", type=int, default=3,
                    help="consecutive meta-steps per implementation and round; all but the first are timed")
    ap.add_argument("--memory-rounds", type=int, default=1)
    ap.add_argument("--check-tasks", type=int, default=4, help="tasks in the float64 gradient check")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where models, tasks and steps run")
    ap.add_argument("--random-images", action="store_true",
                    help="Omniglot-shaped tasks of random images (a machine without ../shared/data)")
    ap.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data" / "omniglot"))
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per case here")
    ap.add_argument("--no-reexec", action="store_true", help="stay in this interpreter")
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a results file (--out) and exit")
    args = ap.parse_args(argv)
    if args.report:
        for line in args.report.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                print(f"\n#### {result['label']}\n\n{table(result)}")
        return 0

    if args.install_peers:
        import install_peers

        install_peers.install()
        return 0
    import peers

    found = peers.available()
    venv_py = HERE / ".peers-venv" / "bin" / "python"
    if not all(found.values()) and venv_py.exists() and not args.no_reexec and Path(sys.executable) != venv_py:
        print(f"re-running in {venv_py} (the peers' environment)", flush=True)
        os.execv(str(venv_py), [str(venv_py), __file__, *(argv if argv is not None else sys.argv[1:])])
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.impls or (["metagrad", "loop"] + [n for n in ("higher", "learn2learn") if found[n]]
                           + ([] if args.no_ablations else list(ABLATIONS)))
    if "loop" not in names:
        names.append("loop")
    missing = [n for n in ("higher", "learn2learn") if not found[n]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; implementations: {', '.join(names)}"
          + (f"; not installed: {', '.join(missing)} (run --install-peers)" if missing else ""), flush=True)
    for key in args.cases:
        for order in args.orders:
            for steps in args.steps:
                result = run_case(key, order, steps, names, args)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
