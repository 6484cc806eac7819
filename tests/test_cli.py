"""The command line: a smoke run end to end, eval and list, and one-line errors that leave files untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metagrad.cli import main

TINY = ["--set", "train.iterations=20", "--set", "train.meta_batch_size=5", "--set", "train.log_every=5",
        "--set", "train.val_every=10", "--set", "train.val_tasks=10", "--set", "eval.tasks=40", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One smoke run shared by the tests that only read it (tests that write copy it first)."""
    out = tmp_path_factory.mktemp("cli") / "sin10"
    assert main(["train", "--config", "sinusoid-10shot", *TINY, "--out-dir", str(out)]) == 0
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_smoke_writes_every_run_file(run_dir, capsys):
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "eval.json",
                                                   "curves.png"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["name"] == "sinusoid-10shot" and config["train"]["iterations"] == 20
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [5, 10, 15, 20]
    records = json.loads((run_dir / "eval.json").read_text())
    assert [(r["split"], r["metric"], r["inner_steps"], r["tasks"]) for r in records] == [
        ("test", "mse", 0, 40), ("test", "mse", 1, 40), ("test", "mse", 10, 40)]
    assert all({"mean", "ci95"} <= r.keys() for r in records)


def test_train_prints_the_table_into_a_default_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "harmonic-5shot", *TINY, "--set", "train.iterations=2"]) == 0
    out = capsys.readouterr().out
    assert "mean ± 95% CI" in out and "harmonic" in out and len(out.splitlines()) == 6
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("harmonic-5shot-") and (run / "eval.json").is_file()


def test_eval_appends_records_and_cross_domain(run_dir, tmp_path, capsys):
    run = copy_of(run_dir, tmp_path)
    assert main(["eval", str(run), "--tasks", "15", "--split", "val"]) == 0
    assert main(["eval", str(run), "--tasks", "15", "--benchmark", "harmonic"]) == 0
    out = capsys.readouterr().out
    assert "harmonic" in out and "val" in out
    records = json.loads((run / "eval.json").read_text())
    assert len(records) == 9
    assert [(r["benchmark"], r["split"], r["tasks"]) for r in records[3:]] == \
        [("sinusoid", "val", 15)] * 3 + [("harmonic", "test", 15)] * 3


def test_eval_at_chosen_step_counts(run_dir, tmp_path, capsys):
    run = copy_of(run_dir, tmp_path)
    assert main(["eval", str(run), "--tasks", "15"]) == 0                  # the run's own counts: 0, 1, 10
    assert main(["eval", str(run), "--tasks", "15", "--steps", "10", "2"]) == 0
    records = json.loads((run / "eval.json").read_text())
    default, chosen = records[-5:-2], records[-2:]
    assert [r["inner_steps"] for r in default] == [0, 1, 10] and [r["inner_steps"] for r in chosen] == [10, 2]
    # The same tasks and the same learner: the 10-step score is the default evaluation's, to the bit.
    assert chosen[0]["mean"] == default[2]["mean"] and chosen[0]["ci95"] == default[2]["ci95"]
    assert chosen[1]["mean"] not in (default[1]["mean"], default[2]["mean"])
    capsys.readouterr()
    assert main(["eval", str(run), "--steps", "-1"]) == 2
    assert "--steps must be >= 0" in capsys.readouterr().err


def test_resume_continues_with_more_iterations(run_dir, tmp_path, capsys):
    run = copy_of(run_dir, tmp_path)
    assert main(["train", "--resume", "--out-dir", str(run), "--set", "train.iterations=25", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20, 25]
    assert json.loads((run / "config.json").read_text())["train"]["iterations"] == 25


def test_list(capsys):
    assert main(["list", "presets"]) == 0
    assert "sinusoid-10shot" in capsys.readouterr().out.split()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "benchmarks: " in out and "sinusoid" in out and "methods: " in out


def test_python_dash_m_works():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "metagrad", "train", "--config", "nope"], check=False,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("metagrad: error: unknown preset 'nope'")
    assert len(proc.stderr.splitlines()) == 1


