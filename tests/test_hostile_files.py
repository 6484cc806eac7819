"""What the second hostile probe found (issue 40, defects 4-14 and 18-20, and the cosmetic ones): each input once
ended in a traceback, a hang or a late failure; now each is one line (``metagrad: error: …``, exit status 2)
naming the file or the key, before anything is written, or (a damaged log line, a checkpoint that does not fit)
a one-line warning and the run goes on."""

from __future__ import annotations

import contextlib
import json
import resource
from pathlib import Path

import pytest
import torch

from metagrad import checkpoint as ckpt
from metagrad import config as C
from metagrad.cli import main
from metagrad.train import train
from tests.helpers import copy_of, one_line_error

SMALL = ["train.iterations=4", "train.meta_batch_size=2", "train.log_every=2", "train.val_every=0",
         "train.checkpoint_every=2", "eval.tasks=4", "train.threads=1"]
HUGE = "1" + "0" * 400
DEEP = 200_000


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def argv_train(out: Path, *items: str, config: str = "sinusoid-10shot") -> list[str]:
    return ["train", "--config", config, "--out-dir", str(out), "--no-progress", *sets(*SMALL, *items)]


def resume(run: Path, *extra: str) -> list[str]:
    return ["train", "--resume", "--out-dir", str(run), "--no-progress", *sets("train.iterations=6"), *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished 4-iteration sinusoid run (checkpoints at 2 and 4, evaluated, no plot)."""
    out = tmp_path_factory.mktemp("files") / "run"
    train(C.resolve("sinusoid-10shot", SMALL), out, progress=False, plot=False)
    return out


@contextlib.contextmanager
def memory_cap(extra_gib: int = 4):
    """Address space capped a few GiB above what this process maps now: an allocation that would swamp the
    machine fails at once instead (the 23 GiB test machine is shared)."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_gib * 2**30, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ------------------------------------------------------------------------------------------ 5. huge integers
def test_a_huge_integer_in_a_toml_is_one_line(tmp_path, capsys):
    toml = tmp_path / "big.toml"
    toml.write_text(f'extends = "sinusoid-10shot"\n[train]\nmeta_lr = {HUGE}\n')
    assert main(["train", "--config", str(toml), "--out-dir", str(tmp_path / "r"), "--dry-run"]) == 2
    one_line_error(capsys, "big.toml")


@pytest.mark.parametrize("command", ["eval", "resume", "report"])
def test_a_huge_integer_in_config_json_is_one_line(command, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    text = (run / "config.json").read_text().replace('"meta_lr": 0.001', f'"meta_lr": {HUGE}')
    (run / "config.json").write_text(text)
    argv = {"eval": ["eval", str(run), "--tasks", "2"], "resume": resume(run),
            "report": ["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OverflowError" not in err
    if command == "resume":   # config.json unreadable: the checkpoint's config is used, with a warning naming it
        assert code == 0 and "config.json" in err
    elif command == "eval":   # eval never needed config.json: the checkpoint's config is used, as always
        assert code == 0, err
    else:
        assert code == 2 and "config.json" in err.splitlines()[-1], err


def test_a_huge_plugin_argument_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*argv_train(out, "plugins=trlearner", "train.meta_batch_size=4",
                             f"plugin_args.trlearner.weight={HUGE}"), "--dry-run"]) == 2
    one_line_error(capsys, "plugin_args.trlearner.weight")


# ------------------------------------------------------------------------------------------ 6, 7. shapes
@pytest.mark.parametrize("content", ["[]", "null", "5", '"config"'])
@pytest.mark.parametrize("command", ["eval", "report"])
def test_config_json_of_the_wrong_type_is_one_line(content, command, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / "config.json").write_text(content)
    argv = (["eval", str(run), "--tasks", "2"] if command == "eval" else
            ["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")])
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "AttributeError" not in err, err
    if command == "report":   # report finds runs by config.json and must say which one is bad
        assert code == 2 and "config.json" in err, err


def test_a_checkpoint_whose_config_is_a_list_falls_back(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.pop("checksum")
    ckpt.save(run, {**state, "config": [1, 2]})   # checksum-valid, malformed
    assert main(resume(run)) == 0
    err = capsys.readouterr().err
    assert "malformed" in err and "checkpoint-00000004.pt" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["eval.json", "config.json", "scores.json"])
def test_a_run_file_nested_too_deeply_is_one_line(name, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / name).write_text("[" * DEEP + "]" * DEEP)
    # eval does not need config.json (the checkpoint's config is used); report does
    argv = (["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")] if name == "config.json" else
            ["eval", str(run), "--tasks", "2"])
    assert main(argv) == 2
    one_line_error(capsys, name)


