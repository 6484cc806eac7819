"""Folder benchmarks on small generated images laid out like the real datasets (their images cannot be fetched).

Each generated image is one flat colour: red = class position in the split list, green = image number, so a
drawn episode can be checked for class purity without any real data. Every class of the real (shipped) test split
lists gets a folder with a few tiny images.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad import data
from metagrad.data import folders
from metagrad.data.errors import DataError

SHARED = Path(os.environ.get("METAGRAD_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "fewshot-splits"
SPLITS = ("train", "val", "test")
PER_CLASS = 4
COUNTS = {"mini_imagenet": (64, 16, 20), "tiered_imagenet": (351, 97, 160), "cub": (100, 50, 50),
          "cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}


def one_line_error(match: str, fn: Callable[..., object], *args: object, **kw: object) -> None:
    with pytest.raises(DataError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def write_images(folder: Path, cls_index: int, n: int = PER_CLASS, size: int = 40, ext: str = ".png",
                 prefix: str = "", step: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j in range(n):
        p = folder / f"{prefix}{j:08d}{ext}"
        Image.new("RGB", (size, size + 6), (cls_index * step, 40 * j, 128)).save(p)  # non-square: resizing is exercised
        out.append(p)
    return out


def make_tree(name: str, root: Path, layout: str = "flat", split: str = "test") -> list[tuple[str, str | None]]:
    """Folders for every class of ``split`` of benchmark ``name`` under ``root`` in ``layout``."""
    classes = folders.SPECS[name].classes(split)
    for i, (cls, group) in enumerate(classes):
        where = {"flat": root / cls, "grouped": root / str(group) / cls, "split": root / split / cls}[layout]
        write_images(where, i, size=32 if name in ("cifar_fs", "fc100") else 40)
    return classes


def check_episodes(b: data.Benchmark, ways: int = 5, shots: int = 1, queries: int = 2, step: int = 1) -> None:
    t = b.batch(0)
    size = b.x_shape[-1]
    assert t.support_x.shape == (b.meta_batch_size, ways * shots, 3, size, size)
    assert t.query_x.shape == (b.meta_batch_size, ways * queries, 3, size, size)
    assert t.support_x.dtype == torch.float32 and 0 <= t.support_x.min() and t.support_x.max() <= 1
    for task in range(len(t)):
        xs = torch.cat([t.support_x[task], t.query_x[task]])
        ys = torch.cat([t.support_y[task], t.query_y[task]])
        assert torch.equal(torch.bincount(ys, minlength=ways), torch.full((ways,), shots + queries))
        red = (xs[:, 0].mean((-2, -1)) * 255 / step).round()
        per_label = [set(red[ys == y].tolist()) for y in range(ways)]
        assert all(len(s) == 1 for s in per_label)  # one class per label
        assert len({next(iter(s)) for s in per_label}) == ways  # different classes per label


# ----------------------------------------------------------------------------------------- split lists
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_split_lists_counts_and_disjoint(name: str) -> None:
    lists = [folders.SPECS[name].classes(s) for s in SPLITS]
    assert tuple(len(c) for c in lists) == COUNTS[name]
    sets = [{c for c, _ in cl} for cl in lists]
    assert all(len(s) == len(cl) for s, cl in zip(sets, lists))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_fc100_superclasses_and_cifar_groups() -> None:
    groups = folders.cifar100_superclasses()
    assert len(groups) == 20 and all(len(v) == 5 for v in groups.values())
    supers = [{g for _, g in folders.fc100_classes(s)} for s in SPLITS]
    assert [len(s) for s in supers] == [12, 4, 4]


@pytest.mark.data
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared few-shot split lists not found")
def test_shipped_lists_equal_the_shared_ones() -> None:
    for s in SPLITS:
        with open(SHARED / f"mini-imagenet/ravi/{s}.csv", newline="") as f:
            labels = list(dict.fromkeys(row["label"] for row in csv.DictReader(f)))
        assert [c for c, _ in folders.mini_imagenet_classes(s)] == labels
        assert (SHARED / f"tiered-imagenet/{s}.csv").read_bytes() == folders.split_file(f"tiered_imagenet_{s}.csv").read_bytes()
        for name, shared in (("cub", "cub"), ("cifar_fs", "cifar-fs"), ("fc100", "fc100")):
            assert json.loads((SHARED / f"torchmeta/{shared}/{s}.json").read_text()) == json.loads(
                folders.split_file(f"{name}_{s}.json").read_text())


# ------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name,layout", [("mini_imagenet", "flat"), ("mini_imagenet", "split"),
                                         ("tiered_imagenet", "grouped"), ("cub", "flat"), ("cifar_fs", "flat"),
                                         ("cifar_fs", "grouped"), ("fc100", "grouped")])
def test_layouts_give_balanced_pure_episodes(name: str, layout: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))  # never the data folder itself
    classes = make_tree(name, tmp_path, layout)
    b = data.create(name, "test", ways=5, shots=1, queries=2, meta_batch_size=3, seed=1, root=tmp_path)
    size = 32 if name in ("cifar_fs", "fc100") else 84
    assert (b.task_type, b.x_shape, b.out_dim, b.name) == ("classification", (3, size, size), 5, name)
    assert b.class_names == [c for c, _ in classes] and b.pool.counts.eq(PER_CLASS).all()
    assert b.cache.path.parent == tmp_path / "cache" and not b.cache.hit
    assert not (tmp_path / ".metagrad-cache").exists()
    check_episodes(b)
    again = data.create(name, "test", ways=5, shots=1, queries=2, meta_batch_size=3, seed=1, root=tmp_path)
    assert again.cache.hit and torch.equal(again.batch(2).query_x, b.batch(2).query_x)
    assert not torch.equal(b.batch(0).support_x, b.batch(1).support_x)


def test_mini_imagenet_images_folder_with_and_without_csv(tmp_path: Path) -> None:
    classes = folders.mini_imagenet_classes("test")
    rows = []
    for i, (syn, _) in enumerate(classes):
        paths = write_images(tmp_path / "images", i, n=PER_CLASS + 1, ext=".jpg", prefix=syn, step=12)
        rows += [(p.name, syn) for p in paths[:PER_CLASS]]  # the csv leaves one image per class out
    by_prefix = data.create("mini_imagenet", "test", queries=2, meta_batch_size=2, root=tmp_path)
    assert by_prefix.pool.counts.eq(PER_CLASS + 1).all()
    with open(tmp_path / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    by_csv = data.create("mini_imagenet", "test", queries=2, meta_batch_size=2, root=tmp_path)
    assert by_csv.pool.counts.eq(PER_CLASS).all() and not by_csv.cache.hit  # other files: another cache
    check_episodes(by_csv, step=12)  # jpeg shifts colours a little: classes are 12 red levels apart


def test_cache_avoids_a_read_only_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cub"
    make_tree("cub", root)
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "env-cache"))
    os.chmod(root, 0o555)
    try:
        b = data.create("cub", "test", queries=2, meta_batch_size=2, root=root)
    finally:
        os.chmod(root, 0o755)
    assert b.cache.path.parent == tmp_path / "env-cache" and not (root / ".metagrad-cache").exists()
    assert not [p for p in (tmp_path / "env-cache").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input(tmp_path: Path) -> None:
    one_line_error("does not exist", data.create, "cub", "test", root=tmp_path / "missing")
    one_line_error("50 of the 50 test classes have no images .*expected root/", data.create, "cub", "test",
                   root=tmp_path)
    make_tree("cifar_fs", tmp_path)
    one_line_error("unknown split 'testing'", data.create, "cifar_fs", "testing", root=tmp_path)
    one_line_error("test split has 20: lower ways", data.create, "cifar_fs", "test", ways=21, root=tmp_path)
    one_line_error(f"only {PER_CLASS} images", data.create, "cifar_fs", "test", shots=2, queries=3, root=tmp_path)
    one_line_error("unknown resample", data.create, "cifar_fs", "test", resample="box", root=tmp_path)
    bad = tmp_path / folders.cifar_fs_classes("test")[0][0] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    one_line_error("cannot decode image .*broken.png", data.create, "cifar_fs", "test", root=tmp_path,
                   image_size=16)


def test_missing_csv_images(tmp_path: Path) -> None:
    syn = folders.mini_imagenet_classes("test")[0][0]
    (tmp_path / "images").mkdir()
    with open(tmp_path / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), (f"{syn}00000001.jpg", syn)])
    one_line_error("19 of the 20 test classes have no images", data.create, "mini_imagenet", "test", root=tmp_path)


def test_decode_rgb_shapes(tmp_path: Path) -> None:
    from metagrad.data.images import decode_rgb

    p = tmp_path / "x.png"
    Image.fromarray(np.full((10, 20), 200, np.uint8), "L").save(p)  # grayscale input becomes RGB
    out = decode_rgb(p, 8, "bilinear")
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8 and (out == 200).all()
