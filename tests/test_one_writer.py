"""One writer per run directory, and nothing lost to a stale or strange file (issue 40, defects 1-3, 15-17).

Each test here once failed: two ``metagrad train`` processes in one directory both exited 0 with their metrics
interleaved; a new run overwrote another run's kept checkpoint copies; a FIFO made ``eval`` wait for ever. The
two data-loss cases also run as real concurrent processes: the first writer is stopped (SIGSTOP) as soon as it
holds the run directory's lock, so the second one meets it there every time, without a sleep that hopes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metagrad
from metagrad import config as C
from metagrad.cli import main
from metagrad.train import train
from tests.helpers import deadline, one_line_error, snapshot

SRC = Path(metagrad.__file__).resolve().parents[1]
LOCK = ".metagrad.lock"
SMALL = ["train.iterations=4", "train.meta_batch_size=2", "train.log_every=2", "train.val_every=0",
         "train.checkpoint_every=2", "eval.tasks=4", "train.threads=1"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def argv_train(out: Path, *items: str) -> list[str]:
    return ["train", "--config", "sinusoid-10shot", "--out-dir", str(out), "--no-progress", *sets(*SMALL, *items)]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished 4-iteration sinusoid run (checkpoints at 2 and 4, kept copies of both, evaluated, no plot)."""
    out = tmp_path_factory.mktemp("writer") / "run"
    train(C.resolve("sinusoid-10shot", SMALL), out, progress=False, plot=False)
    return out


def copy_of(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))




@contextlib.contextmanager
def held_elsewhere(run: Path, pid: int = 424242):
    """The run directory's lock, held through a descriptor of its own, as another process holding it looks."""
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
        yield pid
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ 1. the lock
def test_a_second_writer_is_refused_naming_the_holder(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    before = snapshot(run)
    commands = {"train": argv_train(tmp_path / "new"),
                "resume": ["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")],
                "resume dry run": ["train", "--resume", "--out-dir", str(run), "--dry-run"],
                "eval": ["eval", str(run), "--tasks", "2"],
                "report": ["report", str(run), "--out", str(tmp_path / "rep")]}
    (tmp_path / "new").mkdir()
    for name, argv in commands.items():
        target = tmp_path / "new" if name == "train" else run
        with held_elsewhere(target) as pid:
            if name == "report":
                (run / "diagnostics.json").unlink(missing_ok=True)   # report would write it into the run
                before.pop("diagnostics.json", None)
            assert main(argv) == 2, name
            one_line_error(capsys, "in use by process", str(pid))
    assert snapshot(run) == {**before, LOCK: b"424242\n"}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [LOCK]   # the refused train wrote nothing


def test_the_lock_is_released_and_its_file_removed(tmp_path):
    run = tmp_path / "run"
    assert main(argv_train(run)) == 0
    assert not (run / LOCK).exists()
    assert main(["eval", str(run), "--tasks", "2"]) == 0 and not (run / LOCK).exists()


def test_a_refused_config_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv_train(out, "train.meta_lr=-1")) == 2
    one_line_error(capsys, "train.meta_lr")
    assert not out.exists()


def test_a_study_cell_held_elsewhere_fails_alone(tmp_path):
    from metagrad import study as S

    study = S.Study(name="t", presets=["sinusoid-10shot"], methods=["maml"], seeds=2, set=SMALL)
    out = tmp_path / "study"
    held = Path(S.cells(study, out)[0].run_dir)
    with held_elsewhere(held):
        result = S.run_study(study, out, report=False, progress=False)
    status = {c["seed"]: (c["status"], c["reason"]) for c in result.cells}
    assert status[0][0] == "failed" and "in use by process 424242" in status[0][1]
    assert status[1][0] == "trained"


def _spawn(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "metagrad", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _holder_pid(run: Path) -> str | None:
    """The pid written in the run's lock file while some process holds its flock (None: not held)."""
    try:
        fd = os.open(run / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode().strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _stopped_while_holding(run: Path, *argv: str) -> subprocess.Popen:
    """Start ``metagrad train ...`` and SIGSTOP it the moment it holds ``run``'s lock (a condition, not a delay)."""
    first = _spawn(*argv)
    give_up = time.monotonic() + 120
    while _holder_pid(run) != str(first.pid):
        if first.poll() is not None or time.monotonic() > give_up:
            first.kill()
            _, err = first.communicate()
            pytest.fail(f"the first writer never held the lock (exit {first.returncode}): {err[-600:]}")
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    return first


def _lines(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


RUN = ["--no-progress", *sets("train.iterations=8", "train.meta_batch_size=2", "train.log_every=2",
                               "train.val_every=0", "train.checkpoint_every=2", "eval.tasks=4", "train.threads=1")]


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_two_real_processes_one_directory(resume, done, tmp_path):
    """Defect 1 as it happened: two ``python -m metagrad train`` into one directory at once (seeds 0 and 1)."""
    run = copy_of(done, tmp_path) if resume else tmp_path / "run"
    flags = ["--resume"] if resume else []
    argv = ["train", "--config", "sinusoid-10shot", "--out-dir", str(run), *flags, *RUN]
    first = _stopped_while_holding(run, *argv, "--set", "train.seed=0")
    try:
        second = _spawn(*argv, "--set", "train.seed=0" if resume else "train.seed=1")
        _, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=300)
    assert second.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("metagrad: error:")]
    assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0] and "Traceback" not in err, err
    assert first.returncode == 0, err1
    assert _lines(run) == [2, 4, 6, 8]        # each iteration once, one run's
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0
    assert not (run / LOCK).exists()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path, capsys):
    run = tmp_path / "run"
    first = _stopped_while_holding(run, "train", "--config", "sinusoid-10shot", "--out-dir", str(run), *RUN)
    first.kill()
    first.communicate()
    assert (run / LOCK).exists() and _holder_pid(run) is None   # the file stays, the lock does not
    from metagrad.rundir import held_files

    flags = ["--resume"] if held_files(run) else []
    assert main(["train", "--config", "sinusoid-10shot", "--out-dir", str(run), *flags, *RUN]) == 0
    assert _lines(run) == [2, 4, 6, 8]


