"""Fault injection: kills at random moments, corrupt files of every kind, NaNs, and bad input at every edge.

The kill-and-resume test SIGKILLs a training process 20+ times at random points (during start-up, loading,
training, checkpoint and metrics writes, evaluation) and resumes it each time; the final parameters must equal
an uninterrupted run's bit for bit, and the metrics file must hold every logged iteration exactly once.
The default version forks its training processes from a forkserver that has metagrad and torch imported (a
kill costs milliseconds, not an interpreter start-up); the ``slow`` version starts ``python -m metagrad`` each
time. docs/reliability.md tabulates what these tests tried.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from metagrad import MAML, TaskBatch, data, rundir
from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad.cli import main
from metagrad.data import folders
from metagrad.data.errors import DataError
from metagrad.evaluation import make_learner, read_records
from metagrad.models import MLP, Conv4
from metagrad.train import NumericalWarning, train

SRC = Path(__file__).resolve().parents[1] / "src"
TIMING = ("tasks_per_s", "wall_s")
# Small enough for seconds, long enough for many checkpoints: batch i of the sinusoid is a pure function of i.
KILL_RUN = ["train.iterations=240", "train.meta_batch_size=5", "train.checkpoint_every=4", "train.log_every=4",
            "train.val_every=40", "train.val_tasks=5", "eval.tasks=10", "train.threads=1", "train.keep_checkpoints=3"]


def tiny(*extra: str, iterations: int = 12) -> C.Config:
    return C.resolve("sinusoid-10shot", [f"train.iterations={iterations}", "train.log_every=2", "train.val_every=0",
                                         "train.checkpoint_every=2", "eval.tasks=10", "train.meta_batch_size=5",
                                         "train.threads=1", *extra])


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical learner, optimiser and RNG states; the same metrics lines and evaluation records."""
    sa, sb = ckpt.load_latest(a), ckpt.load_latest(b)
    assert sa["iteration"] == sb["iteration"]
    assert sa["learner"].keys() == sb["learner"].keys()
    for name in sa["learner"]:
        assert torch.equal(sa["learner"][name], sb["learner"][name]), name
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert metrics(a) == metrics(b)
    key = [(r["inner_steps"], r["mean"], r["ci95"], r["iteration"]) for r in read_records(a)]
    assert key == [(r["inner_steps"], r["mean"], r["ci95"], r["iteration"]) for r in read_records(b)]


# ================================================================================================ kills
@dataclass
class KillLog:
    """What a kill-and-resume campaign did, for the assertions and for docs/reliability.md."""

    kills: list[dict] = field(default_factory=list)
    finished_early: int = 0
    seconds: float = 0.0

    def count(self, **match: object) -> int:
        return sum(all(k.get(key) == v for key, v in match.items()) for k in self.kills)


class _Forked:
    """A training process forked from the forkserver (metagrad already imported there)."""

    ctx = None

    def __init__(self, argv: list[str]) -> None:
        if _Forked.ctx is None:
            _Forked.ctx = multiprocessing.get_context("forkserver")
            # Everything a training process imports, including torch's lazy imports on the first meta-gradient
            # (sympy, through symbolic_shapes; torch._dynamo, through Adam) and the final plot's matplotlib.
            data.available()
            _Forked.ctx.set_forkserver_preload(
                [m for m in sorted(sys.modules) if m.startswith("metagrad")] +
                ["metagrad.plots", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "matplotlib.pyplot",
                 "matplotlib.backends.backend_agg"])
        self.proc = _Forked.ctx.Process(target=main, args=(argv,))
        self.proc.start()
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def wait(self) -> int | None:
        self.proc.join()
        code = self.proc.exitcode
        self.proc.close()
        return code


class _Spawned:
    """``python -m metagrad train ...``: a real interpreter start-up each time."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen([sys.executable, "-m", "metagrad", *argv], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int | None:
        return self.proc.wait()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _newest(run: Path) -> int:
    """The newest kept checkpoint's iteration, from the file names alone (no load)."""
    found = ckpt.numbered(run)
    return found[0][0] if found else 0


