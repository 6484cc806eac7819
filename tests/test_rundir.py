"""The run-directory module: one atomic write that never leaves a temporary file, stale temporaries removed, the
record formats kept, and the import rules (no matplotlib backend switch, report never imports study)."""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad import evaluation, rundir

SRC = Path(__file__).resolve().parents[1] / "src"
RECORD = {"split": "test", "metric": "mse", "inner_steps": 1, "tasks": 2, "mean": 0.5, "ci95": 0.1,
          "iteration": 3, "benchmark": "sinusoid", "task_set": "abc", "scores": [0.25, 0.75]}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------------ writers
def _figure(path: Path) -> None:
    from matplotlib.figure import Figure

    from metagrad.plots import save_figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    save_figure(fig, path)


WRITERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "write_atomic": ("x.bin", lambda d: rundir.write_atomic(d / "x.bin", b"new")),
    "config": (rundir.CONFIG, lambda d: rundir.write_config(d, C.resolve("sinusoid-10shot", ["train.seed=3"]))),
    "records": (rundir.SCORES, lambda d: rundir.append_records(d, [RECORD])),   # scores first, then eval.json
    "diagnostics": (rundir.DIAGNOSTICS, lambda d: rundir.write_diagnostics(d, {"iteration": 4})),
    "manifest": (rundir.MANIFEST, lambda d: rundir.write_manifest(d, {"cells": []})),
    "metrics truncation": (rundir.METRICS, lambda d: rundir.truncate_log(d / rundir.METRICS, 1)),
    "checkpoint": (rundir.CHECKPOINT, lambda d: ckpt.save(d, {"learner": {"w": torch.ones(2)}, "optimizer": {},
                                                              "iteration": 7, "rng": {}, "config": {}}, keep=2)),
    "figure": ("fig.png", lambda d: _figure(d / "fig.png")),
}


