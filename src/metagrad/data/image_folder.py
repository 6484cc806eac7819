"""``image_folder``: few-shot episodes over any folder of class folders of images, from the command line too.

Two layouts under ``root``:

* ``root/train/<class>/*``, ``root/val/<class>/*``, ``root/test/<class>/*``: the splits as the folders give them
  (a class folder name may appear in one split only);
* ``root/<class>/*`` alone: the class folders are split by ``fractions`` (train, val, test), with a permutation
  of the sorted class names seeded by ``split_seed``, as :func:`metagrad.data.from_tensors` splits labels.

Images (jpg, png, bmp, gif, webp) are decoded once with PIL to ``uint8 [channels, image_size, image_size]``
(RGB, or grayscale for one channel), cached like the other folder benchmarks, and are float32 in [0, 1] in
episodes. Folders and files whose names start with "." are skipped.

Example:
    metagrad train --config omniglot-5w1s --data-root DIR --set benchmark.name=image_folder \\
        --set benchmark.image_size=28 --set benchmark.kwargs.channels=1 --set 'benchmark.kwargs.fractions=[0.6,0.2,0.2]'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import register
from .base import SPLITS
from .cache import cached
from .errors import DataError
from .folders import files_digest, images_in
from .images import (
    ImageEpisodes,
    ImagePool,
    check_episodes,
    check_split_name,
    decode_image,
    fill_parallel,
    resample_filter,
)
from .user import classes_of_split

LAYOUT = "DIR/train|val|test/<class>/*.png|jpg, or DIR/<class>/*.png|jpg with benchmark.kwargs.fractions"


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_classes(root: Path, split: str, fractions: Sequence[float] | None,
                 split_seed: int) -> tuple[list[str], list[list[Path]]]:
    """Class names and image files of ``split`` in either layout; a one-line DataError naming the fix otherwise."""
    top = _class_dirs(root)
    if not top:
        raise DataError(f"image_folder: {str(root)!r} holds no folders: expected {LAYOUT}")
    split_dirs = [d for d in top if d.name in SPLITS]
    if split_dirs:
        if fractions is not None:
            raise DataError(f"image_folder: {str(root)!r} already has split folders "
                            f"({', '.join(d.name for d in split_dirs)}): drop benchmark.kwargs.fractions")
        if len(split_dirs) != len(top):
            other = next(d.name for d in top if d.name not in SPLITS)
            raise DataError(f"image_folder: {str(root)!r} mixes split folders with the folder {other!r}: keep "
                            "only train/ val/ test/ there, or only class folders")
        if not (root / split).is_dir():
            raise DataError(f"image_folder: no {split}/ folder under {str(root)!r}: add one with class folders")
        seen: dict[str, str] = {}
        for d in split_dirs:
            for c in _class_dirs(d):
                if c.name in seen:
                    raise DataError(f"image_folder: class folder {c.name!r} is in both {seen[c.name]}/ and {d.name}/: "
                                    "keep each class in one split only")
                seen[c.name] = d.name
        dirs = _class_dirs(root / split)
    else:
        if fractions is None:
            raise DataError(f"image_folder: {str(root)!r} has class folders but no train/ val/ test/ folders: set "
                            "benchmark.kwargs.fractions (e.g. [0.6,0.2,0.2]) to split the classes")
        if (isinstance(fractions, str | bytes) or not isinstance(fractions, Sequence) or len(fractions) != 3
                or not all(isinstance(f, int | float) and 0 <= f <= 1 for f in fractions)
                or abs(sum(fractions) - 1) > 1e-6):
            raise DataError(f"image_folder: benchmark.kwargs.fractions must be three fractions (train, val, test) "
                            f"in [0, 1] summing to 1, e.g. [0.6,0.2,0.2]; got {fractions!r}")
        names = [d.name for d in top]
        chosen = classes_of_split(tuple(fractions), torch.arange(len(names)), split, split_seed)
        dirs = [top[i] for i in chosen]
    return [d.name for d in dirs], [images_in(d) for d in dirs]


@register("image_folder")
class ImageFolder(ImageEpisodes):
    """N-way K-shot episodes over the class folders under ``root`` (see the module doc for the layouts).

    Args:
        split: "train" | "val" | "test".
        ways, shots, queries: N-way K-shot with Q query images per class.
        meta_batch_size: tasks per TaskBatch.
        seed: the stream's seed.
        root: the folder holding the split folders or the class folders.
        image_size: side of the square decoded images (default 84).
        channels: 3 (RGB) or 1 (grayscale).
        fractions: (train, val, test) fractions of the class folders when ``root`` has no split folders.
        split_seed: seed of the permutation that splits the classes by ``fractions``.
        resample: PIL filter for resizing: "lanczos" | "bilinear" | "nearest".
        cache_dir: where the decoded uint8 cache goes (default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).

    Example:
        >>> bench = metagrad.data.create("image_folder", "train", ways=5, shots=1, root="my_images",
        ...                              fractions=(0.6, 0.2, 0.2), image_size=28, channels=1)
    """

    def __init__(self, split: str = "train", ways: int = 5, shots: int = 1, queries: int = 15,
                 meta_batch_size: int = 32, seed: int = 0, root: str | os.PathLike[str] | None = None, *,
                 image_size: int = 84, channels: int = 3, fractions: Sequence[float] | None = None,
                 split_seed: int = 0, resample: str = "lanczos",
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        check_split_name("image_folder", split)
        if channels not in (1, 3):
            raise DataError(f"image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if root is None:
            raise DataError(f"image_folder: no data root: pass --data-root DIR (root=DIR), {LAYOUT}")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"image_folder: data root {str(path)!r} does not exist or is not a folder: pass the "
                            f"folder that holds {LAYOUT}")
        size = int(image_size)
        resample_filter(resample)
        names, files = list_classes(path, split, fractions, split_seed)
        flat = [p for fs in files for p in fs]
        key = {"data": "image_folder", "split": split, "image_size": size, "channels": channels,
               "resample": resample, "files": files_digest(path, names, files)}

        def build() -> dict[str, object]:
            out = np.empty((len(flat), channels, size, size), np.uint8)
            if flat:
                fill_parallel(out, lambda i: decode_image(flat[i], size, resample, channels))
            return {"images": torch.from_numpy(out), "names": names}

        counts = torch.tensor([len(fs) for fs in files], dtype=torch.long)
        if not names:
            raise DataError(f"image_folder: the {split} split has no class folders: give it some (a larger fraction "
                            "in benchmark.kwargs.fractions, or class folders under its split folder)")
        check_episodes("image_folder", split, ways, shots, queries, counts, names)  # before decoding anything
        self.cache = cached(f"image_folder-{split}-{size}-{channels}", key, build, path, cache_dir)
        pool = ImagePool(self.cache.data["images"], torch.cumsum(counts, 0) - counts, counts, names)
        self.root = path
        super().__init__(pool, name="image_folder", split=split, ways=ways, shots=shots, queries=queries,
                         meta_batch_size=meta_batch_size, seed=seed)