def kill_campaign(run: Path, sets: list[str], n_kills: int, seconds_per_iteration: float, iterations: int,
                  spawn: Callable[[list[str]], _Forked | _Spawned], seed: int = 0) -> KillLog:
    """SIGKILL ``train`` on ``run`` ``n_kills`` times at random moments, resuming it each time.

    Every fourth kill lands at a random time after the process starts (interpreter or fork start-up,
    reading the checkpoint, truncating the metrics file); the rest wait until the session has started (its
    ``config.json`` rewritten), then a random time of about ``iterations/16`` meta-updates, so that the run
    advances (past 85% of the run, only start-up kills) but cannot finish before ``n_kills`` kills. Kills count only if the process was still alive.
    """
    rng = random.Random(seed)
    log = KillLog()
    argv = ["train", "--config", "sinusoid-10shot", "--out-dir", str(run), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]
    startup = 0.2  # seconds from launch to a started session; re-measured on every training-phase kill
    t_begin = time.perf_counter()
    while len(log.kills) < n_kills:
        before = _newest(run)
        stamp = _stamp(run / "config.json")
        # Near the end only start-up kills: the run must not finish before the last kill.
        mode = "startup" if len(log.kills) % 4 == 3 or before > 0.85 * iterations else "training"
        proc = spawn(argv + (["--resume"] if run.exists() else []))
        t0 = time.perf_counter()
        if mode == "startup":
            deadline = t0 + rng.uniform(0, startup)
        else:
            while proc.alive() and _stamp(run / "config.json") == stamp and time.perf_counter() - t0 < 60:
                time.sleep(0.002)
            startup = time.perf_counter() - t0
            deadline = time.perf_counter() + rng.uniform(0, seconds_per_iteration * iterations / 20)
        while proc.alive() and time.perf_counter() < deadline:
            time.sleep(0.001)
        if not proc.alive():  # it finished (or failed) before the kill
            code = proc.wait()
            assert code in (0, None), f"the training process failed with exit status {code}"
            log.finished_early += 1
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        metrics_file = run / "metrics.jsonl"
        torn = metrics_file.is_file() and metrics_file.stat().st_size > 0 and \
            not metrics_file.read_bytes().endswith(b"\n")
        temps = [p.name for p in run.glob(".*.tmp-*")] if run.is_dir() else []
        log.kills.append({"mode": mode, "after_s": round(time.perf_counter() - t0, 4), "before": before,
                          "after": _newest(run), "torn_metrics_line": torn, "temp_files": len(temps)})
    log.seconds = time.perf_counter() - t_begin
    return log


def _campaign_test(tmp_path: Path, sets: list[str], n_kills: int, spawn: Callable, seed: int) -> KillLog:
    cfg = C.resolve("sinusoid-10shot", sets)
    whole = tmp_path / "whole"
    t0 = time.perf_counter()
    train(cfg, whole, progress=False, plot=False)
    per_it = (time.perf_counter() - t0) / cfg.train.iterations
    run = tmp_path / "killed"
    log = kill_campaign(run, sets, n_kills, per_it, cfg.train.iterations, spawn, seed=seed)
    assert len(log.kills) >= n_kills, log
    assert _newest(run) < cfg.train.iterations  # the kills did not let it finish
    # The last session: the real command line, config from the run's own config.json.
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-m", "metagrad", "train", "--resume", "--out-dir", str(run),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr  # no checkpoint was ever corrupt: writes are atomic
    assert_same_run(whole, run)
    iters = [r["iteration"] for r in metrics(run)]
    assert iters == sorted(set(iters)) == [r["iteration"] for r in metrics(whole)]  # no duplicates, no gaps
    assert not list(run.glob(".*tmp*")) and not list(run.glob("*.corrupt"))
    assert len(ckpt.numbered(run)) == cfg.train.keep_checkpoints
    log.kills.sort(key=lambda k: k["after_s"])
    print(json.dumps({"kills": len(log.kills), "seconds": round(log.seconds, 1),
                      "startup_mode": log.count(mode="startup"), "training_mode": log.count(mode="training"),
                      "progress_kills": sum(k["after"] > k["before"] for k in log.kills),
                      "torn_metrics": log.count(torn_metrics_line=True),
                      "temp_left": sum(k["temp_files"] > 0 for k in log.kills)}))
    return log


