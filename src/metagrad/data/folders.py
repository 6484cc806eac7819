"""Folder benchmarks: mini-ImageNet, tiered-ImageNet, CUB, CIFAR-FS and FC100 from images the user brings.

Layouts accepted under ``root`` (the first that exists wins, per class):

* class folders: ``root/<class>/*.jpg|png`` or ``root/<split>/<class>/*``;
* class folders under their group: ``root/<group>/<class>/*`` or ``root/<split>/<group>/<class>/*``, where the
  group is the tiered-ImageNet category synset or the CIFAR-100 superclass (CIFAR-FS, FC100);
* mini-ImageNet only: ``root/images/*.jpg`` with ``root/<split>.csv`` rows ``filename,label``; without the csv,
  the images whose file name starts with a class synset (``n01532829…jpg``) belong to that class.

Class names are those of the standard split lists shipped in ``metagrad/data/splits/``: mini-ImageNet Ravi &
Larochelle synsets (64/16/20); tiered-ImageNet synsets (351/97/160, grouped by category); CUB folder names such as
``001.Black_footed_Albatross`` (100/50/50); CIFAR-FS fine labels such as ``aquarium_fish`` (64/16/20); FC100 the
fine labels of its superclasses (12/4/4 superclasses = 60/20/20 classes). Images become RGB ``uint8``, resized with
PIL to 84x84 (32x32 for CIFAR-FS and FC100), cached once, and float32 in [0, 1] in episodes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import register
from .cache import cached
from .errors import DataError
from .images import (
    ImageEpisodes,
    ImagePool,
    check_split_name,
    decode_rgb,
    fill_parallel,
    resample_filter,
    resolve_root,
    split_file,
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
ClassList = list[tuple[str, str | None]]  # (class folder name, group folder name or None)


def _json(name: str) -> list[Any]:  # the split files hold plain JSON lists
    return json.loads(split_file(name).read_text())


def mini_imagenet_classes(split: str) -> ClassList:
    return [(s, None) for s in split_file(f"mini_imagenet_{split}.txt").read_text().split()]


def tiered_imagenet_classes(split: str) -> ClassList:
    with open(split_file(f"tiered_imagenet_{split}.csv"), newline="") as f:
        return [(row[0], row[1]) for row in csv.reader(f) if row]


def cub_classes(split: str) -> ClassList:
    return [(c, None) for c in _json(f"cub_{split}.json")]


def cifar_fs_classes(split: str) -> ClassList:
    return [(fine, coarse) for coarse, fine in _json(f"cifar_fs_{split}.json")]


def cifar100_superclasses() -> dict[str, list[str]]:
    """CIFAR-100 superclass -> its 5 fine classes, from the union of the three CIFAR-FS lists (all 100 classes)."""
    groups: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        for fine, coarse in cifar_fs_classes(split):
            groups.setdefault(coarse or "", []).append(fine)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def fc100_classes(split: str) -> ClassList:
    groups = cifar100_superclasses()
    return [(fine, coarse) for coarse in _json(f"fc100_{split}.json") for fine in groups[coarse]]


@dataclass(frozen=True)
class FolderSpec:
    """What differs between folder benchmarks: the name, the image side and the class list of each split."""

    name: str
    image_size: int
    classes: Callable[[str], ClassList]
    layout: str


SPECS = {s.name: s for s in (
    FolderSpec("mini_imagenet", 84, mini_imagenet_classes, "root/<synset>/*.jpg or root/images/*.jpg + root/<split>.csv"),
    FolderSpec("tiered_imagenet", 84, tiered_imagenet_classes, "root/<synset>/*.jpg or root/<category>/<synset>/*.jpg"),
    FolderSpec("cub", 84, cub_classes, "root/<NNN.Class_Name>/*.jpg (CUB_200_2011/images)"),
    FolderSpec("cifar_fs", 32, cifar_fs_classes, "root/<fine>/*.png or root/<superclass>/<fine>/*.png"),
    FolderSpec("fc100", 32, fc100_classes, "root/<fine>/*.png or root/<superclass>/<fine>/*.png"),
)}


def images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _csv_layout(root: Path, split: str, classes: ClassList) -> dict[str, list[Path]]:
    """mini-ImageNet's ``images/`` folder, split by ``root/<split>.csv`` or, lacking it, by file-name prefix."""
    wanted = {c for c, _ in classes}
    out: dict[str, list[Path]] = {c: [] for c in wanted}
    table = root / f"{split}.csv"
    if table.is_file():
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("label") in wanted:
                    out[row["label"]].append(root / "images" / row["filename"])
    else:
        for p in images_in(root / "images"):
            if p.name[:9] in wanted:
                out[p.name[:9]].append(p)
    return {c: sorted(v) for c, v in out.items()}


