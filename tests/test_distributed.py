"""Multi-process meta-training (torch.distributed, gloo on CPU) equals a single process.

Two gloo processes on 127.0.0.1 run ``train`` for 3 meta-steps and their final parameters must equal a single
process's to 1e-6, for plain MAML, each of the four plug-ins and one combination of three; resuming works
with a different number of ranks; a killed rank ends the whole job with a clear message and a good checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad import data
from metagrad import distributed as D
from metagrad.data.base import Benchmark, generator
from metagrad.tasks import TaskBatch
from metagrad.train import train

ATOL = 1e-6


# ------------------------------------------------------------------------------------------------ synthetic images
class TinyImages(Benchmark):
    """Seeded synthetic image tasks: a random 16×16 prototype per class plus noise (no files, no download)."""

    name, task_type, x_shape = "tiny_images", "classification", (1, 16, 16)

    def __init__(self, split, ways, shots, queries, meta_batch_size, seed, **_):
        super().__init__(split, meta_batch_size, seed)
        self.ways, self.shots, self.queries, self.out_dim = ways, shots, queries, ways

    def batch(self, index: int) -> TaskBatch:
        g = generator(self.name, self.seed, self.split, int(index))
        T, W = self.meta_batch_size, self.ways
        protos = torch.randn(T, W, 1, *self.x_shape, generator=g)

        def draw(n):
            x = protos + 0.5 * torch.randn(T, W, n, *self.x_shape, generator=g)
            return x.reshape(T, W * n, *self.x_shape), torch.arange(W).repeat_interleave(n).expand(T, -1).clone()

        return TaskBatch(*draw(self.shots), *draw(self.queries))


try:
    data.register("tiny_images")(TinyImages)
except ValueError:  # already registered (module imported twice)
    pass

COMMON = ["train.iterations=3", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=1",
          "eval.tasks=2", "eval.meta_batch_size=2", "train.threads=1"]
SIN = {"name": "sin", "benchmark": {"name": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp"},
       "maml": {"inner_lr": 0.01}, "train": {"meta_batch_size": 5}, "eval": {"inner_steps": [1]}}
IMG = {"name": "img", "benchmark": {"name": "tiny_images", "ways": 3, "shots": 1, "queries": 2},
       "model": {"name": "conv4", "width": 8}, "maml": {"inner_lr": 0.4}, "train": {"meta_batch_size": 3}}
CASES = {
    # name: (preset, overrides). T chosen so the two shares differ in size (weights n_r/T are not 1/2).
    "maml": (SIN, []),
    "meta_gna": (SIN, ["plugins=meta_gna", "maml.inner_steps=2"]),
    "cxgrad": (IMG, ["plugins=cxgrad", "plugin_args.cxgrad.context_dim=8"]),
    "trlearner": (IMG, ["plugins=trlearner", "train.meta_batch_size=9", "plugin_args.trlearner.group_size=3"]),
    "cml": (SIN, ["plugins=cml"]),
    # groups [0,3) [3,7) (a last group of one joins the previous one): shares of 3 and 4 tasks
    "cxgrad+trlearner+cml": (IMG, ["plugins=cxgrad,trlearner,cml", "train.meta_batch_size=7",
                                   "plugin_args.trlearner.group_size=3", "plugin_args.cxgrad.context_dim=8"]),
    # TRLearner with pairs: its heads get no gradient in one process (grad None), nor here
    "trlearner-pairs": (SIN, ["plugins=trlearner", "train.meta_batch_size=6", "plugin_args.trlearner.group_size=2"]),
    # the other hosts: ProtoNet with TRLearner's groups; T-Net's transforms with BOIL's frozen head
    "protonet+trlearner": (IMG, ["learner=protonet", "plugins=trlearner", "train.meta_batch_size=9",
                                 "plugin_args.trlearner.group_size=3"]),
    "tnet+boil": (IMG, ["model.wrap=tnet", "maml.adapt=body"]),
}
RESUME = "cml"   # resumed with 2 ranks from 1, and with 1 from 2
# CxGrad's generator gets gradients at float32 noise level (the scale invariance the spec describes nearly
# cancels its path), and Adam divides by their size: any change of summation order, e.g. two half-batches,
# moves it by 1e-6..2e-5 after 3 steps (seen up to 1.3e-5 on a loaded machine). These cases are also run in
# float64, where the 1e-6 check on every parameter is meaningful.
FP64 = ("maml", "cxgrad", "trlearner", "cxgrad+trlearner+cml", "protonet+trlearner", "tnet+boil")
NOISY = "generator."   # parameters held to FP32_NOISY_ATOL in the float32 runs
FP32_NOISY_ATOL = 1e-4
# TRLearner alone in float32: its relation term gives some conv-weight entries a gradient that is float32 noise
# around zero, and Adam's first steps move such an entry by ±meta_lr whatever its size, so the two summation
# orders of one process and two ranks part by up to 2·meta_lr after 3 steps (1.7e-3 measured on this machine's
# BLAS, 0 on another); its float32 gradient already differs by 4e-5 relative at the first step (the term is a
# difference of near-equal model outputs). In float64 the two runs agree to 4e-16 (test below): the float32 run
# checks the first step's loss, and its gradient norm to 1e-3. TRLearner on ProtoNet (1.5e-3) and T-Net with BOIL
# (9e-5) part the same way in float32 and agree in float64.
FP32_AMPLIFIED = ("trlearner", "protonet+trlearner", "tnet+boil")


def config(case: str, *extra: str) -> C.Config:
    preset, overrides = CASES[case]
    return C.resolve(preset, [*COMMON, *overrides, *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(case: str, out_dir: Path | str, *extra: str, resume: bool = False, fp64: bool = False) -> None:
    """``train`` one case; ``fp64``: with float64 as the default dtype (models and synthetic data)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if fp64 else torch.float32)
    try:
        train(config(case, *extra), out_dir, resume=resume, progress=False, plot=False)
    finally:
        torch.set_default_dtype(old)


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, list[str], str, bool, bool]]) -> None:
    """One gloo rank: joins the group once, then runs every job (train() reuses the group)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case, extra, out_dir, resume, fp64 in jobs:
            run(case, out_dir, *extra, resume=resume, fp64=fp64)
    finally:
        dist.destroy_process_group()


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_latest(run_dir)["learner"]


def max_diff(a: Path, b: Path, skip: str | None = None) -> float:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    return max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa if not (skip and skip in k))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references first, then one 2-rank gloo job that runs every case."""
    root = tmp_path_factory.mktemp("dist")
    started = time.perf_counter()
    for case in CASES:
        run(case, root / case / "single")
    for case in FP64:
        run(case, root / case / "single64", fp64=True)
    run(RESUME, root / "resume-1to2", "train.iterations=2")
    jobs = [(case, [], str(root / case / "dist"), False, False) for case in CASES]
    jobs += [(case, [], str(root / case / "dist64"), False, True) for case in FP64]
    jobs += [(RESUME, [], str(root / "resume-1to2"), True, False),
             (RESUME, ["train.iterations=2"], str(root / "resume-2to1"), False, False)]
    mp.spawn(_worker, args=(2, free_port(), jobs), nprocs=2, join=True)
    run(RESUME, root / "resume-2to1", resume=True)
    print(f"distributed fixture: {time.perf_counter() - started:.1f} s")
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_equal_one_process(runs, case):
    single, two = runs / case / "single", runs / case / "dist"
    assert ckpt.load_latest(two)["iteration"] == 3
    assert ckpt.load_latest(two)["info"]["world_size"] == 2
    if case not in FP32_AMPLIFIED:
        assert max_diff(single, two, skip=NOISY) <= ATOL
        assert max_diff(single, two) <= FP32_NOISY_ATOL
    # Rank 0 logged the whole batch's loss, not its share's.
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, two)]
    assert [r["iteration"] for r in rows[1]] == [1, 2, 3]
    pairs = list(zip(*rows))
    amplified = case in FP32_AMPLIFIED
    for a, b in pairs[:1] if amplified else pairs:
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3 if amplified else 1e-5, abs=1e-6)
    # Only rank 0 wrote: exactly the single-process files, no stray temporaries.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir())


