"""Omniglot (Lake et al., Science 2015) as N-way K-shot episodes: the Vinyals split with rotations, or Lake's.

The data root may hold, per set (``background``, ``evaluation``), any of: the official zip
(``images_background.zip``, or the shared ``images_background_rebuilt.zip``), its extracted folder
(``images_background/<Alphabet>/characterNN/XXXX_YY.png``), or the lossless npz (``images_background.npz``,
``images`` bool ``[n_chars, 20, 105, 105]``, True = white). All three give identical pixels: each image is
inverted so ink = 255, resized to ``image_size`` with PIL (LANCZOS by default, on the grayscale image) and kept
as ``uint8 [1623, 20, H, W]`` in a cache; episodes turn it into float32 in [0, 1] with ink = 1.0.
"""

from __future__ import annotations

import csv
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import register
from .cache import Cached, cached, fingerprint
from .download import OMNIGLOT_MD5, OMNIGLOT_URL, download_omniglot
from .errors import DataError
from .files import FileTree
from .images import (
    ImageEpisodes,
    ImagePool,
    check_split_name,
    decode_ink,
    default_root,
    fill_parallel,
    resample_filter,
    resize_gray,
    resolve_root,
    split_file,
)

SETS = ("background", "evaluation")
SOURCES = ("auto", "npz", "folder", "zip")
PROTOCOLS = ("vinyals", "lake")
DRAWINGS = 20
#: Lake protocol: these five background alphabets (the last five by official character id, 161 characters)
#: are held out as the val split; the other 25 (803 characters) are train; the evaluation set is test.
LAKE_VAL_ALPHABETS = ("N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Tagalog", "Tifinagh")
HINT = "images_background.zip/images_evaluation.zip, their extracted folders, or the .npz pair"
# images_<set>/<Alphabet>/characterNN/XXXX_YY.png; the images_<set>/ prefix is absent inside an extracted folder.
_PNG = re.compile(r"(?:^|/)(?:images_(background|evaluation)/)?([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


def alphabets() -> list[tuple[str, str, int, int]]:
    """``(set, alphabet, first_char_id, n_chars)`` for the 50 alphabets, in official character-id order."""
    with open(split_file("omniglot_alphabets.csv"), newline="") as f:
        return [(r["set"], r["alphabet"], int(r["first_id"]), int(r["n_chars"])) for r in csv.DictReader(f)]


def character_names(set_name: str) -> list[str]:
    """``Alphabet/characterNN`` for every character of ``set_name``, in official id order (= npz row order)."""
    return [f"{a}/character{j:02d}" for s, a, _, n in alphabets() if s == set_name for j in range(1, n + 1)]


def find_sources(root: Path, source: str = "auto") -> dict[str, tuple[str, Path]]:
    """Per set, the ``(form, path)`` to read: the npz if present, else the folder, else the zip (or ``source``)."""
    if source not in SOURCES:
        raise DataError(f"omniglot: unknown source {source!r}: use one of {', '.join(SOURCES)}")
    found: dict[str, tuple[str, Path]] = {}
    for s in SETS:
        forms = {"npz": [root / f"images_{s}.npz"], "folder": [root / f"images_{s}"],
                 "zip": [root / f"images_{s}.zip", root / f"images_{s}_rebuilt.zip"]}
        for form in (("npz", "folder", "zip") if source == "auto" else (source,)):
            hit = next((p for p in forms[form] if (p.is_dir() if form == "folder" else p.is_file())), None)
            if hit is not None:
                found[s] = (form, hit)
                break
    missing = [s for s in SETS if s not in found]
    if missing:
        what = "" if source == "auto" else f" in {source} form"
        raise DataError(f"omniglot: root {str(root)!r} has no images_{missing[0]} data{what}: it should hold "
                        f"{HINT}; pass the right root or download=True")
    return found


def read_npz(path: Path, set_name: str, size: int, resample: str) -> tuple[list[str], np.ndarray]:
    """Names and ink-is-255 ``uint8 [n, 20, size, size]`` images from an ``images_<set>.npz``."""
    import zipfile

    try:
        with np.load(path) as z:
            arr = z["images"]
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EIO):  # not the file's fault, so not "corrupt"
            raise
        raise DataError(f"omniglot: cannot read {str(path)!r} ({e}): it is corrupt or truncated, copy it again "
                        "or use the official zips") from e
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"omniglot: cannot read {str(path)!r} ({e}): it is corrupt or truncated, copy it again "
                        "or use the official zips") from e
    names = character_names(set_name)
    if arr.dtype != np.bool_ or arr.shape != (len(names), DRAWINGS, 105, 105):
        raise DataError(f"omniglot: {str(path)!r} holds images {arr.dtype}{list(arr.shape)}, expected bool"
                        f"[{len(names)}, 20, 105, 105]: it is not the Omniglot {set_name} npz")
    flat = arr.reshape(-1, 105, 105)
    out = np.empty((len(flat), size, size), np.uint8)
    resample_filter(resample)  # fail on a bad name before starting threads
    fill_parallel(out, lambda i: resize_gray((~flat[i]).view(np.uint8) * np.uint8(255), size, resample))
    return names, out.reshape(len(names), DRAWINGS, size, size)


