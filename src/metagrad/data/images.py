"""Shared machinery of the image benchmarks: data roots, decoding and the vectorised episode sampler.

Every image benchmark (Omniglot, the folder benchmarks, MNIST) decodes its files once into one compact
``uint8`` tensor ``[N, C, H, W]`` (classes stored one after another), caches it with ``torch.save``, and then
draws N-way K-shot episodes by advanced indexing into that tensor: no per-image Python on the hot path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..tasks import TaskBatch
from .base import SPLITS, Benchmark, generator
from .errors import DataError

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
RESAMPLE_NAMES = ("lanczos", "bilinear", "nearest")


# ----------------------------------------------------------------------------------------------- roots
def default_root(name: str) -> Path | None:
    """The data folder of benchmark ``name`` when none is given, or None.

    Tries ``$METAGRAD_DATA/<name>``, then ``shared/data/<name>`` in the current directory or any parent, then
    the same next to or above this package (an editable install inside the project tree). ``name`` is also
    tried with ``-`` for ``_`` (``mini_imagenet`` finds ``mini-imagenet``).
    """
    names = dict.fromkeys([name, name.replace("_", "-")])
    env = os.environ.get("METAGRAD_DATA")
    if env:
        for n in names:
            if (Path(env).expanduser() / n).is_dir():
                return Path(env).expanduser() / n
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            for n in names:
                if (d / "shared" / "data" / n).is_dir():
                    return d / "shared" / "data" / n
    return None


def resolve_root(name: str, root: str | os.PathLike[str] | None, hint: str) -> Path:
    """``root`` as an existing folder (the default one when None), or a DataError that says what to pass."""
    if root is None:
        found = default_root(name)
        if found is None:
            raise DataError(f"{name}: no data root given and none found: pass root=DIR ({hint}) or set "
                            f"METAGRAD_DATA to a folder holding {name}/")
        return found
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{name}: data root {str(path)!r} does not exist or is not a folder: pass root= the "
                        f"folder that holds {hint}")
    return path


def split_file(name: str) -> Path:
    """A split list shipped inside the package (``metagrad/data/splits/<name>``)."""
    return SPLITS_DIR / name


def check_split_name(bench: str, split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise DataError(f"{bench}: unknown split {split!r}: use one of {', '.join(allowed)}")
    return split


# ------------------------------------------------------------------------------------------- decoding
def resample_filter(name: str) -> int:
    """The PIL filter for ``name``: "lanczos" (default, antialiased), "bilinear" or "nearest"."""
    from PIL import Image

    filters = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST}
    if name not in filters:
        raise DataError(f"unknown resample {name!r}: use one of {', '.join(RESAMPLE_NAMES)}")
    return filters[name]


def resize_gray(ink: np.ndarray, size: int, resample: str) -> np.ndarray:
    """Resize one ``uint8 [H, W]`` image to ``[size, size]`` with PIL (no-op when it already has that size)."""
    from PIL import Image

    if ink.shape == (size, size):
        return ink
    return np.asarray(Image.fromarray(ink, "L").resize((size, size), resample_filter(resample)))


def decode_ink(data: bytes, size: int, resample: str, what: str) -> np.ndarray:
    """Decode a (1-bit or grayscale) PNG of dark ink on white into ``uint8 [size, size]`` with ink = 255."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            gray = np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot decode image {what}: {e}; the file is corrupt or truncated, replace it") from e
    # Going through "L" (not mode "1") lets PIL antialias: it forces NEAREST when resizing 1-bit images.
    return resize_gray(255 - gray, size, resample)


def decode_rgb(path: Path, size: int, resample: str) -> np.ndarray:
    """Decode any image file into ``uint8 [3, size, size]`` RGB."""
    return decode_image(path, size, resample, channels=3)


