"""Keeping a study's small results (metagrad.keep, ``metagrad study --keep/--only``): a finished cell is kept as
it finishes, without checkpoints; a study whose run directories are lost resumes from what is kept and runs only
what is missing; the kept folder alone reproduces the report's numbers."""

from __future__ import annotations

import json

import pytest

from metagrad import config as C
from metagrad.cli import main
from metagrad.keep import CURVE_KEYS, keep_run, keep_study
from metagrad.study import Study, cells, run_study, select

TINY = ["train.log_every=5", "train.val_every=10", "train.val_tasks=5", "train.checkpoint_every=5",
        "eval.tasks=10", "eval.meta_batch_size=5", "train.meta_batch_size=4", "train.iterations=10"]


def study() -> Study:
    return Study(name="kept", presets=["sinusoid-5shot"], methods=["maml", "meta_gna", "cxgrad"], seeds=2, set=TINY)


def statuses(result) -> dict[str, str]:
    return {f"{c['method']}:{c['seed']}": c["status"] for c in result.cells}


def test_a_lost_study_resumes_from_what_is_kept(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "results"
    first = run_study(study(), out, keep=kept, only=["maml:0"], report=False, progress=False)
    assert statuses(first) == {"maml:0": "trained"}
    cell = kept / "sinusoid-5shot" / "maml" / "seed0"
    assert sorted(p.name for p in cell.iterdir()) == ["config.json", "eval.json", "metrics.jsonl", "scores.json"]
    assert all(set(json.loads(line)) <= set(CURVE_KEYS) for line in (cell / "metrics.jsonl").read_text().splitlines())
    assert (out / "sinusoid-5shot" / "maml" / "seed0" / "checkpoint.pt").is_file()   # checkpoints stay in runs
    kept_eval = (cell / "eval.json").read_bytes()
    assert [c["method"] for c in json.loads((kept / "study.json").read_text())["cells"]] == ["maml"]

    for p in sorted(out.rglob("*"), reverse=True):   # the machine is lost: no run directory survives
        p.unlink() if p.is_file() else p.rmdir()
    second = run_study(study(), out, keep=kept, progress=False)
    assert statuses(second) == {"maml:0": "kept", "maml:1": "trained", "meta_gna:0": "trained",
                                "meta_gna:1": "trained", "cxgrad:0": "n/a", "cxgrad:1": "n/a"}
    assert not (out / "sinusoid-5shot" / "maml" / "seed0").exists()   # the kept cell was not run again
    assert (cell / "eval.json").read_bytes() == kept_eval
    manifest = json.loads((kept / "study.json").read_text())
    order = [f"{c['method']}:{c['seed']}" for c in manifest["cells"]]
    assert order == ["maml:0", "maml:1", "meta_gna:0", "meta_gna:1", "cxgrad:0", "cxgrad:1"]   # the grid's order
    assert manifest["cells"][0]["status"] == "trained"   # the kept cell's record still says how it was made
    # The report at the end reads the kept folder: every cell, the kept one too.
    table = second.report.read_text().split("## Test results")[1].split("##")[0]
    rows = [r for r in table.splitlines() if r.startswith("| sinusoid-5shot |")]
    assert [r.split(" | ")[1] for r in rows] == ["maml", "meta_gna", "cxgrad"] and " | 2 | 10 | " in rows[0]

    third = run_study(study(), out, keep=kept, report=False, progress=False)   # nothing left to run
    assert set(statuses(third).values()) == {"kept", "n/a"}


def test_keep_study_copies_finished_runs_only(tmp_path):
    out = tmp_path / "runs"
    run_study(study(), out, only=["maml"], report=False, progress=False)
    (out / "sinusoid-5shot" / "maml" / "seed1" / "eval.json").unlink()   # as if killed before its evaluation
    assert keep_study(out, tmp_path / "kept") == 1
    assert not keep_run(out / "sinusoid-5shot" / "maml" / "seed1", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert (tmp_path / "kept" / "study.json").is_file()


def test_only_names_cells_or_says_which_exist(tmp_path, capsys):
    grid = cells(study(), tmp_path)
    assert [(c.method, c.seed) for c in select(grid, ["meta_gna", "maml:1"])] == [
        ("maml", 1), ("meta_gna", 0), ("meta_gna", 1)]
    two = cells(Study(name="two", presets=["sinusoid-5shot", "sinusoid-10shot"], methods=["maml"], seeds=2),
                tmp_path)
    assert [(c.preset, c.seed) for c in select(two, ["sinusoid-10shot/maml:1", "sinusoid-5shot/maml"])] == [
        ("sinusoid-5shot", 0), ("sinusoid-5shot", 1), ("sinusoid-10shot", 1)]
    with pytest.raises(C.ConfigError, match=r"names no cell .*sinusoid-10shot/maml:0"):
        select(two, ["sinusoid-20shot/maml:0"])
    with pytest.raises(C.ConfigError, match=r"--only 'cml:0' names no cell .*maml:0"):
        select(grid, ["cml:0"])
    assert main(["study", "issue21-omniglot-finn", "--only", "maml:7", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metagrad: error: --only 'maml:7' names no cell") and "\n" not in err
    assert not (tmp_path / "s").exists()


def test_a_cell_kept_at_another_budget_runs_on_to_the_new_one(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "results"
    run_study(study(), out, keep=kept, only=["maml:0"], report=False, progress=False)
    cell = kept / "sinusoid-5shot" / "maml" / "seed0"
    assert {r["iteration"] for r in json.loads((cell / "eval.json").read_text())} == {10}
    longer = Study(**{**study().__dict__, "set": [*TINY, "train.iterations=20"]})   # the budget's N moved on
    result = run_study(longer, out, keep=kept, only=["maml:0"], report=False, progress=False)
    assert statuses(result) == {"maml:0": "resumed"}   # from its checkpoint at 10, not from the start
    assert {r["iteration"] for r in json.loads((cell / "eval.json").read_text())} == {10, 20}
    curve = [json.loads(line)["iteration"] for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert max(curve) == 20
    again = run_study(longer, out, keep=kept, only=["maml:0"], report=False, progress=False)
    assert statuses(again) == {"maml:0": "kept"}