def list_split(spec: FolderSpec, root: Path, split: str) -> tuple[list[str], list[list[Path]]]:
    """Class names and image files of ``split``; a DataError naming the first missing class otherwise."""
    classes = spec.classes(split)
    by_csv = _csv_layout(root, split, classes) if spec.name == "mini_imagenet" and (root / "images").is_dir() else {}
    files, missing = [], []
    for cls, group in classes:
        found = by_csv.get(cls)
        if not found:
            places = [root / split / cls, root / cls]
            if group:
                places += [root / group / cls, root / split / group / cls]
            found = next((images_in(d) for d in places if d.is_dir()), [])
        if not found:
            missing.append(cls)
        files.append(found)
    if missing:
        raise DataError(f"{spec.name}: {len(missing)} of the {len(classes)} {split} classes have no images under "
                        f"{str(root)!r} (first: {missing[0]}): expected {spec.layout}; pass the right root")
    lost = [p for fs in files for p in fs if not p.is_file()]
    if lost:
        raise DataError(f"{spec.name}: {len(lost)} images listed in {split}.csv are missing (first: {lost[0]}): "
                        "copy the images again or fix the csv")
    return [c for c, _ in classes], files


def files_digest(root: Path, names: list[str], files: list[list[Path]]) -> str:
    """A digest of every class's files (name, size, mtime): the cache key part that changes with the data."""
    h = hashlib.blake2b(digest_size=16)
    for name, fs in zip(names, files):
        h.update(f"{name}\0{len(fs)}\n".encode())
        for p in fs:
            st = p.stat()
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FolderBenchmark(ImageEpisodes):
    """N-way K-shot episodes over class folders of RGB images (base of the registered folder benchmarks).

    Args:
        split: "train" | "val" | "test" (class-disjoint, from the shipped standard split lists).
        ways, shots, queries: N-way K-shot, Q query images per class.
        meta_batch_size: tasks per TaskBatch.
        seed: the stream's seed.
        root: the folder holding the images (see the module doc); default ``default_root(name)``.
        image_size: side of the square images (default 84, or 32 for CIFAR-FS and FC100).
        resample: PIL filter for resizing: "lanczos" | "bilinear" | "nearest".
        cache_dir: where the decoded uint8 cache goes (default: next to the data if writable, else
            ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).
    """

    spec: FolderSpec

    def __init__(self, split: str = "train", ways: int = 5, shots: int = 1, queries: int = 15,
                 meta_batch_size: int = 32, seed: int = 0, root: str | os.PathLike[str] | None = None, *,
                 image_size: int | None = None, resample: str = "lanczos",
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        spec = self.spec
        check_split_name(spec.name, split)
        size = int(image_size or spec.image_size)
        resample_filter(resample)
        path = resolve_root(spec.name, root, spec.layout)
        names, files = list_split(spec, path, split)
        flat = [p for fs in files for p in fs]
        key = {"data": spec.name, "split": split, "image_size": size, "resample": resample,
               "files": files_digest(path, names, files)}

        def build() -> dict[str, object]:
            out = np.empty((len(flat), 3, size, size), np.uint8)
            fill_parallel(out, lambda i: decode_rgb(flat[i], size, resample))
            return {"images": torch.from_numpy(out), "names": names}

        self.cache = cached(f"{spec.name}-{split}-{size}", key, build, path, cache_dir)
        counts = torch.tensor([len(fs) for fs in files], dtype=torch.long)
        pool = ImagePool(self.cache.data["images"], torch.cumsum(counts, 0) - counts, counts, names)
        self.root = path
        super().__init__(pool, name=spec.name, split=split, ways=ways, shots=shots, queries=queries,
                         meta_batch_size=meta_batch_size, seed=seed)


@register("mini_imagenet")
class MiniImageNet(FolderBenchmark):
    """mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split, 84x84.

    Example:
        >>> bench = metagrad.data.create("mini_imagenet", "train", ways=5, shots=1, root="data/mini-imagenet")
    """

    spec = SPECS["mini_imagenet"]


@register("tiered_imagenet")
class TieredImageNet(FolderBenchmark):
    """tiered-ImageNet (Ren et al. 2018), class folders named by synset, 84x84.

    Example:
        >>> bench = metagrad.data.create("tiered_imagenet", "test", ways=5, shots=5, root="data/tiered")
    """

    spec = SPECS["tiered_imagenet"]


@register("cub")
class CUB(FolderBenchmark):
    """CUB-200-2011 birds with the Hilliard et al. (2018) 100/50/50 class split, 84x84.

    Example:
        >>> bench = metagrad.data.create("cub", "test", ways=5, shots=1, root="CUB_200_2011/images")
    """

    spec = SPECS["cub"]


@register("cifar_fs")
class CIFARFS(FolderBenchmark):
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 classes split 64/16/20, 32x32.

    Example:
        >>> bench = metagrad.data.create("cifar_fs", "train", ways=5, shots=1, root="data/cifar100")
    """

    spec = SPECS["cifar_fs"]


@register("fc100")
class FC100(FolderBenchmark):
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass 12/4/4 (60/20/20 classes), 32x32.

    Example:
        >>> bench = metagrad.data.create("fc100", "train", ways=5, shots=1, root="data/cifar100")
    """

    spec = SPECS["fc100"]