def decode_image(path: Path, size: int, resample: str, channels: int = 3) -> np.ndarray:
    """Decode any image file into ``uint8 [channels, size, size]``: RGB for 3 channels, grayscale ("L") for 1."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as im:
            img = im.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), resample_filter(resample))
            arr = np.asarray(img)
            return arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot decode image {str(path)!r}: {e}; the file is corrupt, replace or remove it") from e


def fill_parallel(out: np.ndarray, fn: Callable[[int], np.ndarray], workers: int | None = None) -> np.ndarray:
    """``out[i] = fn(i)`` for every i, on a few threads: PIL decoding and resizing release the GIL."""
    n = len(out)
    workers = max(1, min(8, workers or os.cpu_count() or 1))
    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            out[i] = fn(i)

    with ThreadPoolExecutor(workers) as ex:
        # list() re-raises the first worker exception (e.g. a DataError for a corrupt file) here.
        list(ex.map(run, bounds[:-1], bounds[1:]))
    return out


# -------------------------------------------------------------------------------------------- episodes
@dataclass
class ImagePool:
    """Classes stored back to back: class ``c`` is ``images[offsets[c] : offsets[c] + counts[c]]``.

    ``rotations[c]`` (optional) turns class ``c``'s images by ``k`` quarter turns (``torch.rot90``), which is how
    Omniglot's rotated classes share one copy of the pixels.
    """

    images: torch.Tensor  # uint8 [N, C, H, W] pixels (episodes hold them / 255); any other dtype is used as is
    offsets: torch.Tensor  # int64 [n_classes]
    counts: torch.Tensor  # int64 [n_classes]
    names: list[str]
    rotations: torch.Tensor | None = None
    _perms: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def rotation_perms(self) -> torch.Tensor:
        """``[4, C*H*W]``: row k maps a flattened image to its ``torch.rot90(img, k, dims=(-2, -1))``."""
        if self._perms is None:
            base = torch.arange(self.images[0].numel()).view(self.images.shape[1:])
            self._perms = torch.stack([torch.rot90(base, k, dims=(-2, -1)).reshape(-1) for k in range(4)])
        return self._perms


def draw_episodes(counts: torch.Tensor, g: torch.Generator, tasks: int, ways: int,
                  per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes and items of ``tasks`` class-balanced episodes, vectorised over tasks, classes and items.

    ``counts[c]`` is how many items class ``c`` holds. Returns ``cls [tasks, ways]`` (distinct classes in a
    random order: label ``j`` of a task is class ``cls[t, j]``) and ``pick [tasks, ways, per]`` (distinct item
    positions within each class, ``0 <= pick < counts[cls]``). Every benchmark of pooled classes draws through
    this one function, so its episodes depend on the generator alone.
    """
    # float64 keys: with float32, ties among thousands of keys are likely and topk's tie order is not a contract.
    cls = torch.rand(tasks, len(counts), generator=g, dtype=torch.float64).topk(ways, dim=1).indices
    width = int(counts.max())
    keys = torch.rand(tasks, ways, width, generator=g, dtype=torch.float64)
    keys = keys.masked_fill(torch.arange(width) >= counts[cls].unsqueeze(-1), -1.0)  # never past a class's end
    return cls, keys.topk(per, dim=-1).indices  # distinct items within each class


def split_episodes(x: torch.Tensor, shots: int) -> TaskBatch:
    """A TaskBatch from class-major items ``x [tasks, ways, shots + queries, *shape]``: the first ``shots`` of
    each class are the support set, the rest the query set; labels ``0..ways-1`` follow the class axis."""
    tasks, ways, per, *shape = x.shape
    labels = torch.arange(ways).unsqueeze(0).expand(tasks, ways)
    return TaskBatch(
        x[:, :, :shots].reshape(tasks, ways * shots, *shape),
        labels.repeat_interleave(shots, dim=1),
        x[:, :, shots:].reshape(tasks, ways * (per - shots), *shape),
        labels.repeat_interleave(per - shots, dim=1),
    )