BAD = {  # argv (RUN: a copy of the smoke run, NEW: a fresh path), a piece of the expected message
    "unknown preset": (["train", "--config", "sinusoid-10shots", "--out-dir", "NEW"], "unknown preset 'sinusoid-10shots'"),
    "unknown key": (["train", "--config", "sinusoid-10shot", "--set", "train.iteratons=3", "--out-dir", "NEW"],
                    "did you mean: train.iterations"),
    "wrong type": (["train", "--config", "sinusoid-10shot", "--set", "maml.inner_lr=fast", "--out-dir", "NEW"],
                   "expected float"),
    "no equals": (["train", "--config", "sinusoid-10shot", "--set", "train.seed", "--out-dir", "NEW"],
                  "expects key=value"),
    "unknown plug-in": (["train", "--config", "sinusoid-10shot", "--set", "plugins=nope", "--out-dir", "NEW"],
                        "unknown plug-in 'nope'"),
    "bad plug-in arg": (["train", "--config", "sinusoid-10shot", "--set", "plugin_args.cml.weight=1", "--out-dir",
                         "NEW"], "'cml' is not in plugins"),
    "missing data": (["train", "--config", "sinusoid-10shot", "--set", "benchmark.name=cora", "--data-root", "NEW",
                      "--out-dir", "NEW"], "root"),  # the data layer's own wording, naming the root
    "run exists": (["train", "--config", "sinusoid-10shot", "--out-dir", "RUN"], "already holds a run"),
    "resume other config": (["train", "--config", "sinusoid-5shot", "--resume", "--out-dir", "RUN"],
                            "different config"),
    "resume without dir": (["train", "--config", "sinusoid-10shot", "--resume"], "--resume needs --out-dir"),
    "resume missing run": (["train", "--resume", "--out-dir", "NEW"], "cannot resume"),
    "eval missing run": (["eval", "NEW"], "does not exist"),
    "eval bad tasks": (["eval", "RUN", "--tasks", "0"], "--tasks must be >= 1"),
    "eval bad split": (["eval", "RUN", "--split", "dev"], "invalid choice"),
    "eval unknown benchmark": (["eval", "RUN", "--benchmark", "sinusoidd"], "unknown benchmark 'sinusoidd'"),
    "bad subcommand": (["fly"], "invalid choice"),
    "no config": (["train", "--out-dir", "NEW"], "train needs --config"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_touches_nothing(case, run_dir, tmp_path, capsys):
    run = copy_of(run_dir, tmp_path)
    argv, message = BAD[case]
    argv = [{"RUN": str(run), "NEW": str(tmp_path / "new")}.get(a, a) for a in argv]
    before = snapshot(tmp_path)
    code = main([*argv, "--no-progress"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("metagrad: error: ") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_cross_domain_needs_the_same_input_shape(run_dir, tmp_path, capsys, monkeypatch):
    from metagrad import data

    class Images(data.Benchmark):
        name, task_type, x_shape, out_dim = "images", "classification", (1, 28, 28), 5

        def __init__(self, split, meta_batch_size, seed, **_):
            super().__init__(split, meta_batch_size, seed)

    data.available()  # load the real registry first, then add the fake one for this test only
    monkeypatch.setitem(data._REGISTRY, "images", Images)
    run = copy_of(run_dir, tmp_path)
    before = snapshot(run)
    assert main(["eval", str(run), "--benchmark", "images"]) == 2
    err = capsys.readouterr().err
    assert "trained on sinusoid on images" in err and "x_shape [1] vs [1, 28, 28]" in err
    assert len(err.splitlines()) == 1 and snapshot(run) == before


def test_corrupt_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    run = copy_of(run_dir, tmp_path)
    for p in run.glob("checkpoint*.pt"):  # checkpoint.pt and its kept copies: none left to fall back on
        p.write_bytes(b"not a checkpoint")
    before = snapshot(run)
    for argv in (["train", "--resume", "--out-dir", str(run), "--no-progress"], ["eval", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("metagrad: error: checkpoint") and "corrupt" in err and len(err.splitlines()) == 1
    assert snapshot(run) == before


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="unknown preset"):
        main(["--debug", "train", "--config", "nope"])


def test_eval_with_other_ways_replicates_the_mean_head_row():
    import torch

    from metagrad.evaluation import RunError, transfer_head

    trained = {"model.head.weight": torch.arange(10.0).view(5, 2), "model.head.bias": torch.arange(5.0),
               "model.conv.weight": torch.ones(3, 3)}
    target = {"model.head.weight": torch.zeros(20, 2), "model.head.bias": torch.zeros(20),
              "model.conv.weight": torch.zeros(3, 3)}
    out = transfer_head(trained, target, 5, 20)
    assert torch.equal(out["model.head.weight"], torch.tensor([4.0, 5.0]).expand(20, 2))
    assert torch.equal(out["model.head.bias"], torch.full((20,), 2.0))
    assert out["model.conv.weight"] is trained["model.conv.weight"]
    with pytest.raises(RunError, match="only tensors indexed by class"):
        transfer_head(trained, {**target, "model.conv.weight": torch.zeros(3, 4)}, 5, 20)


def test_eval_on_a_benchmark_with_fixed_other_ways(tmp_path, capsys, monkeypatch):
    """A 5-way classifier evaluated on 20-way episodes (as on Lake's runs): by default each task's head starts from
    its support prototypes; ``--head mean`` gives a 20-row head, each row the mean of the trained ones."""
    import torch

    from metagrad import data
    from metagrad.tasks import TaskBatch

    class Twenty(data.Benchmark):
        name, task_type, x_shape, out_dim = "twenty", "classification", (1, 16, 16), 20
        fixed_ways, num_tasks = 20, 3

        def __init__(self, split, meta_batch_size, seed, ways, **_):
            assert ways == 20
            super().__init__(split, 3, seed)

        def batch(self, index):
            g = torch.Generator().manual_seed(index)
            protos = torch.randn(3, 20, 1, 1, 16, 16, generator=g)
            y = torch.arange(20).expand(3, -1).clone()
            return TaskBatch(protos[:, :, 0], y, (protos + 0.1 * torch.randn(protos.shape, generator=g))[:, :, 0], y)

    class Five(Twenty):
        name, out_dim, fixed_ways = "five", 5, None

        def __init__(self, split, meta_batch_size, seed, ways, **_):
            data.Benchmark.__init__(self, split, meta_batch_size, seed)

        def batch(self, index):
            g = torch.Generator().manual_seed(1000 + index)
            x = torch.randn(self.meta_batch_size, 5, 1, 16, 16, generator=g)
            y = torch.arange(5).expand(self.meta_batch_size, -1).clone()
            return TaskBatch(x, y, x + 0.1 * torch.randn(x.shape, generator=g), y)

    data.available()
    monkeypatch.setitem(data._REGISTRY, "twenty", Twenty)
    monkeypatch.setitem(data._REGISTRY, "five", Five)
    toml = ('[benchmark]\nname = "five"\nways = 5\nshots = 1\nqueries = 1\n[model]\nname = "conv4"\nwidth = 8\n'
            '[maml]\ninner_lr = 0.4\n[eval]\ninner_steps = [0, 1, 5]\n')
    (tmp_path / "five.toml").write_text(toml)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "five.toml"), *TINY, "--set", "train.iterations=2",
                 "--set", "eval.tasks=4", "--set", "train.val_every=0", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--benchmark", "twenty", "--head", "mean"]) == 0
    records = [r for r in json.loads((run / "eval.json").read_text()) if r["benchmark"] == "twenty"]
    assert records and all(r["tasks"] == 3 and r["ways"] == 20 and r["trained_ways"] == 5 for r in records)
    assert {r["head"] for r in records} == {"mean"}
    by_steps = {r["inner_steps"]: r["mean"] for r in records}
    assert by_steps[0] == pytest.approx(1 / 20)     # identical rows: every class ties, argmax picks class 0
    assert max(v for k, v in by_steps.items() if k > 0) > 0.15  # adaptation separates the classes (3× chance)
    assert main(["eval", str(run), "--benchmark", "twenty"]) == 0
    records = [r for r in json.loads((run / "eval.json").read_text()) if r["benchmark"] == "twenty"][3:]
    assert [(r["head"], r["ways"]) for r in records] == [("prototype", 20)] * 3
    # A query is its class's support example plus noise: the nearest prototype finds nearly every one at 0 steps.
    assert {r["inner_steps"]: r["mean"] for r in records}[0] > 0.9
    assert len(json.loads((run / "scores.json").read_text())) == 3 + 3 + 3   # the head is part of the scores' key
    assert main(["eval", str(run), "--benchmark", "twenty", "--tasks", "4"]) == 2
    assert "twenty has 3 tasks" in capsys.readouterr().err
