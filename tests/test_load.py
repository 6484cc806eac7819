"""metagrad.load: a trained run directory back as a learner, its config and its benchmark."""

from __future__ import annotations

import pytest
import torch

import metagrad
from metagrad import checkpoint as ckpt
from metagrad import cli
from metagrad import config as C
from metagrad.build import RunError
from metagrad.rundir import read_scores

SETS = ["model.name=tests.test_heads:net", "benchmark.name=tests.test_heads:Blobs", "benchmark.ways=5",
        "benchmark.shots=2", "benchmark.queries=3", "train.iterations=3", "train.meta_batch_size=4",
        "train.val_every=0", "eval.tasks=8", "eval.queries=4", "maml.inner_lr=0.5", "maml.eval_inner_steps=2",
        "plugins=meta_gna", "train.threads=1", "eval.inner_steps=[2]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("load") / "run"
    assert cli.main(["train", "--config", "sinusoid-10shot", "--no-progress", "--out-dir", str(run), "--set",
                     *SETS]) == 0
    return run


def test_load_gives_the_trained_learner_with_its_plug_ins(run_dir):
    run = metagrad.load(run_dir)
    state = ckpt.load_latest(run_dir)
    assert run.iteration == 3 and run.config == C.load(run_dir / "config.json") and not run.learner.training
    assert [p.name for p in run.learner.plugins] == ["meta_gna"]
    mine = run.learner.state_dict()
    assert mine.keys() == state["learner"].keys() and all(torch.equal(mine[k], v) for k, v in state["learner"].items())


def test_a_loaded_run_scores_the_evaluation_tasks_as_training_did(run_dir):
    """The first evaluation batch of ``run.benchmark("test")``, scored by ``run.learner``, gives the per-task
    scores the run recorded for those tasks."""
    run = metagrad.load(run_dir)
    bench = run.benchmark("test")
    assert bench.queries == 4 and bench.meta_batch_size == 4          # eval.queries; eval's batch
    got = run.learner.evaluate(bench.batch(0), inner_steps=2).task_accuracies
    (recorded,) = [v for k, v in read_scores(run_dir).items() if "/steps2/" in k]
    assert torch.allclose(got.double(), torch.tensor(recorded[:4], dtype=torch.float64), atol=1e-6)
    x = bench.batch(0)
    fast = run.learner.adapt(x.support_x[0], x.support_y[0])
    assert run.learner.predict(fast, x.query_x[0]).shape == (20, 5)


def test_a_loaded_run_evaluates_at_other_ways(run_dir):
    run = metagrad.load(run_dir)
    three = run.benchmark("test", ways=3, shots=1, seed=7)
    assert (three.ways, three.shots, three.seed) == (3, 1, 7) and run.config.benchmark.ways == 5   # a copy
    learner = run.learner_for(three)
    assert learner.head == "prototype" and learner.state_dict()["model.head.weight"].shape == (3, 16)
    assert learner.evaluate(three.batch(0), inner_steps=1).task_accuracies.shape == (4,)
    with pytest.raises(C.ConfigError, match="eval.head=trained"):
        run.learner_for(three, head="trained")


def test_load_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        metagrad.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="checkpoint"):
        metagrad.load(tmp_path)