def _old_files(d: Path) -> dict[str, bytes]:
    rundir.write_atomic(d / "x.bin", b"old")
    rundir.write_config(d, C.resolve("sinusoid-10shot"))
    (d / rundir.EVAL).write_text("[]\n")
    (d / rundir.DIAGNOSTICS).write_text("{}\n")
    (d / rundir.MANIFEST).write_text("{}\n")
    (d / rundir.METRICS).write_text('{"iteration": 1}\n{"iteration": 2}\n')
    (d / rundir.CHECKPOINT).write_bytes(b"old checkpoint")
    (d / "fig.png").write_bytes(b"old figure")
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("where", ["fsync", "replace"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_leaves_no_temporary_file_after_a_failure(writer, where, tmp_path, monkeypatch):
    """A disk that fills at the fsync, or a kill-like failure at the rename: the old file stays, whole, and no
    temporary file is left."""
    name, write = WRITERS[writer]
    before = _old_files(tmp_path)

    def fail(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError) as e:
        write(tmp_path)
    assert e.value.errno == errno.ENOSPC and str(e.value.filename).endswith(name)  # names the file, not its temp
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_writes_through_one_temporary_scheme(writer, tmp_path, monkeypatch):
    name, write = WRITERS[writer]
    _old_files(tmp_path)
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write(tmp_path)
    assert seen and all(src == f".{dst}.tmp-{os.getpid()}" for src, dst in seen)
    assert name in {dst for _, dst in seen} and temporaries(tmp_path) == []


def test_stale_temporaries_are_removed_when_a_run_directory_is_opened(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (done.pid, alive.pid, os.getpid()):
            (tmp_path / f".checkpoint.pt.tmp-{pid}").write_bytes(b"half")
        (tmp_path / ".notes.tmp").write_text("not ours")   # another scheme: left alone
        assert rundir.open_run(tmp_path) == tmp_path
        # The dead process's and this one's are stale; a running process may be writing its own.
        assert temporaries(tmp_path) == [".checkpoint.pt.tmp-" + str(alive.pid), ".notes.tmp"]
    finally:
        alive.kill()
        alive.wait()
    rundir.open_run(tmp_path)
    assert temporaries(tmp_path) == [".notes.tmp"]
    assert ckpt.remove_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------------ formats
def test_records_and_scores_keep_their_formats(tmp_path):
    assert evaluation.read_records is rundir.read_records and evaluation.append_records is rundir.append_records
    assert evaluation.read_scores is rundir.read_scores and evaluation.record_scores is rundir.record_scores
    assert (evaluation.EVAL_FILE, evaluation.SCORES_FILE) == (rundir.EVAL, rundir.SCORES)
    rundir.append_records(tmp_path, [RECORD])
    rundir.append_records(tmp_path, [{**RECORD, "inner_steps": 2}])
    key = "sinusoid/test/steps1/iter3/ways/abc"
    kept = [{k: v for k, v in RECORD.items() if k != "scores"} | {"scores_key": key},
            {k: v for k, v in RECORD.items() if k != "scores"} | {"inner_steps": 2,
                                                                 "scores_key": key.replace("steps1", "steps2")}]
    assert (tmp_path / rundir.EVAL).read_text() == json.dumps(kept, indent=2) + "\n"
    scores = {key: [0.25, 0.75], key.replace("steps1", "steps2"): [0.25, 0.75]}
    assert (tmp_path / rundir.SCORES).read_text() == json.dumps(scores, separators=(",", ":")) + "\n"
    assert rundir.read_records(tmp_path) == kept and rundir.record_scores(tmp_path, kept[0]) == [0.25, 0.75]


def test_logs_manifest_and_diagnostics_round_trip(tmp_path):
    rundir.append_fault(tmp_path, {"iteration": 2, "tensors": ["loss"]})
    with rundir.open_log(tmp_path / rundir.METRICS) as log:
        log.write('{"iteration": 1}\n{"iteration": 2, "lo')   # a torn last line
    assert rundir.read_faults(tmp_path) == [{"iteration": 2, "tensors": ["loss"]}]
    assert rundir.read_metrics(tmp_path) == [{"iteration": 1}]
    assert rundir.read_manifest(tmp_path) is None and rundir.read_diagnostics(tmp_path) is None
    rundir.write_manifest(tmp_path, {"cells": [{"status": "n/a"}]})
    rundir.write_diagnostics(tmp_path, {"iteration": 4})
    assert rundir.read_manifest(tmp_path) == {"cells": [{"status": "n/a"}]}
    assert rundir.read_diagnostics(tmp_path) == {"iteration": 4}
    assert rundir.cell_dir("out", "p", rundir.method_label(["cml", "cxgrad"]), 2, fold=1) == \
        Path("out/p/cml+cxgrad/fold1/seed2")


# ------------------------------------------------------------------------------------------------ imports
def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC), "MPLBACKEND": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_report_or_plots_keeps_the_matplotlib_backend():
    """A notebook's backend stays its own: no metagrad module calls matplotlib.use."""
    out = _run("import matplotlib; matplotlib.use('svg')\n"
               "import metagrad.report, metagrad.plots, metagrad.report_plots, metagrad.study, metagrad.train\n"
               "print(matplotlib.get_backend())")
    assert out == "svg"


def test_reading_a_run_needs_no_matplotlib(tmp_path):
    (tmp_path / rundir.METRICS).write_text('{"iteration": 1, "loss": 2.0}\n')
    out = _run(f"import sys, metagrad.report, metagrad.rundir as R\n"
               f"rows = R.read_metrics({str(tmp_path)!r})\n"
               "print(len(rows), any(m.startswith('matplotlib') for m in sys.modules))")
    assert out == "1 False"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only: never imported when the code runs)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
            for top in node.body for n in ast.walk(top)}


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """metagrad module → the metagrad modules it imports when it runs (at module level, or anywhere in it;
    ``if TYPE_CHECKING:`` blocks aside)."""
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (SRC / "metagrad").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        nodes = [n for top in tree.body for n in ([top] if not isinstance(top, ast.Try) else top.body)] \
            if top_level_only else list(ast.walk(tree))
        found, annotations_only = set(), _type_checking_only(tree)
        for node in nodes:
            if id(node) in annotations_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) + 1 - node.level]) if node.level \
                    else ""
                module = ".".join(filter(None, [base, node.module]))
                found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_report_never_imports_study_and_no_import_cycle():
    anywhere = _imports(top_level_only=False)
    assert "metagrad.report" in _reach(anywhere, "metagrad.study")        # study runs the report ...
    assert "metagrad.study" not in _reach(anywhere, "metagrad.report")    # ... and the report never needs study
    top = _imports(top_level_only=True)
    assert top["metagrad.report"] and "metagrad.rundir" in top["metagrad.report"]
    cycles = sorted(m for m in anywhere if m in _reach(anywhere, m))
    assert cycles == [], f"import cycle through {cycles} (module level or inside a function)"
