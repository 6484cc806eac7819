"""What a hostile probe found (issue 23): each input below once trained, crashed or misreported; now each is
refused before anything is written, or reported in one line (``metagrad: error: …``, exit status 2)."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import pytest
import torch

from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad import rundir
from metagrad.cli import main
from metagrad.train import train
from tests.helpers import copy_of, one_line_error, snapshot

SMALL = ["train.iterations=4", "train.meta_batch_size=2", "train.log_every=2", "train.val_every=0",
         "train.checkpoint_every=2", "eval.tasks=4", "train.threads=1"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def argv_train(out: Path, *items: str, config: str = "sinusoid-10shot") -> list[str]:
    return ["train", "--config", config, "--out-dir", str(out), "--no-progress", *sets(*SMALL, *items)]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished 4-iteration sinusoid run (checkpoints at 2 and 4, evaluated, no plot)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    train(C.resolve("sinusoid-10shot", SMALL), out, progress=False, plot=False)
    return out


# ------------------------------------------------------------------------------------------ 1. meta_lr_min
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_meta_lr_min_is_validated(value, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv_train(out, "train.meta_lr_schedule=cosine", f"train.meta_lr_min={value}")) == 2
    one_line_error(capsys, "train.meta_lr_min")
    assert not out.exists()


def test_the_applied_step_size_is_guarded(tmp_path, monkeypatch):
    """A step size that is not finite and > 0 is a skipped step, named as such, never applied."""
    import metagrad.train as T

    monkeypatch.setattr(T, "meta_lr", lambda t, it: float("nan") if it >= 2 else t.meta_lr)
    cfg = C.resolve("sinusoid-10shot", [*SMALL, "train.max_bad_steps=2"])
    with pytest.warns(T.NumericalWarning, match="meta_lr"), pytest.raises(T.NumericalError, match="meta_lr_min"):
        train(cfg, tmp_path / "run", progress=False, plot=False)
    state = ckpt.load_latest(tmp_path / "run")
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["learner"].values())


# ------------------------------------------------------------------------------------------ 2. every split first
@pytest.mark.parametrize("config, items, piece", [
    ("omniglot-5w1s-cpu", ["eval.queries=30", "benchmark.data_root=DATA"], "queries"),
    ("cora-2w5s", ["benchmark.ways=3", "benchmark.data_root=PLANETOID"], "3-way"),
])
def test_every_split_is_built_before_the_first_step(config, items, piece, tmp_path, capsys):
    shared = Path(__file__).resolve().parents[2] / "shared/data"
    roots = {"DATA": shared / "omniglot", "PLANETOID": shared / "planetoid"}
    if not all(p.is_dir() for p in roots.values()):
        pytest.skip("the shared data copy is not here")
    items = [i.replace("=DATA", f"={roots['DATA']}").replace("=PLANETOID", f"={roots['PLANETOID']}") for i in items]
    out = tmp_path / "run"
    assert main(argv_train(out, "train.iterations=1", "train.meta_batch_size=1", *items, config=config)) == 2
    one_line_error(capsys)
    assert not out.exists()  # nothing trained, nothing written


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv_train(out), "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and not out.exists()
    assert main([*argv_train(out, "eval.queries=0"), "--dry-run"]) == 2
    one_line_error(capsys, "eval.queries")


# ------------------------------------------------------------------------------------------ 3. OS errors
def test_full_disk_is_one_line_and_leaves_no_temporary_file(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # the next checkpoint does not fit
    try:
        code = main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert code == 2
    one_line_error(capsys, "checkpoint", "file too large")
    assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*tmp*"))


@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.json", "config.json"])
def test_a_run_file_that_is_a_directory(name, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / name).unlink()
    (run / name).mkdir()
    for argv in (["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")],
                 ["eval", str(run), "--tasks", "2"]):
        if name == "config.json" and argv[0] == "eval":
            continue
        assert main(argv) == 2, argv
        one_line_error(capsys, name, "is a directory")
        assert not list(run.glob(".*tmp*"))


def test_eval_json_writer_removes_its_temporary_file(tmp_path, monkeypatch):
    from metagrad.evaluation import append_records

    (tmp_path / "eval.json").mkdir()
    with pytest.raises(OSError):
        append_records(tmp_path, [{"split": "test"}])
    assert not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------ 4. plug-in args
@pytest.mark.parametrize("value, piece", [("nan", "finite"), ("inf", "finite"), ("abc", "expected float"),
                                          ("-1", "weight >= 0")])
def test_plugin_arguments_are_checked(value, piece, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv_train(out, "plugins=trlearner", "train.meta_batch_size=4",
                           f"plugin_args.trlearner.weight={value}")) == 2
    one_line_error(capsys, "trlearner", piece)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 5. damaged metrics
def test_damaged_metrics_line_is_reported_and_kept(done, tmp_path):
    run = copy_of(done, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:20] + "#garbage#"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl line 1 .*damaged"):
        train(C.resolve("sinusoid-10shot", [*SMALL, "train.iterations=6"]), run, resume=True, progress=False,
              plot=False)
    assert (run / "metrics.jsonl.damaged").read_text() == lines[0] + "\n"
    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [4, 6]


# ------------------------------------------------------------------------------------------ 6. report input
@pytest.mark.parametrize("content, piece", [("[1, 2, 3]", "record 1"),
                                            (('[{"split": "test", "metric": "mse", "inner_steps": "x", "tasks": 4, '
                                              '"mean": 1.0, "ci95": 0.1, "iteration": 4}]'), "inner_steps")])
def test_report_on_a_malformed_eval_json(content, piece, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / "eval.json").write_text(content)
    assert main(["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, "eval.json", piece)


# ------------------------------------------------------------------------------------------ 7. permissions
def _denied(path: Path) -> PermissionError:
    return PermissionError(13, "Permission denied", str(path))


def test_unreadable_checkpoint_is_not_called_corrupt(done, tmp_path, capsys, monkeypatch):
    run = copy_of(done, tmp_path)
    real = torch.load

    def load(f, *a, **k):
        if str(f).endswith("checkpoint.pt"):
            raise _denied(f)
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", load)
    before = snapshot(run)
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")]) == 2
    line = one_line_error(capsys, "checkpoint.pt", "permission denied")
    assert "corrupt" not in line and snapshot(run) == before


def test_unreadable_npz_is_not_called_corrupt(tmp_path, monkeypatch):
    import numpy as np

    from metagrad.data import omniglot

    path = tmp_path / "images_background.npz"
    path.write_bytes(b"x")
    monkeypatch.setattr(np, "load", lambda p, *a, **k: (_ for _ in ()).throw(_denied(p)))
    with pytest.raises(PermissionError):
        omniglot.read_npz(path, "background", 28, "lanczos")


# ------------------------------------------------------------------------------------------ 8. no unsafe advice
def test_every_checkpoint_corrupt_never_suggests_the_unsafe_load(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    for i, p in enumerate(ckpt.candidates(run)):
        p.write_bytes(bytes(range(256)) * (4 + i))
    assert main(["eval", str(run)]) == 2
    line = one_line_error(capsys, "corrupt")
    assert "weights_only" not in line and "torch.load" not in line


# ------------------------------------------------------------------------------------------ 9. smaller
def test_empty_toml_is_refused(tmp_path, capsys):
    (tmp_path / "empty.toml").write_text("# nothing here\n")
    assert main(["train", "--config", str(tmp_path / "empty.toml"), "--out-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "empty.toml", "empty")


def test_missing_extends_names_the_file(tmp_path, capsys):
    (tmp_path / "child.toml").write_text('extends = "no-such-preset"\n[train]\niterations = 3\n')
    assert main(["train", "--config", str(tmp_path / "child.toml"), "--out-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "child.toml", "no-such-preset")


def test_report_on_an_empty_directory_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "no run")


def test_eval_without_a_checkpoint_says_nothing_to_evaluate(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    for p in ckpt.candidates(run):
        p.unlink()
    assert main(["eval", str(run)]) == 2
    line = one_line_error(capsys, "nothing to evaluate")
    assert "resume" not in line


def test_eval_refuses_a_config_json_of_another_run(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    rundir.write_config(run, C.resolve("sinusoid-5shot"))
    before = snapshot(run)
    assert main(["eval", str(run), "--tasks", "2"]) == 2
    one_line_error(capsys, "config.json", "benchmark.shots")
    assert snapshot(run) == before


def test_broken_config_json_does_not_block_resume(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / "config.json").write_text("{")
    assert main(["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6")]) == 0
    assert "config.json" in capsys.readouterr().err
    assert C.load(run / "config.json").train.iterations == 6


def test_image_cache_is_not_written_into_the_data_folder(tmp_path, monkeypatch):
    from PIL import Image

    from metagrad import data
    from metagrad.data import folders

    root = tmp_path / "c"
    for i, (fine, _) in enumerate(folders.SPECS["cifar_fs"].classes("train")):
        (root / fine).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (32, 32), (i, 40 * j, 128)).save(root / fine / f"{j}.png")
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    b = data.create("cifar_fs", "train", ways=5, shots=1, queries=1, meta_batch_size=2, root=root)
    assert not (root / ".metagrad-cache").exists() and b.cache.path.parent == tmp_path / "cache"


def test_image_cache_is_keyed_by_the_archives_contents(tmp_path, monkeypatch):
    """An archive replaced by another of the same name, size and time never meets the old archive's cache."""
    import os

    import numpy as np

    from metagrad.data.cache import cached, fingerprint

    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "images.npz"
    np.savez(archive, x=np.zeros(64, dtype=np.uint8))
    st = archive.stat()

    def load(value):
        return cached("t", fingerprint([archive]), lambda: {"x": torch.full((2,), value)}, tmp_path)

    first = load(1)
    assert not first.hit and load(2).hit and load(2).data["x"][0] == 1
    np.savez(archive, x=np.ones(64, dtype=np.uint8))                # same name and size, other bytes
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))          # and the same time
    assert archive.stat().st_size == st.st_size and archive.stat().st_mtime_ns == st.st_mtime_ns
    again = load(3)
    assert not again.hit and again.data["x"][0] == 3


def test_cache_folder_is_created_below_missing_parents(tmp_path, monkeypatch):
    """A fresh machine has no ~/.cache: the cache folder and its missing parents are created, not skipped;
    a read-only ancestor is still refused."""
    from metagrad.data.cache import cached

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("METAGRAD_CACHE", str(home / ".cache" / "metagrad"))
    first = cached("t", "k", lambda: {"x": torch.ones(2)}, None)
    assert first.path is not None and first.path.parent == home / ".cache" / "metagrad" and not first.hit
    assert cached("t", "k", lambda: {"x": torch.zeros(2)}, None).hit

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setenv("METAGRAD_CACHE", str(locked / "a" / "b"))
    locked.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="no writable cache folder"):
            assert cached("t", "k", lambda: {"x": torch.ones(2)}, None).path is None
    finally:
        locked.chmod(0o755)
    assert not (locked / "a").exists()