def test_sigkill_20_times_then_resume_is_bit_identical(tmp_path):
    """24 SIGKILLs of forked training processes at random moments; the resumed run equals an uninterrupted one.

    METAGRAD_KILL_SEED=N draws another campaign (docs/reliability.md reports seeds 0-2)."""
    _campaign_test(tmp_path, KILL_RUN, n_kills=24, spawn=_Forked, seed=int(os.environ.get("METAGRAD_KILL_SEED", "0")))


@pytest.mark.slow
def test_sigkill_python_dash_m_40_times_then_resume_is_bit_identical(tmp_path):
    """40 SIGKILLs of ``python -m metagrad train`` (a full interpreter start-up each time), longer run."""
    sets = [s.replace("train.iterations=240", "train.iterations=1200") for s in KILL_RUN]
    _campaign_test(tmp_path, sets, n_kills=40, spawn=_Spawned, seed=1)


# ================================================================================================ checkpoints
def test_keeps_the_last_k_and_checkpoint_pt_is_the_latest(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.keep_checkpoints=3", iterations=12), run, progress=False, plot=False)
    assert [i for i, _ in ckpt.numbered(run)] == [12, 10, 8]
    assert (run / "checkpoint.pt").read_bytes() == ckpt.numbered_path(run, 12).read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # the API contract: a plain dict
    assert state["iteration"] == 12 and state["checksum"] == ckpt.checksum(state)
    cfg = tiny()
    learner = make_learner(cfg, data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=2))
    assert state["learner"].keys() == learner.state_dict().keys()  # the learner's state_dict
    run0 = tmp_path / "run0"
    train(tiny("train.keep_checkpoints=0", iterations=4), run0, progress=False, plot=False)
    assert ckpt.numbered(run0) == [] and (run0 / "checkpoint.pt").is_file()


