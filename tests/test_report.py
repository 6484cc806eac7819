"""Studies and reports: a tiny study runs, resumes and skips done cells; the report has the right rows and
valid PNGs; the pooled statistics and the significance rule."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from metagrad import config as C
from metagrad.cli import main
from metagrad.report import Row, Run, _signature, comparisons, group, markdown_table, tables, verdict
from metagrad.study import Study, load_study, method_label, method_plugins, run_study

TINY = ["train.log_every=5", "train.val_every=10", "train.val_tasks=5", "train.checkpoint_every=5",
        "eval.tasks=10", "eval.meta_batch_size=5", "train.meta_batch_size=4"]


def tiny_study() -> Study:
    return Study(name="tiny", presets=["sinusoid-5shot"], methods=["maml", "meta_gna", "cxgrad"], seeds=2,
                 set=TINY)


def test_study_runs_resumes_skips_and_reports(tmp_path):
    out = tmp_path / "study"
    # A short first pass (10 iterations), then the real budget: every cell resumes from its checkpoint.
    first = run_study(tiny_study(), out, overrides=["train.iterations=10"], report=False, progress=False)
    assert sorted(c["status"] for c in first.cells) == ["n/a"] * 2 + ["trained"] * 4
    second = run_study(tiny_study(), out, overrides=["train.iterations=20"], progress=False)
    assert sorted(c["status"] for c in second.cells) == ["n/a"] * 2 + ["resumed"] * 4
    third = run_study(tiny_study(), out, overrides=["train.iterations=20"], report=False, progress=False)
    assert sorted(c["status"] for c in third.cells) == ["n/a"] * 2 + ["skipped (done)"] * 4
    na = [c for c in third.cells if c["status"] == "n/a"]
    assert all(c["method"] == "cxgrad" and "Conv2d" in c["reason"] for c in na)

    run = out / "sinusoid-5shot" / "meta_gna" / "seed1"
    cfg = C.load(run / "config.json")
    assert (cfg.plugins, cfg.train.seed, cfg.train.iterations) == (["meta_gna"], 1, 20)
    assert {"eval.json", "diagnostics.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [5, 10, 15, 20]
    assert {"query_loss_q10", "query_loss_q90", "meta_gna.factor.step0/layers.0.weight"} <= metrics[-1].keys()
    # Every record keeps its per-task scores, and every method and seed is scored on the same test tasks.
    from metagrad.evaluation import read_records, record_scores

    finals = {}
    for cell in sorted((out / "sinusoid-5shot").glob("*/seed*")):
        for r in read_records(cell):
            values = record_scores(cell, r)
            assert len(values) == r["tasks"] == 10 and np.mean(values) == pytest.approx(r["mean"], rel=1e-6)
            finals.setdefault(r["inner_steps"], set()).add(r["task_set"])
    assert len(finals) == 3 and all(len(sets) == 1 for sets in finals.values())   # steps 0, 1, 5; one task set

    report = second.report
    assert report is not None and report == out / "report" / "report.md"
    text = report.read_text()
    table = text.split("## Test results")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| sinusoid-5shot")]
    assert [r.split(" | ")[1] for r in rows] == ["maml", "meta_gna", "cxgrad"]
    assert "(reference)" in rows[0] and "N/A" in rows[2]
    assert " | 10 | 2 | 20 | " in rows[1]  # tasks, seeds, iterations
    assert "train.iterations=20" in text and str(run) in text
    pngs = sorted((out / "report").glob("*.png"))
    assert {p.name.split("-", 2)[-1] for p in pngs} >= {"curves.png", "fits.png", "sample-losses.png",
                                                         "grad-norms.png", "meta-gna.png"}
    for p in pngs:
        assert f"]({p.name})" in text
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300
    assert "<table>" in (out / "report" / "report.html").read_text()

    # The command line: report on the study folder into another folder.
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-compute"]) == 0
    assert (tmp_path / "rep" / "report.md").read_text().count("| sinusoid-5shot |") >= 3


def fake_row(method, per_seed_scores, metric="accuracy", task_set="abc", seeds=None, preset="p", folds=None,
             fold=None):
    """A report row of finished runs whose final records hold the given per-task scores ``[seeds][tasks]``
    (with ``folds``: one run per (fold, seed), the scores of seed k fold f at ``per_seed_scores[f][k]``)."""
    if folds is not None:
        return Row(preset, method, [run for f in range(folds) for run in fake_row(
            method, per_seed_scores[f], metric, f"{task_set}{f}", seeds, preset, fold=f).runs])
    return _fake_row(method, per_seed_scores, metric, task_set, seeds, preset, fold)


def _fake_row(method, per_seed_scores, metric, task_set, seeds, preset, fold=None):
    runs = []
    for k, values in zip(seeds or range(len(per_seed_scores)), per_seed_scores):
        cfg = C.Config(name=preset, plugins=method_plugins(method))
        cfg.train.seed = k
        if fold is not None:
            cfg.benchmark.kwargs["fold"] = fold
        key = f"b/test/steps1/seed{k}"
        rec = {"benchmark": "b", "split": "test", "metric": metric, "inner_steps": 1, "tasks": len(values),
               "mean": float(np.mean(values)), "ci95": 0.0, "task_set": task_set, "scores_key": key}
        runs.append(Run(Path(f"/runs/{method}/{fold}/seed{k}"), cfg, [rec], [], None, 10,
                        {key: list(map(float, values))}))
    return Row(preset, method, runs)


def test_row_statistics_take_the_seed_as_the_unit():
    rng = np.random.default_rng(0)
    scores = 0.9 + 0.05 * rng.standard_normal((3, 50))
    s = fake_row("maml", scores).stats()[("b", 1)]
    means = scores.mean(axis=1)
    half = sps.t.ppf(0.975, 2) * means.std(ddof=1) / math.sqrt(3)
    assert s.mean == pytest.approx(means.mean()) and s.ci95 == pytest.approx(half)
    assert s.values.shape == (3, 50) and s.seeds == [0, 1, 2] and s.task_set == "abc"


def test_a_row_without_plug_ins_is_named_by_its_learner():
    scores = np.full((2, 5), 0.9)
    alone, trl = fake_row("maml", scores), fake_row("trlearner", scores)
    assert (alone.name, trl.name) == ("maml", "trlearner")
    for run in alone.runs + trl.runs:
        run.cfg.learner = "protonet"
    assert (alone.name, trl.name) == ("protonet", "trlearner")
    header, cells = tables([alone, trl], [])[0][1:]
    assert [c[header.index("method")] for c in cells] == ["protonet", "trlearner"]
    assert cells[0][header.index("vs host alone: difference [95% CI]")] == "(reference)"   # still the reference row


def test_rotations_of_the_held_out_classes_join_per_seed():
    rng = np.random.default_rng(3)
    per_fold = 0.6 + 0.1 * rng.standard_normal((4, 3, 20))            # [folds, seeds, tasks]
    row = fake_row("maml", per_fold, folds=4)
    assert len(row.runs) == 12 and {run.cfg.benchmark.kwargs["fold"] for run in row.runs} == {0, 1, 2, 3}
    s = row.stats()[("b", 1)]
    assert s.seeds == [0, 1, 2] and s.tasks == 80 and s.values.shape == (3, 80)
    assert np.allclose(s.seed_means, per_fold.mean(axis=(0, 2)))          # each seed: the mean over rotations
    assert np.allclose(s.values[1], np.concatenate(per_fold[:, 1]))       # folds joined in fold order
    assert s.task_set == "+".join(f"fold{f}:abc{f}" for f in range(4))
    # The same folds of another method pair with it; a row whose runs are folds groups as one row.
    better = fake_row("cml", per_fold + 0.05, folds=4)
    comps = comparisons([row, better])
    assert comps[(1, "b", 1)][0].diff == pytest.approx(0.05)
    assert len(group(row.runs + better.runs)) == 2


def test_the_report_states_the_plateau_criterion_per_seed():
    row = fake_row("maml", np.full((2, 5), 0.9))
    curves = [[0.90, 0.95, 0.960, 0.962], [0.90, 0.94, 0.950, 0.960]]   # seed 1 still gains a point
    for run, values in zip(row.runs, curves):
        run.metrics = [{"iteration": 500 * (i + 1), "val_accuracy": v} for i, v in enumerate(values)]
    title, _, cells = next(t for t in tables([row], []) if t[0].startswith("Validation plateau"))
    assert "0.5 points" in title and cells[0][2] == "1500 → 2000"
    assert "seed 0: 96.00% → 96.20% (+0.20 pts)" in cells[0][3] and cells[0][4] == "no (1 of 2): seed 1 still gaining"


def test_verdicts_need_the_holm_adjusted_p():
    rng = np.random.default_rng(1)
    task = 0.8 + 0.1 * rng.standard_normal(100)
    seed_offsets = np.array([[0.0], [0.004], [-0.004]])
    maml = task + seed_offsets + 0.02 * rng.standard_normal((3, 100))
    big = maml + 0.05 + 0.002 * rng.standard_normal((3, 1))        # +5 points on every seed
    small = maml + np.array([[0.01], [-0.004], [0.006]])            # inconsistent across seeds
    worse = maml - 0.05 + 0.002 * rng.standard_normal((3, 1))
    rows = [fake_row("maml", maml), fake_row("cml", big), fake_row("meta_gna", small), fake_row("trlearner", worse),
            fake_row("cxgrad", big, task_set="other")]
    comps = comparisons(rows)
    assert set(comps) == {(1, "b", 1), (2, "b", 1), (3, "b", 1), (4, "b", 1)}
    big_c, big_adj, _ = comps[(1, "b", 1)]
    assert big_c.diff == pytest.approx(big.mean() - maml.mean()) and big_c.low < big_c.diff < big_c.high
    assert verdict(big_c, big_adj, "accuracy") == "▲ better"
    assert verdict(*comps[(3, "b", 1)][:2], "accuracy") == "▼ worse"
    assert verdict(*comps[(3, "b", 1)][:2], "mse") == "▲ better"      # lower is better for an error
    small_c, small_adj, _ = comps[(2, "b", 1)]
    assert small_adj >= small_c.p and verdict(small_c, small_adj, "accuracy") == "n.s."
    # Holm over the family of three testable comparisons: the smallest p is multiplied by 3.
    ps = sorted(comps[k][0].p for k in [(1, "b", 1), (2, "b", 1), (3, "b", 1)])
    assert min(comps[k][1] for k in [(1, "b", 1), (2, "b", 1), (3, "b", 1)]) == pytest.approx(min(1, 3 * ps[0]))
    # Scores of other test tasks are never paired.
    assert comps[(4, "b", 1)][0] == "different test tasks" and verdict(*comps[(4, "b", 1)][:2], "accuracy") == "–"
    md = "\n".join(markdown_table(h, c) for _, h, c in tables(rows, []))
    assert "▲ better" in md and "▼ worse" in md and "– (different test tasks)" in md


def test_a_significant_difference_at_the_raw_p_can_vanish_after_holm():
    rng = np.random.default_rng(2)
    maml = 0.8 + 0.02 * rng.standard_normal((3, 60))
    near = maml + np.array([[0.012], [0.009], [0.015]])              # raw p ≈ 0.02
    rows = [fake_row("maml", maml), fake_row("cml", near)] + [
        fake_row(m, maml + 0.001 * rng.standard_normal((3, 1))) for m in ("meta_gna", "cxgrad", "trlearner")]
    comps = comparisons(rows)
    c, adj, _ = comps[(1, "b", 1)]
    assert c.p < 0.05 <= adj and verdict(c, adj, "accuracy") == "n.s."


def test_every_shipped_study_resolves_every_cell(tmp_path):
    from metagrad.study import cell_config, cells, studies

    assert {"issue7", "issue7-cpu", "issue7-omniglot-cpu", "issue7-omniglot20-cpu", "issue7-omniglot-no-norm-cpu",
            "issue7-omniglot20-no-norm-cpu"} <= set(studies())
    for name in studies():
        study = load_study(name)
        for cell in cells(study, tmp_path, seeds=1):
            cfg = cell_config(study, cell)
            assert cfg.plugins == cell.plugins and cfg.train.seed == 0, (name, cell)
    study = load_study("issue7-omniglot20-cpu")
    cfg = cell_config(study, cells(study, tmp_path, seeds=1)[-1])   # the all-in combination, CxGrad included
    # The CPU budget adapts as the 5-way part does: one step of α 0.4 in training, 3 at test.
    assert (cfg.benchmark.ways, cfg.maml.adapt, cfg.eval.queries) == (20, "no_norm", 15)
    assert (cfg.maml.inner_lr, cfg.maml.inner_steps, cfg.maml.eval_inner_steps) == (0.4, 1, 3)
    # The no-norm MAML studies hold the row the report compares CxGrad and the combination with.
    for main_study, twin_study in [("issue7-omniglot-cpu", "issue7-omniglot-no-norm-cpu"),
                                   ("issue7-omniglot20-cpu", "issue7-omniglot20-no-norm-cpu")]:
        twin = load_study(twin_study)
        (maml_cell,) = cells(twin, tmp_path, seeds=1)
        maml_sig = _signature(cell_config(twin, maml_cell), plugins=False)
        study = load_study(main_study)
        with_cxgrad = [c for c in cells(study, tmp_path, seeds=1) if "cxgrad" in c.plugins]
        assert len(with_cxgrad) == 2
        assert all(_signature(cell_config(study, c), plugins=False) == maml_sig for c in with_cxgrad)


def test_a_study_with_folds_runs_a_cell_per_rotation(tmp_path):
    from metagrad.study import cell_config, cells

    spec = tmp_path / "folds.toml"
    spec.write_text('presets = ["cora-2w5s", "sinusoid-5shot"]\nmethods = ["maml", "cml"]\nseeds = 2\n'
                    '[folds]\n"cora-2w5s" = 4\n')
    study = load_study(str(spec))
    grid = cells(study, tmp_path)
    assert len(grid) == 2 * 4 * 2 + 2 * 2
    cora = [c for c in grid if c.preset == "cora-2w5s"]
    assert sorted({c.fold for c in cora}) == [0, 1, 2, 3] and all(f"fold{c.fold}" in c.run_dir for c in cora)
    assert cell_config(study, cora[-1]).benchmark.kwargs["fold"] == 3
    assert all(c.fold is None for c in grid if c.preset == "sinusoid-5shot")
    spec.write_text('presets = ["cora-2w5s"]\nmethods = ["maml"]\n[folds]\n"citeseer-2w5s" = 3\n')
    with pytest.raises(C.ConfigError, match="folds must map presets of the study"):
        load_study(str(spec))


def test_methods_labels_and_bad_studies(tmp_path, capsys):
    assert method_plugins("maml") == [] and method_plugins("meta_gna+cml") == ["meta_gna", "cml"]
    assert method_label(["trlearner", "cml", "meta_gna"]) == "cml+meta_gna+trlearner"
    assert load_study("issue7-cpu").presets[:2] == ["sinusoid-5shot", "sinusoid-10shot"]
    assert main(["study", "no-such-study"]) == 2
    assert "unknown study" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('presets = ["sinusoid-5shot"]\nmethods = ["maml"]\nseedz = 2\n')
    assert main(["study", str(bad)]) == 2
    assert "unknown study keys seedz" in capsys.readouterr().err


def test_a_method_is_compared_with_the_maml_row_of_its_own_config(tmp_path):
    # Study A: MAML at the preset, and Meta-GNA at another inner step size; study B: MAML at that step size.
    # Meta-GNA's row must be compared with B's MAML row (the same config apart from the plug-in), not A's.
    short = [*TINY, "train.iterations=10"]
    a = Study(name="a", presets=["sinusoid-5shot"], methods=["maml", "meta_gna"], seeds=1, set=short,
              method_set={"meta_gna": ["maml.inner_lr=0.02"]})
    b = Study(name="b", presets=["sinusoid-5shot"], methods=["maml"], seeds=1, set=[*short, "maml.inner_lr=0.02"])
    run_study(a, tmp_path / "a", report=False, progress=False)
    run_study(b, tmp_path / "b", report=False, progress=False)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text().split("## Test results")[1].split("##")[0]
    rows = {r.split(" | ")[1]: r for r in table.splitlines() if r.startswith("| sinusoid-5shot |")}
    # B's MAML row is named by what differs from A's; the run-directory table lists it with its override.
    assert set(rows) >= {"maml", "maml [maml.inner_lr=0.02]", "meta_gna"}
    mark = rows["meta_gna"].split(" | ")[6]
    assert mark.split(" (vs ")[0] in ("–", "n.s.", "▲ better", "▼ worse")    # one seed: no test ("–")
    assert mark.endswith("(vs maml [maml.inner_lr=0.02])")
    runs_table = (tmp_path / "rep" / "report.md").read_text().split("## Run directories")[1]
    assert any("maml [maml.inner_lr=0.02]" in r and str(tmp_path / "b") in r for r in runs_table.splitlines())


def test_a_study_also_scores_the_trained_step_count(tmp_path):
    # Trained with 1 inner step, tested after 3: the study adds the 1-step score (once), and the report's
    # step table compares every method with MAML after as many steps.
    study = Study(name="steps", presets=["sinusoid-5shot"], methods=["maml", "meta_gna"], seeds=1,
                  set=[*TINY, "train.iterations=10", "maml.eval_inner_steps=3", "eval.inner_steps=[3]"])
    run_study(study, tmp_path / "s", report=False, progress=False)
    run = tmp_path / "s" / "sinusoid-5shot" / "meta_gna" / "seed0"
    from metagrad.evaluation import read_records

    final = [r for r in read_records(run) if r.get("iteration") == 10]
    assert sorted(r["inner_steps"] for r in final) == [1, 3]
    run_study(study, tmp_path / "s", report=False, progress=False)  # skipped: nothing scored twice
    assert len([r for r in read_records(run) if r.get("iteration") == 10]) == 2
    assert main(["report", str(tmp_path / "s"), "--out", str(tmp_path / "rep"), "--no-compute"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    main_rows = [r for r in text.split("## Test results")[1].split("##")[0].splitlines()
                 if r.startswith("| sinusoid-5shot |")]
    assert len(main_rows) == 2 and all("(3 steps)" in r for r in main_rows)
    steps = {r.split(" | ")[1]: r.split(" | ")[2] for r in text.split("## Test metric after each")[1]
             .split("##")[0].splitlines() if r.startswith("| sinusoid-5shot |")}
    assert steps["maml"].startswith("1: ") and "; 3: " in steps["maml"] and "▲" not in steps["maml"]
    one, three = steps["meta_gna"].rstrip(" |").split("; ")
    # One seed: no seed spread, so no test ("–"), but the difference to MAML after as many steps is shown.
    # The training count is descriptive: one family never holds two views of the same models.
    assert re.fullmatch(r"1: \S+ – [+-]\S+ \(one seed: no interval\), p – \(not a verdict step count\)", one), one
    assert re.fullmatch(r"3: \S+ – [+-]\S+ \(one seed: no interval\), p –", three), three
    # The per-sample loss diagnostics are taken after both step counts too, and the report shows both.
    diag = json.loads((run / "diagnostics.json").read_text())
    assert set(diag["sample_losses"]) == {"1", "3"} and len(diag["sample_losses"]["1"]) == 10
    diag_rows = [r.split(" | ")[1:3] for r in text.split("## Per-sample query losses")[1].split("##")[0].splitlines()
                 if r.startswith("| sinusoid-5shot |")]
    assert diag_rows == [["maml", "3"], ["maml", "1"], ["meta_gna", "3"], ["meta_gna", "1"]]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
def test_killing_a_parallel_study_stops_its_workers(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = tmp_path / "long.toml"
    spec.write_text('presets = ["sinusoid-5shot"]\nmethods = ["maml", "meta_gna"]\nseeds = 1\n'
                    'set = ["train.iterations=100000", "train.checkpoint_every=20", "train.threads=1"]\n')
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "metagrad", "study", str(spec), "--out", str(out), "--jobs", "2",
                             "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = [out / "sinusoid-5shot" / m / "seed0" / "checkpoint.pt" for m in ("maml", "meta_gna")]
        deadline = time.time() + 120
        while not all(p.is_file() for p in started) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert all(p.is_file() for p in started), "the workers never wrote a checkpoint"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()

    def alive(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if alive(w)]
    for w in left:  # do not leave them running when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, "the study's workers outlived it"


def test_records_with_another_head_are_their_own_rows_and_exclude_takes_the_benchmark(tmp_path):
    # A 5-way model scored on Lake's 20-way runs with two heads: the later record must not replace the earlier.
    from metagrad import rundir as R
    from metagrad.report import load_run, write_report

    run = tmp_path / "run"
    run.mkdir()
    R.write_config(run, C.resolve("sinusoid-5shot"))
    base = {"split": "test", "metric": "accuracy", "inner_steps": 3, "tasks": 2, "ci95": 0.0, "iteration": 10}
    R.append_records(run, [{**base, "benchmark": "lake", "head": "prototype", "mean": 0.8},
                           {**base, "benchmark": "lake", "head": "mean", "mean": 0.6},
                           {**base, "benchmark": "sinusoid", "mean": 0.9}])
    got = {r["benchmark"]: r["mean"] for r in load_run(run, compute=False).records}
    assert got == {"lake (prototype head)": 0.8, "lake (mean head)": 0.6, "sinusoid": 0.9}
    text = write_report([run], tmp_path / "rep", compute=False, exclude=["lake"]).read_text()
    assert "lake" not in text.split("## Test results")[1].split("##")[0]