@pytest.mark.parametrize("case", FP64)
def test_two_gloo_ranks_equal_one_process_float64(runs, case):
    assert all(v.dtype == torch.float64 for v in params(runs / case / "dist64").values() if v.is_floating_point())
    assert max_diff(runs / case / "single64", runs / case / "dist64") <= ATOL


@pytest.mark.parametrize("how", ["resume-1to2", "resume-2to1"])
def test_resume_with_another_number_of_ranks(runs, how):
    assert ckpt.load_latest(runs / how)["iteration"] == 3
    assert max_diff(runs / RESUME / "single", runs / how) <= ATOL


def test_pairs_keep_unused_parameters_gradient_free(runs):
    # The heads get no gradient with groups of two: Adam must not have touched them on any rank count.
    opt = ckpt.load_latest(runs / "trlearner-pairs" / "dist")["optimizer"]
    ref = ckpt.load_latest(runs / "trlearner-pairs" / "single")["optimizer"]
    assert len(opt["state"]) == len(ref["state"])


# ------------------------------------------------------------------------------------------------ shares
def test_shares_are_contiguous_disjoint_and_cover():
    for T in range(1, 20):
        for world in (1, 2, 3, 4):
            for group in (None, 2, 3, 4):
                s = D.shares(T, world, group)
                assert s[0].start == 0 and s[-1].stop == T
                assert all(a.stop == b.start for a, b in itertools.pairwise(s))
                sizes = [x.stop - x.start for x in s]
                assert sizes[0] >= 1
                if group is None:
                    assert max(sizes) - min(sizes) <= 1