def read_tree(path: Path, set_name: str, size: int, resample: str) -> tuple[list[str], np.ndarray]:
    """Names and images from an official zip or its extracted folder (also a subset of one, for tests)."""
    tree = FileTree(path)
    chars: dict[int, tuple[str, list[tuple[int, str]]]] = {}
    for n in tree.names:
        m = _PNG.search(n)
        if m and m.group(1) in (None, set_name):
            entry = chars.setdefault(int(m.group(4)), (f"{m.group(2)}/{m.group(3)}", []))
            entry[1].append((int(m.group(5)), n))
    if not chars:
        raise DataError(f"omniglot: {str(path)!r} holds no images_{set_name}/<Alphabet>/characterNN/XXXX_YY.png "
                        f"files: it is not an Omniglot {set_name} zip or folder")
    files: list[str] = []
    for cid in sorted(chars):  # official id order, the same order as the npz rows
        name, drawings = chars[cid]
        if len(drawings) != DRAWINGS:
            raise DataError(f"omniglot: {name} has {len(drawings)} drawings in {str(path)!r}, expected 20: the "
                            "data is incomplete; extract or download it again")
        files += [n for _, n in sorted(drawings)]
    out = np.empty((len(files), size, size), np.uint8)
    resample_filter(resample)
    fill_parallel(out, lambda i: decode_ink(tree.read(files[i]), size, resample, f"{files[i]} in {path}"))
    return [chars[c][0] for c in sorted(chars)], out.reshape(len(chars), DRAWINGS, size, size)


@dataclass
class Characters:
    """Every character found under a root: ``images`` uint8 ``[n_chars, 20, H, W]`` (ink = 255)."""

    names: list[str]
    images: torch.Tensor
    cache: Cached


def load_characters(root: Path, image_size: int = 28, resample: str = "lanczos", source: str = "auto",
                    cache_dir: str | os.PathLike[str] | None = None) -> Characters:
    """Decode both sets once (or load them from the cache) as one uint8 tensor."""
    sources = find_sources(root, source)
    resample_filter(resample)
    key = {"data": "omniglot", "image_size": image_size, "resample": resample,
           "sources": {s: [form, fingerprint([p])] for s, (form, p) in sources.items()}}

    def build() -> dict[str, object]:
        names: list[str] = []
        parts = []
        for s in SETS:
            form, path = sources[s]
            reader = read_npz if form == "npz" else read_tree
            n, imgs = reader(path, s, image_size, resample)
            names += n
            parts.append(torch.from_numpy(imgs))
        return {"images": torch.cat(parts), "names": names}

    c = cached(f"omniglot-{image_size}", key, build, root, cache_dir)
    return Characters(list(c.data["names"]), c.data["images"], c)