def sample_episodes(pool: ImagePool, g: torch.Generator, tasks: int, ways: int, shots: int,
                    queries: int) -> TaskBatch:
    """``tasks`` class-balanced N-way K-shot episodes from ``pool``, vectorised over tasks, classes and images.

    Labels ``0..ways-1`` go to classes in a random order; the support (and query) set is class-major:
    ``support_y = [0]*shots + [1]*shots + ...``. ``uint8`` pixels become float32 in [0, 1] (``/ 255``); images
    of any other dtype are used as stored.
    """
    per = shots + queries
    cls, pick = draw_episodes(pool.counts, g, tasks, ways, per)
    n, shape = pool.images.shape[0], pool.images.shape[1:]
    x = pool.images.reshape(n, -1)[pool.offsets[cls].unsqueeze(-1) + pick]  # [T, ways, per, C*H*W]
    if pool.rotations is not None:
        # Rotate by one gather through precomputed pixel permutations: far cheaper than masked rot90 copies.
        perm = pool.rotation_perms()[pool.rotations[cls]]  # [T, ways, C*H*W]
        x = x.gather(-1, perm.unsqueeze(2).expand_as(x))
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)  # in [0, 1], ink = 1.0
    return split_episodes(x.view(tasks, ways, per, *shape), shots)


def check_episodes(name: str, split: str, ways: int, shots: int, queries: int, counts: torch.Tensor,
                   names: Sequence[object], unit: str = "images") -> None:
    """A one-line DataError naming the fix when ``split`` cannot provide ``ways``-way episodes of
    ``shots + queries`` items per class (``counts[c]`` items in class ``names[c]``)."""
    for arg, v in (("ways", ways), ("shots", shots), ("queries", queries)):
        if int(v) < 1:
            raise DataError(f"{name}: {arg} must be >= 1, got {v}")
    if ways > len(counts):
        raise DataError(f"{name}: {ways}-way episodes need {ways} classes but the {split} split has "
                        f"{len(counts)}: lower ways to at most {len(counts)}")
    fewest = int(counts.min())
    if shots + queries > fewest:
        worst = names[int(counts.argmin())]
        raise DataError(f"{name}: shots + queries = {shots + queries} but class {worst!r} of the {split} "
                        f"split has only {fewest} {unit}: lower shots or queries to sum to at most {fewest}")


class ImageEpisodes(Benchmark):
    """A seeded stream of N-way K-shot episodes over an :class:`ImagePool` (the base of every image benchmark).

    Example:
        >>> bench = metagrad.data.create("omniglot", "train", ways=5, shots=1, queries=15, meta_batch_size=32)
        >>> b = bench.batch(0)   # b.support_x: float32 [32, 5, 1, 28, 28], b.support_y: int64 [32, 5]
        >>> bench.x_shape, bench.out_dim, bench.num_classes
        ((1, 28, 28), 5, 4112)
    """

    task_type = "classification"

    def __init__(self, pool: ImagePool, *, name: str, split: str, ways: int, shots: int, queries: int,
                 meta_batch_size: int, seed: int) -> None:
        super().__init__(split, meta_batch_size, seed)
        check_episodes(name, split, ways, shots, queries, pool.counts, pool.names)
        self.pool = pool
        self.name = name
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.x_shape = tuple(pool.images.shape[1:])
        self.out_dim = self.ways

    @property
    def num_classes(self) -> int:
        """How many classes the split holds (Omniglot-Vinyals: character x rotation)."""
        return len(self.pool)

    @property
    def class_names(self) -> list[str]:
        """The split's class names, e.g. ``Angelic/character01/rot090`` or a synset."""
        return list(self.pool.names)

    def batch(self, index: int) -> TaskBatch:
        g = generator(self.name, self.seed, self.split, int(index))
        return sample_episodes(self.pool, g, self.meta_batch_size, self.ways, self.shots, self.queries)