def test_shares_keep_trlearner_groups_whole():
    from metagrad.methods.trlearner import task_groups

    for T in range(2, 20):
        for world in (2, 3):
            for g in (2, 3, 4):
                bounds = {r.start for r in task_groups(T, g)} | {T}
                for s in D.shares(T, world, g):
                    assert s.start in bounds and s.stop in bounds
                    # the share regroups locally exactly as in the whole batch
                    local = [range(r.start + s.start, r.stop + s.start) for r in task_groups(s.stop - s.start, g)] \
                        if s.stop > s.start else []
                    assert local == [r for r in task_groups(T, g) if s.start <= r.start < s.stop]


def test_shard_weights_sum_to_one():
    batch = TinyImages("train", 3, 1, 1, 7, 0).batch(0)
    parts = [D.shard(batch, r, 3, 3) for r in range(3)]
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    assert [len(p) for p, _ in parts] == [3, 4, 0]
    assert torch.equal(torch.cat([p.support_x for p, _ in parts]), batch.support_x)


def test_teardown_waits_for_every_rank_only_at_a_normal_end(monkeypatch):
    """The normal end passes a barrier before leaving the group; an error path leaves at once (a peer may be dead);
    a group the caller joined is left alone."""
    calls: list[str] = []
    monkeypatch.setattr(D.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    D.teardown(D.Context(0, 2, 0, owns_group=True), synchronize=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.teardown(D.Context(0, 2, 0, owns_group=True))
    assert calls == ["destroy"]
    calls.clear()
    D.teardown(D.Context(0, 2, 0, owns_group=False), synchronize=True)
    assert calls == []


def test_nproc_under_torchrun_must_agree(monkeypatch, capsys):
    from metagrad.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "--config", "sinusoid-10shot", "--nproc", "2", "--out-dir", "x"]) == 2
    assert "torchrun started 3 processes" in capsys.readouterr().err


def test_bf16_autocast_runs_and_stays_close(tmp_path):
    a = train(config("maml", "train.iterations=2"), tmp_path / "fp32", progress=False, plot=False)
    b = train(config("maml", "train.iterations=2", "train.precision=bf16"), tmp_path / "bf16", progress=False,
              plot=False)
    assert a.iteration == b.iteration == 2
    pa, pb = params(tmp_path / "fp32"), params(tmp_path / "bf16")
    assert all(pb[k].dtype == torch.float32 and torch.isfinite(pb[k]).all() for k in pb)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-2  # two Adam steps of 1e-3 each at most


# ------------------------------------------------------------------------------------------------ CLI and a kill
def _rank_pids(ancestor: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers below ``ancestor`` (Linux /proc)."""
    def parent(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if "TORCHELASTIC_RUN_ID" not in env or "RANK" not in env:
            continue
        pid = int(p.name)
        while pid > 1 and pid != ancestor:
            pid = parent(pid)
        if pid == ancestor:
            found[int(env["RANK"])] = int(p.name)
    return found


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "metagrad", "train", "--config", "sinusoid-10shot", "--nproc", "2",
           "--no-progress", "--out-dir", str(run), "--set", "train.iterations=100000", "--set",
           "train.checkpoint_every=5", "--set", "train.val_every=0", "--set", "train.log_every=5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt.path_of(run).exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "distributed training stopped: a rank failed or was killed" in err
    assert "--resume" in err
    done = ckpt.load_latest(run)["iteration"]
    assert done >= 5 and done % 5 == 0
    # Continue with one process, a few iterations more.
    res = subprocess.run([sys.executable, "-m", "metagrad", "train", "--resume", "--out-dir", str(run),
                          "--no-progress", "--nproc", "1", "--set", f"train.iterations={done + 3}",
                          "--set", "eval.tasks=10"], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert ckpt.load_latest(run)["iteration"] == done + 3


def test_cli_nproc_2_runs_torchrun_and_equals_one_process(tmp_path):
    """``metagrad train --nproc 2``: torchrun's module, ranks from its environment, rank 0 prints and writes."""
    sets = ["train.iterations=3", "train.val_every=0", "train.log_every=1", "eval.tasks=5", "train.meta_batch_size=5"]
    args = [a for s in sets for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "metagrad", "train", "--config", "sinusoid-10shot", "--nproc", "2",
                          "--no-progress", "--out-dir", str(tmp_path / "two"), *args],
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run directory:") == 1          # printed by rank 0 only
    train(C.resolve("sinusoid-10shot", sets), tmp_path / "one", progress=False, plot=False)
    assert ckpt.load_latest(tmp_path / "two")["info"]["world_size"] == 2
    assert max_diff(tmp_path / "one", tmp_path / "two") <= ATOL