def split_classes(names: list[str], protocol: str, split: str) -> tuple[list[str], list[int], list[int]]:
    """Class names, character rows and quarter-turns of ``split`` under ``protocol``."""
    row = {n: i for i, n in enumerate(names)}
    if protocol == "vinyals":
        lines = split_file(f"omniglot_vinyals_{split}.txt").read_text().split()
        chars = [ln.rsplit("/", 1) for ln in lines]
        turns = [int(r[3:]) // 90 for _, r in chars]  # rot000/090/180/270 -> 0..3 (counter-clockwise)
        wanted = [c for c, _ in chars]
    else:
        def lake_split(alphabet: str, set_name: str) -> str:
            if set_name == "evaluation":
                return "test"
            return "val" if alphabet in LAKE_VAL_ALPHABETS else "train"

        wanted = [f"{a}/character{j:02d}" for s, a, _, n in alphabets() if lake_split(a, s) == split
                  for j in range(1, n + 1)]
        lines, turns = wanted, [0] * len(wanted)
    missing = [c for c in wanted if c not in row]
    if missing:
        raise DataError(f"omniglot: the data lacks {len(missing)} characters of the {protocol} {split} split "
                        f"(first: {missing[0]}): it is incomplete; extract or download it again")
    return lines, [row[c] for c in wanted], turns


@register("omniglot")
class Omniglot(ImageEpisodes):
    """Omniglot N-way K-shot episodes (Vinyals et al. 2016 split with rotations, as in MAML; or Lake's split).

    Args:
        split: "train" | "val" | "test" (class-disjoint).
        ways, shots, queries: N-way K-shot, Q query images per class (shots + queries <= 20).
        meta_batch_size: tasks per TaskBatch.
        seed: the stream's seed.
        root: the data folder (see the module doc); default ``default_root("omniglot")``.
        image_size: side of the square images (28 for MAML).
        protocol: "vinyals": 1028/172/423 characters x 4 rotations = 4112/688/1692 classes;
            "lake": background minus :data:`LAKE_VAL_ALPHABETS` / those alphabets / evaluation, no rotations.
        download: fetch the official zips into ``root`` if the data is not there.
        source: "auto" | "npz" | "folder" | "zip": which form to read when a root holds several.
        resample: PIL filter for resizing: "lanczos" | "bilinear" | "nearest".
        cache_dir: where the decoded uint8 cache goes (default: next to the data if writable, else
            ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``).
        download_url, download_md5: where to download from and the expected md5 per zip (for mirrors, tests).

    Example:
        >>> bench = metagrad.data.create("omniglot", "train", ways=5, shots=1, queries=15, meta_batch_size=32)
        >>> b = bench.batch(0)          # support_x float32 [32, 5, 1, 28, 28], ink = 1.0
        >>> bench.num_classes
        4112
    """

    def __init__(self, split: str = "train", ways: int = 5, shots: int = 1, queries: int = 15,
                 meta_batch_size: int = 32, seed: int = 0, root: str | os.PathLike[str] | None = None, *,
                 image_size: int = 28, protocol: str = "vinyals", download: bool = False, source: str = "auto",
                 resample: str = "lanczos", cache_dir: str | os.PathLike[str] | None = None,
                 download_url: str = OMNIGLOT_URL, download_md5: dict[str, str | None] | None = None) -> None:
        check_split_name("omniglot", split)
        if protocol not in PROTOCOLS:
            raise DataError(f"omniglot: unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if int(image_size) < 1:
            raise DataError(f"omniglot: image_size must be >= 1, got {image_size}")
        if download:
            root = ensure_downloaded(root, download_url, download_md5, source)
        path = resolve_root("omniglot", root, HINT)
        chars = load_characters(path, int(image_size), resample, source, cache_dir)
        names, rows, turns = split_classes(chars.names, protocol, split)
        n = len(rows)
        pool = ImagePool(
            images=chars.images.view(-1, 1, int(image_size), int(image_size)),
            offsets=torch.tensor(rows, dtype=torch.long) * DRAWINGS,
            counts=torch.full((n,), DRAWINGS, dtype=torch.long),
            names=names,
            rotations=torch.tensor(turns, dtype=torch.long) if protocol == "vinyals" else None,
        )
        self.root, self.protocol, self.cache = path, protocol, chars.cache
        super().__init__(pool, name="omniglot", split=split, ways=ways, shots=shots, queries=queries,
                         meta_batch_size=meta_batch_size, seed=seed)


def ensure_downloaded(root: str | os.PathLike[str] | None, url: str, md5: dict[str, str | None] | None,
                      source: str = "auto") -> Path:
    """The root to read, after fetching the official zips into it when it lacks either set."""
    if root is None:
        root = default_root("omniglot")
    if root is None:
        home = os.environ.get("METAGRAD_DATA")
        root = Path(home).expanduser() if home else Path.home() / ".cache" / "metagrad" / "data"
        root = root / "omniglot"
    path = Path(root).expanduser()
    try:
        find_sources(path)
    except DataError:
        sums = dict(OMNIGLOT_MD5) if md5 is None else dict(md5)
        download_omniglot(path, url, sums)
    return path