# ------------------------------------------------------------------------------------------ 8. log lines
@pytest.mark.parametrize("line", ["[1, 2]", "5", '"iteration"', '{"iteration": "four", "loss": 1.0}'])
def test_report_sets_aside_metrics_lines_that_are_not_records(line, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    assert main(["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "metrics.jsonl" in err and "not a record" in err, err


# ------------------------------------------------------------------------------------------ 9, 10. checkpoints
def test_resume_skips_a_valid_checkpoint_of_another_model_size(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    other = tmp_path / "other"
    train(C.resolve("sinusoid-10shot", [*SMALL, "model.hidden=8,8"]), other, progress=False, plot=False)
    mine = torch.load(run / "checkpoint.pt", weights_only=True)
    theirs = torch.load(other / "checkpoint.pt", weights_only=True)
    mine.pop("checksum")
    ckpt.save(run, {**mine, "learner": theirs["learner"], "optimizer": theirs["optimizer"]})  # checksum-valid
    assert main(resume(run)) == 0
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "checkpoint-00000004.pt" in err and "Traceback" not in err, err
    assert ckpt.load_latest(run)["iteration"] == 6


def test_an_old_checkpoint_without_checksum_or_meter_resumes(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for key in ("checksum", "meter"):
        state.pop(key)
    for p in run.glob("checkpoint*.pt"):
        torch.save(state, p)
    assert main(resume(run)) == 0, capsys.readouterr().err
    assert ckpt.load_latest(run)["iteration"] == 6


# ------------------------------------------------------------------------------------------ 11-14. values
@pytest.mark.parametrize("items", [["train.meta_lr=1e300"], ["train.meta_lr=3.5e38"],
                                   ["train.meta_lr_schedule=cosine", "train.meta_lr_min=1e308"]])
def test_step_sizes_must_be_finite_in_float32(items, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(argv_train(out, *items)) == 2
    one_line_error(capsys, "float32")
    assert not out.exists()


def test_a_device_that_cannot_train_fails_the_dry_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*argv_train(out, "train.device=meta"), "--dry-run"]) == 2
    one_line_error(capsys, "train.device=meta")
    assert main(argv_train(out, "train.device=meta")) == 2
    one_line_error(capsys, "train.device=meta")
    assert not out.exists()


def test_absurd_thread_counts_are_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(argv_train(out, "train.threads=2147483647")) == 2
    one_line_error(capsys, "train.threads")
    assert not out.exists()
    assert main(argv_train(out, "train.seed=1")) == 0   # and nothing blocks a fresh run there


@pytest.mark.parametrize("items", [
    ["model.hidden=2000000000,2000000000"],
    ["plugins=trlearner", "train.meta_batch_size=4", "plugin_args.trlearner.heads=2000000000"],
    pytest.param(["plugins=cxgrad", "plugin_args.cxgrad.context_dim=2000000000", "model.name=conv4"],
                 marks=pytest.mark.data),
    ["benchmark.shots=2000000000"],
    ["eval.meta_batch_size=2000000000"],
], ids=["hidden", "trlearner.heads", "cxgrad.context_dim", "shots", "eval.meta_batch_size"])
def test_sizes_that_cannot_be_allocated_are_one_line_before_anything_is_written(items, tmp_path, capsys):
    out, config = tmp_path / "r", "sinusoid-10shot"
    if "plugins=cxgrad" in items:   # CxGrad needs a Conv4: Omniglot
        root = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
        if not root.is_dir():
            pytest.skip("the shared Omniglot copy is not here")
        config, items = "omniglot-5w1s-cpu", [*items, f"benchmark.data_root={root}"]
    with memory_cap():
        assert main([*argv_train(out, *items, config=config), "--dry-run"]) == 2
        one_line_error(capsys, "cannot build")
        assert main(argv_train(out, *items, config=config)) == 2
        one_line_error(capsys, "cannot build")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 4, 18-20. studies
def study_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "s.toml"
    path.write_text('presets = ["sinusoid-10shot"]\nmethods = ["maml"]\nset = ["train.iterations=2", '
                    '"train.meta_batch_size=2", "train.val_every=0", "eval.tasks=2", "train.threads=1"]\n' + body)
    return str(path)


@pytest.mark.parametrize("body, piece", [('seeds = "1"\n', "seeds"), ("seeds = 1.5\n", "seeds"),
                                         ("folds = 5\n", "folds"), ('preset_set = ["x"]\n', "preset_set"),
                                         ("seeds = 0\n", "seeds"), (f"seeds = {HUGE}\n", "s.toml")])
def test_study_files_of_the_wrong_types_are_one_line(body, piece, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", study_file(tmp_path, body), "--out", str(out), "--no-report"]) == 2
    one_line_error(capsys, piece)
    assert not out.exists()


def test_a_string_of_presets_is_not_read_letter_by_letter(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('presets = "sinusoid-10shot"\nmethods = ["maml"]\n')
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "presets", "list")


def test_a_study_with_an_unknown_method_is_refused_before_any_cell(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('presets = ["sinusoid-10shot"]\nmethods = ["maml", "mmal"]\nset = ["train.iterations=2"]\n')
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 2
    one_line_error(capsys, "mmal")
    assert not out.exists()


def test_seeds_have_an_upper_bound(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", study_file(tmp_path, ""), "--seeds", "100000000", "--out", str(out)]) == 2
    one_line_error(capsys, "seeds")
    assert not out.exists()


@pytest.mark.parametrize("where", ["out", "keep"])
def test_a_damaged_study_json_is_named_before_the_first_cell(where, tmp_path, capsys):
    folder = tmp_path / where
    folder.mkdir()
    (folder / "study.json").write_text("{not json")
    argv = ["study", study_file(tmp_path, "seeds = 1\n"), "--out", str(tmp_path / "out"), "--no-report"]
    assert main([*argv, "--keep", str(tmp_path / "keep")] if where == "keep" else argv) == 2
    one_line_error(capsys, "study.json")
    assert not list(tmp_path.rglob("config.json"))   # no cell trained


# ------------------------------------------------------------------------------------------ cosmetic
@pytest.mark.parametrize("name", ["eval.json", "scores.json"])
def test_non_utf8_run_files_are_named(name, done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / name).write_bytes(b"\xff\xfe" + (run / name).read_bytes())
    assert main(["eval", str(run), "--tasks", "2"]) == 2
    one_line_error(capsys, name, "UTF-8")


def test_non_utf8_metrics_line_is_set_aside_by_name(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"\xff" + lines[0] + b"".join(lines[1:]))
    assert main(resume(run)) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl line 1" in err and "Traceback" not in err


def test_report_names_a_non_utf8_metrics_line(done, tmp_path, capsys):
    # The case: report (not --resume) on a metrics line that is not UTF-8 named no file before.
    run = copy_of(done, tmp_path)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"\xff" + lines[0] + b"".join(lines[1:]))
    assert main(["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl: line 1" in err and "codec" not in err and "Traceback" not in err
    assert (tmp_path / "rep" / "report.md").is_file()


def test_string_scores_are_named(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    scores = json.loads((run / "scores.json").read_text())
    (run / "scores.json").write_text(json.dumps({k: ["x"] * len(v) for k, v in scores.items()}))
    assert main(["report", str(run), "--no-compute", "--out", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, "scores.json")


def test_report_checks_before_making_its_folder(done, tmp_path, capsys):
    run = copy_of(done, tmp_path)
    (run / "eval.json").write_text("[1, 2]")
    out = tmp_path / "rep"
    assert main(["report", str(run), "--no-compute", "--out", str(out)]) == 2
    one_line_error(capsys, "eval.json")
    assert not out.exists()