# ------------------------------------------------------------------------------------------ 2. holds a run
@pytest.mark.parametrize("kept", ["checkpoint-00000002.pt", "faults.jsonl", "checkpoint.pt.corrupt"])
def test_kept_copies_alone_hold_a_run(kept, done, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    source = done / kept if (done / kept).exists() else None
    (run / kept).write_bytes(source.read_bytes() if source else b'{"iteration": 1}\n')
    before = snapshot(run)
    assert main(argv_train(run, "train.seed=3")) == 2
    one_line_error(capsys, "already holds a run", kept)
    assert snapshot(run) == before


def test_kept_copies_alone_hold_a_run_real_process(done, tmp_path):
    """Defect 2 as it happened, in a real process: another run's kept copies, a new run with another config."""
    run = tmp_path / "run"
    run.mkdir()
    for p in done.glob("checkpoint-*.pt"):
        shutil.copy(p, run / p.name)
    before = snapshot(run)
    proc = _spawn("train", "--config", "sinusoid-10shot", "--out-dir", str(run), *RUN, "--set", "train.seed=5")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already holds a run" in err and "checkpoint-00000002.pt" in err, err
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------ 3. FIFOs and co.
@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.json", "checkpoint.pt", "config.json", "scores.json"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_fifo_run_file_is_refused_not_waited_on(name, command, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / name).unlink()
    os.mkfifo(run / name)
    argv = (["eval", str(run), "--tasks", "2"] if command == "eval" else
            ["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")])
    with deadline(10):
        assert main(argv) == 2
    one_line_error(capsys, name, "FIFO")


@pytest.mark.parametrize("name", ["checkpoint-00000004.pt", "curves.png", "diagnostics.json"])
def test_a_directory_where_an_output_goes_is_refused_before_training(name, tmp_path, capsys):
    """Defect 17: a future kept copy or the plot's place taken by a directory; refused before the first step."""
    run = tmp_path / "run"
    (run / name).mkdir(parents=True)
    assert main(argv_train(run)) == 2
    one_line_error(capsys, name, "is a directory")
    assert sorted(p.name for p in run.iterdir()) == [name]   # nothing trained, nothing written


@pytest.mark.parametrize("target", ["elsewhere", "missing"])
def test_a_symbolic_link_run_file_that_is_no_file_is_refused(target, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(tmp_path if target == "elsewhere" else tmp_path / "gone")
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")]) == 2
    one_line_error(capsys, "metrics.jsonl")


# ------------------------------------------------------------------------------------------ 15, 16
def test_a_temporary_file_with_a_huge_pid_is_removed(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    stray = run / f".checkpoint.pt.tmp-{10**30}"
    stray.write_bytes(b"half")
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")]) == 0
    assert not stray.exists() and "Traceback" not in capsys.readouterr().err


def test_resume_with_another_config_before_the_first_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = C.resolve("sinusoid-10shot", SMALL)
    (run / "config.json").write_text(C.dumps(cfg))
    (run / "metrics.jsonl").write_text('{"iteration": 2, "loss": 1.0}\n')
    before = snapshot(run)
    argv = ["train", "--resume", "--config", "sinusoid-5shot", "--out-dir", str(run), "--no-progress", *sets(*SMALL)]
    assert main(argv) == 2
    one_line_error(capsys, "different config", "config.json")
    assert snapshot(run) == before
    # the run's own config (or a resumable change) still starts it over
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")]) == 0


# ------------------------------------------------------------------------------------------ cosmetic
def test_empty_out_dir_and_a_path_as_name_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv_train(Path("x")), "--out-dir", ""]) == 2
    one_line_error(capsys, "--out-dir")
    argv = ["train", "--config", "sinusoid-10shot", "--no-progress", *sets(*SMALL, "name=../../x")]
    assert main(argv) == 2
    one_line_error(capsys, "name")
    assert not any(tmp_path.parent.parent.glob("x-*")) and not (tmp_path / "runs").exists()


def test_eval_of_a_file_says_it_is_not_a_directory(done, capsys):
    assert main(["eval", str(done / "eval.json")]) == 2
    one_line_error(capsys, "is not a directory")


def test_ctrl_c_during_eval_does_not_advise_resume(done, tmp_path, capsys, monkeypatch):
    import metagrad.evaluation as E

    run = copy_of(done, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "evaluate", interrupted)
    assert main(["eval", str(run), "--tasks", "2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


def test_the_sibling_lock_of_the_study_scripts_does_not_collide(tmp_path):
    """benchmarks/issue21_cells.py holds ``<run dir>.lock`` (beside the run) while a child trains the cell there."""
    run = tmp_path / "cell"
    with open(f"{run}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(argv_train(run)) == 0
        assert main(["eval", str(run), "--tasks", "2"]) == 0