def _flip_file_byte(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def _flip_tensor_byte(path: Path) -> None:
    """Change one value inside a stored tensor, keeping the file a valid torch.save file."""
    state = torch.load(path, weights_only=True)
    name = next(iter(state["learner"]))
    state["learner"][name].view(-1)[0] += 1e-3
    torch.save(state, path)  # the stored checksum is now stale


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "bit flip in the zip": lambda p: _flip_file_byte(p, 200),
    "value changed (checksum)": _flip_tensor_byte,
    "incomplete dict": lambda p: torch.save({"learner": {}}, p),
    "deleted": lambda p: p.unlink(),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 12-iteration run, and the same run stopped (cleanly) at iteration 8."""
    base = tmp_path_factory.mktemp("ref")
    train(tiny(iterations=12), base / "whole", progress=False, plot=False)
    train(tiny(iterations=8), base / "half", progress=False, plot=False)
    return base / "whole", base / "half"


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_and_loses_nothing(kind, reference, tmp_path):
    import shutil

    whole, half = reference
    run = Path(shutil.copytree(half, tmp_path / "run"))
    CORRUPTIONS[kind](run / "checkpoint.pt")
    with pytest.warns(ckpt.CheckpointWarning, match="using the previous good one, checkpoint-00000008.pt"):
        train(tiny(iterations=12), run, resume=True, progress=False, plot=False)
    assert_same_run_params(whole, run)
    assert (run / "checkpoint.pt.corrupt").exists() == (kind != "deleted")


def assert_same_run_params(a: Path, b: Path) -> None:
    sa, sb = ckpt.load_latest(a), ckpt.load_latest(b)
    assert all(torch.equal(sa["learner"][k], sb["learner"][k]) for k in sa["learner"])
    assert metrics(a) == metrics(b)


def test_two_corrupt_checkpoints_fall_back_further_and_replay(reference, tmp_path):
    """checkpoint.pt and the newest kept copy both bad: resume from iteration 6; the replay is bit-identical."""
    import shutil

    whole, half = reference
    run = Path(shutil.copytree(half, tmp_path / "run"))
    CORRUPTIONS["truncated"](run / "checkpoint.pt")
    CORRUPTIONS["value changed (checksum)"](ckpt.numbered_path(run, 8))
    with pytest.warns(ckpt.CheckpointWarning, match="2 newer checkpoint.*checkpoint-00000006.pt \\(iteration 6\\)"):
        train(tiny(iterations=12), run, resume=True, progress=False, plot=False)
    assert_same_run_params(whole, run)


def test_every_checkpoint_corrupt_is_one_clear_error(reference, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(reference[1], tmp_path / "run"))
    for p in ckpt.candidates(run):
        CORRUPTIONS["garbage"](p)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metagrad: error: checkpoint") and "older kept checkpoints are unusable too" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_cli_warns_in_one_line_and_eval_falls_back(reference, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(reference[1], tmp_path / "run"))
    CORRUPTIONS["truncated"](run / "checkpoint.pt")
    assert main(["eval", str(run), "--tasks", "5"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("metagrad: warning: 1 newer checkpoint(s) unusable") and len(err.splitlines()) == 1


def test_other_run_files_survive_kills_mid_write(reference, tmp_path):
    """Leftover temporary files are removed; a torn metrics line and lines past the checkpoint are dropped;
    a run killed before its first checkpoint starts over on --resume; a corrupt data cache is rebuilt."""
    import shutil

    whole, half = reference
    run = Path(shutil.copytree(half, tmp_path / "run"))
    (run / ".checkpoint.pt.tmp-99999").write_bytes(b"half a checkpoint")
    (run / ".config.json.tmp-99999").write_text("{")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 10, "loss": 1.0}) + "\n" + '{"iteration": 12, "lo')
    train(tiny(iterations=12), run, resume=True, progress=False, plot=False)
    assert not list(run.glob(".*tmp*"))
    assert_same_run_params(whole, run)

    early = tmp_path / "early"  # killed after writing config.json and a metrics line, before any checkpoint
    early.mkdir()
    rundir.write_config(early, tiny(iterations=12))
    (early / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "loss": 9.0}) + "\n")
    with pytest.warns(ckpt.CheckpointWarning, match="no checkpoint yet"):
        train(tiny(iterations=12), early, resume=True, progress=False, plot=False)
    assert_same_run_params(whole, early)


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
    rundir.write_config(tmp_path, tiny())
    before = (tmp_path / "config.json").read_text()

    def die(*_a, **_k):
        raise KeyboardInterrupt  # a kill between writing the temporary file and the rename

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_config(tmp_path, tiny("train.seed=3"))
    assert (tmp_path / "config.json").read_text() == before


# ================================================================================================ NaNs
def test_exploding_meta_lr_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config", "sinusoid-10shot", "--out-dir", str(run), "--no-progress",
            *[a for s in ("train.iterations=50", "train.meta_batch_size=5", "train.checkpoint_every=1",
                          "train.log_every=1", "train.val_every=0", "train.meta_lr=1e30", "train.max_bad_steps=3",
                          "train.threads=1") for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("metagrad: warning: iteration") for line in err[:3])
    assert err[-1].startswith("metagrad: error: training stopped at iteration") and "3 meta-updates in a row" in err[-1]
    faults = [json.loads(line) for line in (run / "faults.jsonl").read_text().splitlines()]
    assert [f["in_a_row"] for f in faults] == [1, 2, 3] and all(f["action"] == "skipped" for f in faults)
    first = faults[0]
    assert first["task_ids"] and set(first["task_ids"]) <= set(range(5 * (first["batch"]), 5 * (first["batch"] + 1)))
    assert "loss" in first["tensors"]
    # The checkpoints kept: the last one before the stop; skipped steps changed nothing, so it holds the same
    # finite parameters as the one before the first bad step.
    state = ckpt.load_latest(run)
    assert state["iteration"] == faults[-1]["iteration"] - 1 and state["bad_in_row"] == 2
    good = ckpt.load(ckpt.numbered_path(run, faults[0]["iteration"] - 1))
    assert all(torch.equal(state["learner"][k], v) and torch.isfinite(v).all() for k, v in good["learner"].items())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1 and "loss" not in rows[-1]


class Poisoned(data.Benchmark):
    """The sinusoid with task 3 of batch 4 holding a NaN target: one bad task in one meta-batch."""

    name, task_type, x_shape, out_dim = "poisoned", "regression", (1,), 1

    def __init__(self, split, meta_batch_size, seed, shots=10, queries=10, **_):
        super().__init__(split, meta_batch_size, seed)
        self.inner = data.create("sinusoid", split, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
                                 seed=seed)

    def batch(self, index):
        b = self.inner.batch(index)
        if index == 4 and self.split == "train":
            qy = b.query_y.clone()
            qy[3, 0] = float("nan")
            b = TaskBatch(b.support_x, b.support_y, b.query_x, qy, b.task_ids)
        return b


def test_poisoned_task_is_skipped_and_named(tmp_path, monkeypatch):
    data.available()
    monkeypatch.setitem(data._REGISTRY, "poisoned", Poisoned)
    run = tmp_path / "run"
    with pytest.warns(NumericalWarning, match=r"iteration 5: non-finite loss, query_loss.* on tasks \[23\]"):
        train(tiny("benchmark.name=poisoned", iterations=8), run, progress=False, plot=False)
    (fault,) = [json.loads(line) for line in (run / "faults.jsonl").read_text().splitlines()]
    assert fault["task_ids"] == [23] and fault["batch"] == 4 and fault["tensors"][:2] == ["loss", "query_loss"]
    state = ckpt.load_latest(run)
    assert int(state["optimizer"]["state"][0]["step"]) == 7  # 8 iterations, one skipped: no update
    assert all(torch.isfinite(v).all() for v in state["learner"].values())
    rows = {r["iteration"]: r for r in metrics(run)}
    assert rows[6]["skipped_steps"] == 1 and "skipped_steps" not in rows[4] and "skipped_steps" not in rows[8]


def test_nan_gradient_names_the_parameter(tmp_path, monkeypatch):
    import metagrad.train as T

    real = T.make_learner

    def with_nan_grad(cfg, bench):
        learner = real(cfg, bench)
        bias = learner.model.layers[1].bias
        now = {"it": -1}
        set_iteration = learner.set_iteration

        def tracked(it):   # the training loop announces every meta-iteration (0-based) here
            now["it"] = it
            set_iteration(it)

        # NaN in every gradient of the third meta-update (one per task chunk of meta_backward).
        bias.register_hook(lambda g: g * float("nan") if now["it"] == 2 else g)
        learner.set_iteration = tracked
        return learner

    monkeypatch.setattr(T, "make_learner", with_nan_grad)
    with pytest.warns(NumericalWarning, match=r"iteration 3: non-finite grad:model.layers.1.bias on tasks \[10, "):
        train(tiny(iterations=6), tmp_path / "run", progress=False, plot=False)
    (fault,) = [json.loads(line) for line in (tmp_path / "run" / "faults.jsonl").read_text().splitlines()]
    assert fault["tensors"] == ["grad:model.layers.1.bias"] and fault["task_ids"] == list(range(10, 15))


# ================================================================================================ bad input
def _cifar_tree(root: Path, per_class: int = 4) -> None:
    for i, (fine, _) in enumerate(folders.SPECS["cifar_fs"].classes("train")):
        d = root / fine
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (32, 32), (i, 40 * j, 128)).save(d / f"{j}.png")


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images_x/Alpha/character01/0001_01.png", b"x" * 1000)


def _tampered_cora(tmp: Path) -> Path:
    import shutil

    shared = Path(os.environ.get("METAGRAD_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "planetoid"
    if not (shared / "Cora").is_dir():
        pytest.skip("the shared Planetoid copy is not here")
    root = Path(shutil.copytree(shared, tmp / "planetoid"))
    graph = root / "Cora/raw/ind.cora.graph"
    blob = bytearray(graph.read_bytes())
    blob[100] ^= 1
    graph.write_bytes(bytes(blob))
    return root


# case: (--set values, a data-root builder or None, a piece of the one-line message)
BAD_INPUT: dict[str, tuple[list[str], Callable[[Path], Path] | None, str]] = {
    "ways > classes": (["benchmark.name=cifar_fs", "benchmark.ways=65"],
                       lambda t: (_cifar_tree(t / "c"), t / "c")[1], "65-way episodes need 65 classes"),
    "shots + queries > images": (["benchmark.name=cifar_fs", "benchmark.shots=3", "benchmark.queries=2"],
                                 lambda t: (_cifar_tree(t / "c"), t / "c")[1], "shots + queries = 5"),
    "zero inner_lr": (["maml.inner_lr=0"], None, "maml.inner_lr: must be > 0 and finite, got 0.0"),
    "negative meta_lr": (["train.meta_lr=-1e-3"], None, "train.meta_lr: must be > 0 and finite"),
    "nan inner_lr": (["maml.inner_lr=nan"], None, "maml.inner_lr: must be > 0 and finite, got nan"),
    "zero grad_clip": (["train.grad_clip=0"], None, "train.grad_clip: must be > 0 and finite"),
    "zero max_bad_steps": (["train.max_bad_steps=0"], None, "train.max_bad_steps: must be >= 1"),
    "negative keep_checkpoints": (["train.keep_checkpoints=-1"], None, "train.keep_checkpoints: must be >= 0"),
    "unknown key": (["train.max_bad_step=3"], None, "unknown config key 'train.max_bad_step' (did you mean"),
    "missing data folder": (["benchmark.name=cifar_fs"], lambda t: t / "nowhere", "does not exist"),
    "wrong layout": (["benchmark.name=cifar_fs"],
                     lambda t: (Image.new("RGB", (32, 32)).save(t / "x.png"), t)[1], "classes have no images"),
    "corrupt image": (["benchmark.name=cifar_fs"],
                      lambda t: (_cifar_tree(t / "c"), (t / "c/apple/2.png").write_bytes(b"\x89PNG broken"),
                                 t / "c")[2], "cannot decode image"),
    "truncated archive": (["benchmark.name=omniglot"],
                          lambda t: ([(_zip(t / f"images_{s}.zip"),
                                       (t / f"images_{s}.zip").write_bytes((t / f"images_{s}.zip").read_bytes()[:300]))
                                      for s in ("background", "evaluation")], t)[1], "not a readable zip"),
    "wrong checksum": (["benchmark.name=cora", "benchmark.ways=2", "benchmark.shots=5"], _tampered_cora,
                       "sha256 mismatch"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.data) if c == "wrong checksum" else c
                                  for c in BAD_INPUT])
def test_bad_input_is_one_line_without_traceback(case, tmp_path, capsys):
    sets, make_root, message = BAD_INPUT[case]
    argv = ["train", "--config", "sinusoid-10shot", "--out-dir", str(tmp_path / "run"), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]
    if make_root is not None:
        argv += ["--data-root", str(make_root(tmp_path))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("metagrad: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
    with pytest.raises(ValueError, match=re.escape(message)):
        main(["--debug", *argv])  # --debug: the exception itself, with its traceback


def test_corrupt_data_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    _cifar_tree(tmp_path / "c")
    make = lambda: data.create("cifar_fs", "train", ways=5, shots=1, queries=1, meta_batch_size=2,
                               root=tmp_path / "c")
    first = make().batch(0)
    (cache,) = (tmp_path / "cache").rglob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        again = make().batch(0)
    assert torch.equal(first.support_x, again.support_x)


API_SHAPES = {  # (model, loss, batch builder, message)
    "labels >= ways": (lambda: Conv4(1, 5, 8, image_size=16), "cross_entropy",
                       lambda: (torch.randn(2, 5, 1, 16, 16), torch.arange(5).repeat(2, 1) + 1),
                       "support_y holds class ids 1..5 but the model has 5 outputs"),
    "negative labels": (lambda: Conv4(1, 5, 8, image_size=16), "cross_entropy",
                        lambda: (torch.randn(2, 5, 1, 16, 16), torch.arange(5).repeat(2, 1) - 1),
                        "class ids -1..3"),
    "float labels for cross-entropy": (lambda: Conv4(1, 5, 8, image_size=16), "cross_entropy",
                                       lambda: (torch.randn(2, 5, 1, 16, 16), torch.zeros(2, 5)),
                                       "cross-entropy needs int64 class ids"),
    "wrong channels": (lambda: Conv4(1, 5, 8, image_size=16), "cross_entropy",
                       lambda: (torch.randn(2, 5, 3, 16, 16), torch.arange(5).repeat(2, 1)),
                       "support_x of shape"),
    "wrong input width": (lambda: MLP(1, (8,), 1), "mse", lambda: (torch.randn(2, 5, 2), torch.randn(2, 5, 1)),
                          "does not fit MLP"),
    "regression targets without out dim": (lambda: MLP(1, (8,), 1), "mse",
                                           lambda: (torch.randn(2, 5, 1), torch.randn(2, 5)),
                                           "mse needs float targets of the same shape"),
}


@pytest.mark.parametrize("case", list(API_SHAPES))
def test_api_shape_mismatches_are_clear(case):
    make_model, loss, make_xy, message = API_SHAPES[case]
    learner = MAML(make_model(), inner_lr=0.1, loss=loss)
    x, y = make_xy()
    batch = TaskBatch(x, y, x.clone(), y.clone())
    for call in (lambda: learner.meta_loss(batch), lambda: learner.evaluate(batch),
                 lambda: learner.adapt(x[0], y[0])):
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value)


def test_taskbatch_rejects_inconsistent_tensors():
    with pytest.raises(ValueError, match="same task dimension"):
        TaskBatch(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        TaskBatch(torch.zeros(2, 5, 1), torch.zeros(2, 4, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1))
    with pytest.raises(DataError):
        data.create("cifar_fs", "train", root="/nonexistent/metagrad")


def test_checkpoint_checksum_is_stable_across_save_and_load(tmp_path):
    state = {"learner": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(0)}, "optimizer": {"state": {0: {
        "step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]}, "iteration": 3,
        "rng": ckpt.rng_state(), "config": {"a": None, "b": [1, 2]}, "wall": 1.5}
    ckpt.save(tmp_path, state, keep=2)
    loaded = ckpt.load(tmp_path / "checkpoint.pt")
    assert loaded["checksum"] == ckpt.checksum(state) == ckpt.checksum(loaded)
    buf = io.BytesIO()
    torch.save({**loaded, "iteration": 4}, buf)  # a changed plain value fails the checksum too
    (tmp_path / "checkpoint.pt").write_bytes(buf.getvalue())
    with pytest.raises(ckpt.CheckpointError, match="do not match its sha256"):
        ckpt.load(tmp_path / "checkpoint.pt")
