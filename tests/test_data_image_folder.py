"""The generic ``image_folder`` benchmark: both layouts, grayscale or RGB, the cache, one-line errors, and
train / resume / eval / study / report from the command line on a tiny generated folder of PNGs.

Each generated image is one flat colour: red = 20 x class number, green = 40 x image number, so an episode can be
checked for class purity and for which split's classes it holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from metagrad import data
from metagrad.cli import main
from metagrad.data import DataError

CLASSES, PER_CLASS = 10, 5


def write_class(folder: Path, c: int, n: int = PER_CLASS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        Image.new("RGB", (12, 14), (20 * c, 40 * j, 128)).save(folder / f"{j}.png")  # not square: resized


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    for c in range(CLASSES):
        write_class(tmp_path / "flat" / f"class{c:02d}", c)
    (tmp_path / "flat" / ".hidden").mkdir()  # skipped, like a cache folder
    (tmp_path / "flat" / "README.txt").write_text("not a class")
    return tmp_path / "flat"


@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    for c in range(CLASSES):
        write_class(tmp_path / "tree" / ("train" if c < 6 else "val" if c < 8 else "test") / f"class{c:02d}", c)
    return tmp_path / "tree"


def classes_in(b: data.Benchmark, channel: int = 0) -> set[int]:
    """The classes (from the red channel) drawn into batch 0, after checking every label holds one class."""
    t = b.batch(0)
    seen = set()
    for task in range(len(t)):
        xs, ys = torch.cat([t.support_x[task], t.query_x[task]]), torch.cat([t.support_y[task], t.query_y[task]])
        red = (xs[:, channel].mean((-2, -1)) * 255 / 20).round().long()
        per_label = [set(red[ys == y].tolist()) for y in range(b.ways)]
        assert all(len(s) == 1 for s in per_label)
        seen |= {next(iter(s)) for s in per_label}
    return seen


def make(root: Path, split: str, **kw: object) -> data.Benchmark:
    args = {"ways": 2, "shots": 1, "queries": 2, "meta_batch_size": 8, "seed": 0, "root": root, "image_size": 6}
    return data.create("image_folder", split, **{**args, **kw})


def test_split_folders_give_their_classes(split_tree: Path) -> None:
    b = make(split_tree, "train")
    assert b.class_names == [f"class{c:02d}" for c in range(6)]
    assert b.x_shape == (3, 6, 6) and classes_in(b) <= set(range(6))
    assert classes_in(make(split_tree, "test")) == {8, 9}
    t = b.batch(0)
    assert t.support_x.dtype == torch.float32 and 0 <= t.support_x.min() and t.support_x.max() <= 1


def test_fractions_split_class_folders_disjointly(flat: Path) -> None:
    names = {s: make(flat, s, fractions=[0.6, 0.2, 0.2]).class_names for s in ("train", "val", "test")}
    assert [len(names[s]) for s in names] == [6, 2, 2]
    assert sorted(names["train"] + names["val"] + names["test"]) == [f"class{c:02d}" for c in range(CLASSES)]
    assert make(flat, "val", fractions=[0.6, 0.2, 0.2], seed=5).class_names == names["val"]  # not the stream seed
    assert make(flat, "val", fractions=[0.6, 0.2, 0.2], split_seed=3).class_names != names["val"]
    assert classes_in(make(flat, "val", fractions=[0.6, 0.2, 0.2])) == {int(n[5:]) for n in names["val"]}


def test_grayscale_and_the_cache(flat: Path) -> None:
    b = make(flat, "train", fractions=[0.6, 0.2, 0.2], channels=1)
    assert b.x_shape == (1, 6, 6) and not b.cache.hit
    again = make(flat, "train", fractions=[0.6, 0.2, 0.2], channels=1)
    assert again.cache.hit and torch.equal(again.batch(1).query_x, b.batch(1).query_x)
    assert not make(flat, "train", fractions=[0.6, 0.2, 0.2], channels=3).cache.hit  # another decoding: rebuilt
    write_class(flat / "class10", 10)  # a new class folder changes the files: the cache is rebuilt
    assert not make(flat, "train", fractions=[0.6, 0.2, 0.2], channels=1).cache.hit


@pytest.mark.parametrize("case,match", [
    ("no_fractions", r"has class folders but no train/ val/ test/ folders: set benchmark.kwargs.fractions"),
    ("fractions_with_splits", r"already has split folders \(test, train, val\): drop benchmark.kwargs.fractions"),
    ("class_in_two_splits", r"class folder 'class07' is in both train/ and val/: keep each class in one split"),
    ("mixed", r"mixes split folders with the folder 'extra'"),
    ("bad_fractions", r"fractions must be three fractions \(train, val, test\) in \[0, 1\] summing to 1"),
    ("channels", r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
    ("too_few_classes", r"3-way episodes need 3 classes but the val split has 2: lower ways to at most 2"),
    ("too_few_images", r"class 'class03' of the train split has only 2 images: lower shots or queries"),
    ("no_root", r"no data root: pass --data-root DIR"),
])
def test_bad_folders_are_one_line_errors(case: str, match: str, flat: Path, split_tree: Path) -> None:
    root, kw, split = flat, {"fractions": [0.6, 0.2, 0.2]}, "train"
    if case == "no_fractions":
        kw = {}
    elif case in ("fractions_with_splits", "class_in_two_splits", "mixed"):
        root = split_tree
        if case == "class_in_two_splits":
            write_class(split_tree / "train" / "class07", 7)
            kw = {}
        elif case == "mixed":
            write_class(split_tree / "extra", 0)
            kw = {}
    elif case == "bad_fractions":
        kw = {"fractions": [0.6, 0.6, 0.2]}
    elif case == "channels":
        kw["channels"] = 2
    elif case == "too_few_classes":
        kw["ways"], split = 3, "val"
    elif case == "too_few_images":
        root, kw = split_tree, {}
        for p in sorted((split_tree / "train" / "class03").iterdir())[2:]:
            p.unlink()
    elif case == "no_root":
        root = None  # type: ignore[assignment]
    with pytest.raises(DataError, match=match) as e:
        make(root, split, **kw)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- command line
TINY = ["--set", "benchmark.name=image_folder", "--set", "benchmark.image_size=16", "--set",
        "benchmark.kwargs.channels=1", "--set", "benchmark.ways=2", "--set", "benchmark.queries=2",
        "--set", "eval.queries=2", "--set", "train.iterations=4", "--set", "train.meta_batch_size=2",
        "--set", "train.val_every=2", "--set", "train.val_tasks=4", "--set", "eval.tasks=4",
        "--set", "train.threads=1", "--set", "model.width=4", "--set", "train.log_every=2", "--no-progress"]


def test_train_resume_eval_study_report_from_the_command_line(flat: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["--data-root", str(flat), "--set", "benchmark.kwargs.fractions=[0.6,0.2,0.2]", *TINY]
    assert main(["train", "--config", "omniglot-5w1s-cpu", *args, "--out-dir", str(run)]) == 0
    assert main(["train", "--resume", "--out-dir", str(run), "--set", "train.iterations=6", "--no-progress"]) == 0
    assert (run / "checkpoint-00000006.pt").is_file()
    assert main(["eval", str(run), "--tasks", "4", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "image_folder" in out and "val" in out
    from metagrad.study import Study, run_study

    study = Study(name="folder", presets=["omniglot-5w1s-cpu"], methods=["maml", "meta_gna"], seeds=1,
                  set=[f"benchmark.data_root={flat}", "benchmark.kwargs.fractions=[0.6,0.2,0.2]",
                       *[s for s in TINY if s.startswith(("benchmark", "eval", "train", "model"))]])
    run_study(study, tmp_path / "study", report=False, progress=False)
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "rep"), "--no-compute"]) == 0
    assert "meta_gna" in (tmp_path / "rep" / "report.md").read_text()


def test_split_folders_from_the_command_line(split_tree: Path, tmp_path: Path) -> None:
    assert main(["train", "--config", "omniglot-5w1s-cpu", "--data-root", str(split_tree), *TINY,
                 "--set", "benchmark.kwargs.channels=3", "--out-dir", str(tmp_path / "run")]) == 0
    assert main(["train", "--config", "omniglot-5w1s-cpu", "--data-root", str(split_tree), *TINY,
                 "--set", "benchmark.kwargs.channels=2", "--out-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
