"""Training runs: bit-for-bit resume after a kill, run-directory safety, evaluation records, a learning check."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad.evaluation import evaluate_run, make_learner, mean_ci95, read_records, record_scores
from metagrad.train import Meter, RunError, flatten_diagnostics, train

TIMING = ("tasks_per_s", "wall_s")


def tiny(*extra: str, iterations: int = 20) -> C.Config:
    return C.resolve("sinusoid-10shot", [f"train.iterations={iterations}", "train.log_every=2", "train.val_every=4",
                                         "train.val_tasks=10", "train.checkpoint_every=5", "eval.tasks=30",
                                         "train.meta_batch_size=5", *extra])


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_for_bit(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(tiny(), whole, progress=False, plot=False)

    def kill(iteration, record):  # dies after logging iteration 14: past the checkpoint at 10
        if iteration == 14:
            raise Killed

    with pytest.raises(Killed):
        train(tiny(), broken, progress=False, callback=kill, plot=False)
    assert ckpt.load_latest(broken)["iteration"] == 10
    assert [r["iteration"] for r in metrics(broken)] == [2, 4, 6, 8, 10, 12, 14]
    result = train(tiny(), broken, resume=True, progress=False, plot=False)
    assert result.iteration == 20

    a, b = ckpt.load_latest(whole), ckpt.load_latest(broken)
    assert a["learner"].keys() == b["learner"].keys()
    for name in a["learner"]:
        assert torch.equal(a["learner"][name], b["learner"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert metrics(whole) == metrics(broken)  # the lines logged after the checkpoint were dropped, not doubled
    ra, rb = read_records(whole), read_records(broken)
    assert [(r["inner_steps"], r["mean"], r["ci95"]) for r in ra] == [(r["inner_steps"], r["mean"], r["ci95"])
                                                                      for r in rb]


def test_run_files_and_records(tmp_path):
    run = tmp_path / "run"
    result = train(tiny(iterations=6), run, progress=False)
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt", "eval.json",
                                               "scores.json", "curves.png", "checkpoint-00000005.pt",
                                               "checkpoint-00000006.pt"}
    assert result.plot == run / "curves.png" and result.plot.read_bytes()[:4] == b"\x89PNG"
    assert C.load(run / "config.json") == tiny(iterations=6)
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [2, 4, 6]
    assert {"loss", "query_loss", "grad_norm", "support_loss", "inner_grad_norm/layers.0.weight"} <= rows[0].keys()
    assert "val_mse" in rows[1] and "val_mse" not in rows[0]
    state = ckpt.load_latest(run)
    assert {"learner", "optimizer", "iteration", "rng", "config"} <= state.keys() and state["iteration"] == 6
    assert [(r["split"], r["metric"], r["inner_steps"], r["tasks"]) for r in result.records] == [
        ("test", "mse", 0, 30), ("test", "mse", 1, 30), ("test", "mse", 10, 30)]
    # eval.json keeps each record with the key of its per-task scores, which scores.json holds.
    stored = read_records(run)
    assert [{k: v for k, v in r.items() if k != "scores_key"} for r in stored] == \
        [{k: v for k, v in r.items() if k != "scores"} for r in result.records]
    assert [record_scores(run, r) for r in stored] == [r["scores"] for r in result.records]

    # Resuming a finished run with more iterations continues it; the old records stay.
    longer = train(tiny(iterations=8), run, resume=True, progress=False, plot=False)
    assert longer.iteration == 8 and [r["iteration"] for r in metrics(run)][-1] == 8
    assert len(read_records(run)) == 6
    again = train(tiny(iterations=8), run, resume=True, progress=False, plot=False)
    assert again.records == [] and len(read_records(run)) == 6  # nothing new to evaluate


def snapshot(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_existing_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    train(tiny(iterations=2), run, progress=False, plot=False)
    before = snapshot(run)
    with pytest.raises(RunError, match="already holds a run.*--resume"):
        train(tiny(iterations=2), run, progress=False, plot=False)
    with pytest.raises(RunError, match=r"different config \(maml.inner_lr differ\)"):
        train(tiny("maml.inner_lr=0.5", iterations=4), run, resume=True, progress=False, plot=False)
    assert snapshot(run) == before


def test_corrupt_or_missing_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tiny(iterations=2), run, progress=False, plot=False)
    for p in ckpt.candidates(run):  # checkpoint.pt and its kept copy (checkpoint-00000002.pt)
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    before = snapshot(run)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated") as err:
        train(tiny(iterations=4), run, resume=True, progress=False, plot=False)
    assert "\n" not in str(err.value)
    assert snapshot(run) == before
    for p in ckpt.candidates(run):
        p.unlink()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        train(tiny(iterations=4), run, resume=True, progress=False, plot=False)
    with pytest.raises(RunError, match="does not exist"):
        train(tiny(), tmp_path / "nowhere", resume=True, progress=False, plot=False)


def test_checkpoint_write_is_atomic_and_complete(tmp_path):
    ckpt.save(tmp_path, {"learner": {}, "optimizer": {}, "iteration": 1, "rng": ckpt.rng_state(), "config": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    torch.save({"learner": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_latest(tmp_path)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_evaluate_run_cross_domain(tmp_path):
    run = tmp_path / "run"
    train(tiny(iterations=2), run, progress=False, plot=False)
    records = evaluate_run(run, split="val", tasks=12, benchmark="harmonic")  # same input shape (1,)
    assert [(r["benchmark"], r["split"], r["tasks"]) for r in records] == [("harmonic", "val", 12)] * 3
    assert len(read_records(run)) == 6


def test_meter_and_diagnostics():
    flat = flatten_diagnostics({"a": torch.tensor(1.0), "b": {"w": torch.tensor(2.0)}, "c": "text"})
    assert flat.keys() == {"a", "b/w"}
    m = Meter()
    m.add({"loss": torch.tensor(1.0), "steps": torch.arange(3.0), "acc": None, "big": torch.zeros(100)})
    m.add({"loss": torch.tensor(2.0), "steps": torch.arange(3.0) + 1})
    assert m.summary() == {"loss": 1.5, "steps": [1.0, 2.0, 3.0]}


def test_mean_ci95_matches_numpy():
    v = torch.randn(600, generator=torch.Generator().manual_seed(0))
    mean, ci = mean_ci95(v)
    assert math.isclose(mean, v.double().mean().item())
    assert math.isclose(ci, 1.96 * np.std(v.numpy().astype(np.float64)) / math.sqrt(600), rel_tol=1e-9)


def test_plugins_are_built_by_key_with_their_args():
    from metagrad import data, methods

    if "cml" not in methods.available():
        pytest.skip("the cml plug-in is not registered")
    cfg = C.resolve("sinusoid-10shot", ["plugins=cml", "plugin_args.cml.weight=0.5"])
    learner = make_learner(cfg, data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=2))
    assert [p.name for p in learner.plugins] == ["cml"] and learner.plugins[0].weight == 0.5
    cfg = C.resolve("sinusoid-10shot", ["plugins=cml", "plugin_args.cml.wieght=0.5"])
    with pytest.raises(C.ConfigError, match="plugin_args.cml: .*wieght"):
        make_learner(cfg, data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=2))


def test_sinusoid_learns(tmp_path):
    """1000 meta-updates (batch 25, 10-shot): MSE after 10 steps falls far below the unadapted MSE.

    Measured on this protocol (200 test tasks): MSE ≈ 2.96 before adaptation, 1.39 after 1 step and 0.61 after
    10 steps (≈ 10 s on 2 cores); an untrained MLP sits near 3. Thresholds leave room for seeds and platforms.
    """
    cfg = C.resolve("sinusoid-10shot", ["train.iterations=1000", "train.val_every=0", "eval.tasks=200",
                                        "train.checkpoint_every=0"])
    result = train(cfg, tmp_path / "run", progress=False, plot=False)
    mse = {r["inner_steps"]: r["mean"] for r in result.records}
    assert mse[10] < 1.0, mse
    assert mse[10] < 0.4 * mse[0], mse
    assert mse[10] < mse[1] < mse[0], mse


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path):
    """Real kills (SIGKILL mid-run, twice) through the command line, then resume: same parameters, same metrics."""
    sets = ["train.iterations=3000", "train.checkpoint_every=100", "train.log_every=50", "train.val_every=500",
            "train.val_tasks=50", "eval.tasks=50"]
    train(C.resolve("sinusoid-10shot", sets), tmp_path / "whole", progress=False, plot=False)
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "metagrad", "train", "--config", "sinusoid-10shot", "--out-dir", str(run),
            "--no-progress", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}

    def last_logged() -> int:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        return json.loads(lines[-1])["iteration"] if lines else 0

    for kill_at, extra in ((1070, []), (2230, ["--resume"])):
        proc = subprocess.Popen(argv + extra, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while last_logged() < kill_at and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert ckpt.load_latest(run)["iteration"] < 3000
    assert subprocess.run(argv + ["--resume"], env=env, capture_output=True, check=False).returncode == 0
    a, b = ckpt.load_latest(tmp_path / "whole"), ckpt.load_latest(run)
    assert all(torch.equal(a["learner"][k], b["learner"][k]) for k in a["learner"])
    assert metrics(tmp_path / "whole") == metrics(run)


def test_time_budget_stops_checkpoints_evaluates_and_resumes(tmp_path):
    run = tmp_path / "run"
    # A zero budget is spent after the first meta-update: it is checkpointed, logged and evaluated.
    result = train(tiny("train.time_budget_min=1e-9"), run, progress=False, plot=False)
    assert result.iteration == 1 and ckpt.load_latest(run)["iteration"] == 1
    assert [r["iteration"] for r in metrics(run)] == [1]
    assert {r["iteration"] for r in read_records(run)} == {1}
    # Resumed with a budget already spent: nothing more is trained.
    assert train(tiny("train.time_budget_min=1e-9"), run, resume=True, progress=False, plot=False).iteration == 1
    # Lifting the budget continues to train.iterations, the same trajectory as a run without one.
    whole = tmp_path / "whole"
    train(tiny(), whole, progress=False, plot=False)
    assert train(tiny(), run, resume=True, progress=False, plot=False).iteration == 20
    a, b = ckpt.load_latest(whole)["learner"], ckpt.load_latest(run)["learner"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_must_be_positive():
    with pytest.raises(C.ConfigError, match="time_budget_min"):
        tiny("train.time_budget_min=0")


def test_cosine_meta_lr_schedule():
    from metagrad.train import meta_lr

    t = C.resolve("sinusoid-10shot", ["train.iterations=100", "train.meta_lr=1e-3", "train.meta_lr_min=1e-5",
                                      "train.meta_lr_schedule=cosine"]).train
    assert meta_lr(t, 0) == 1e-3
    assert math.isclose(meta_lr(t, 50), (1e-3 + 1e-5) / 2, rel_tol=1e-12)
    assert math.isclose(meta_lr(t, 100), 1e-5, rel_tol=1e-12)
    assert all(meta_lr(t, i + 1) < meta_lr(t, i) for i in range(100))
    constant = C.resolve("sinusoid-10shot", ["train.meta_lr=2e-3"]).train
    assert {meta_lr(constant, i) for i in (0, 7, 14_999)} == {2e-3}
    with pytest.raises(C.ConfigError, match="meta_lr_schedule"):
        C.resolve("sinusoid-10shot", ["train.meta_lr_schedule=linear"])


def test_step_meta_lr_schedule():
    from metagrad.train import meta_lr

    t = C.resolve("sinusoid-10shot", ["train.iterations=100", "train.meta_lr=1e-3", "train.meta_lr_min=1e-4",
                                      "train.meta_lr_schedule=step", "train.meta_lr_step_at=0.75"]).train
    assert [meta_lr(t, i) for i in (0, 74, 75, 99)] == [1e-3, 1e-3, 1e-4, 1e-4]
    for bad in ("-0.1", "1.5"):
        with pytest.raises(C.ConfigError, match="meta_lr_step_at"):
            C.resolve("sinusoid-10shot", [f"train.meta_lr_step_at={bad}"])


def test_halving_meta_lr_schedule_does_not_depend_on_the_budget():
    from metagrad.train import meta_lr

    sets = ["train.meta_lr=1e-3", "train.meta_lr_schedule=halving", "train.meta_lr_halve_every=2000"]
    short, long = (C.resolve("sinusoid-10shot", [f"train.iterations={n}", *sets]).train for n in (4000, 20000))
    assert [meta_lr(short, i) for i in (0, 1999, 2000, 3999)] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert all(meta_lr(short, i) == meta_lr(long, i) for i in range(0, 4000, 250))
    assert meta_lr(long, 19_999) == 1e-3 / 2 ** 9
    with pytest.raises(C.ConfigError, match="meta_lr_halve_every"):
        C.resolve("sinusoid-10shot", ["train.meta_lr_halve_every=0"])


def test_cosine_schedule_is_applied_logged_and_resumes_bit_for_bit(tmp_path):
    cfg = tiny("train.meta_lr_schedule=cosine", "train.meta_lr=1e-2", "train.meta_lr_min=1e-4")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(cfg, whole, progress=False, plot=False)
    rows = metrics(whole)
    lrs = [r["meta_lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-2 and lrs[-1] > 1e-4
    # The logged value is the window's mean of the step sizes of iterations 0 and 1 (logged as float32 scalars).
    from metagrad.train import meta_lr
    assert math.isclose(rows[0]["meta_lr"], (meta_lr(cfg.train, 0) + meta_lr(cfg.train, 1)) / 2, rel_tol=1e-6)
    assert ckpt.load_latest(whole)["optimizer"]["param_groups"][0]["lr"] == meta_lr(cfg.train, 19)

    def kill(iteration, record):
        if iteration == 14:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, broken, progress=False, callback=kill, plot=False)
    train(cfg, broken, resume=True, progress=False, plot=False)
    a, b = ckpt.load_latest(whole), ckpt.load_latest(broken)
    for name in a["learner"]:
        assert torch.equal(a["learner"][name], b["learner"][name]), name
    # A constant schedule gives different parameters: the schedule acted.
    plain = tmp_path / "plain"
    train(tiny("train.meta_lr=1e-2"), plain, progress=False, plot=False)
    p = ckpt.load_latest(plain)["learner"]
    assert any(not torch.equal(p[name], a["learner"][name]) for name in a["learner"])


def test_the_training_loop_tells_the_maml_pp_schedules_the_iteration(tmp_path, monkeypatch):
    """train.py, not the learner's loop, knows the meta-iteration: it reports each one before its meta_loss."""
    from metagrad.maml import MAML
    seen, real = [], MAML.set_iteration
    monkeypatch.setattr(MAML, "set_iteration", lambda self, it: (seen.append(it), real(self, it))[1])
    cfg = tiny("maml.inner_steps=2", "maml.multi_step_loss=true", "maml.msl_iterations=2",
               "maml.first_order_iterations=1", iterations=3)
    result = train(cfg, tmp_path / "run", progress=False, plot=False)
    assert seen == [0, 1, 2] and result.iteration == 3
