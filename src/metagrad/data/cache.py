"""The decoded-image cache: one ``torch.save`` file per (data, settings), found again by a content key.

A benchmark decodes its images once into compact ``uint8`` tensors; :func:`cached` stores them in
``$METAGRAD_CACHE`` (default ``~/.cache/metagrad``), never in the data folder (a cache shipped beside the data in
``<root>/.metagrad-cache`` is read, not written: a data folder is input, not scratch space), written atomically and
named by a hash of the source files' contents (archives) or folders' names, entry counts and mtimes (extracted
images), plus the decoding settings. Later starts load the file memory-mapped in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_VERSION = 1


# (path, inode, size, mtime, ctime) → content digest, once per process: ctime changes with every write and, unlike
# mtime, cannot be set back.
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes (Omniglot's two archives: about 6 MB, tens of milliseconds), memoised per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """A cache key part that changes with the data: each file's name and content digest.

    A folder is summarised per directory (relative name, number of entries, mtime) rather than per file: adding,
    removing or renaming a file changes its directory's mtime, and statting 1,700 directories instead of 32,000
    files keeps a cached start of an extracted Omniglot well under a second. Editing an image of an extracted
    folder in place is not seen: delete the cache file after doing that. Archives are read whole, so a changed
    archive never meets a cache of its old contents, whatever its name, size and time.
    """
    out: list[list[Any]] = []
    for p in paths:
        if p.is_dir():
            for dirpath, dirs, files in os.walk(p):
                st = os.stat(dirpath)
                out.append([os.path.relpath(dirpath, p), len(dirs) + len(files), st.st_mtime_ns])
        else:
            out.append([p.name, file_digest(p)])
    return sorted(out)


def cache_dirs(root: Path | None, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where caches are looked up and written, in order: ``cache_dir`` alone if given, else
    ``<root>/.metagrad-cache`` then ``$METAGRAD_CACHE`` (default ``~/.cache/metagrad``)."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    dirs = [root / ".metagrad-cache"] if root is not None else []
    env = os.environ.get("METAGRAD_CACHE")
    dirs.append(Path(env).expanduser() if env else Path.home() / ".cache" / "metagrad")
    return dirs


def _writable(d: Path) -> bool:
    # Respect read-only permission bits even when running as root (os.access says yes to root): a shared data
    # folder marked read-only must never receive a cache.
    probe = d
    while not probe.exists() and probe != probe.parent:  # ~/.cache/metagrad on a fresh machine: ~/.cache decides
        probe = probe.parent
    try:
        return bool(probe.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(probe, os.W_OK)
    except OSError:
        return False


@dataclass
class Cached:
    """A loaded or freshly built cache entry: ``data``, the file it lives in (None if unwritable), ``hit``."""

    data: dict[str, Any]
    path: Path | None
    hit: bool


def cached(prefix: str, key: Any, build: Callable[[], dict[str, Any]], root: Path | None,
           cache_dir: str | os.PathLike[str] | None = None) -> Cached:
    """Load ``build()``'s result from the cache keyed by ``key``, or build it and write it atomically.

    Tensors are loaded memory-mapped, so a large cache opens in milliseconds and pages in as episodes touch it.
    """
    digest = hashlib.blake2b(json.dumps([CACHE_VERSION, key], sort_keys=True).encode(), digest_size=10).hexdigest()
    fname = f"{prefix}-{digest}.pt"
    dirs = cache_dirs(root, cache_dir)
    for d in dirs:
        if (d / fname).is_file():
            try:
                return Cached(torch.load(d / fname, mmap=True, weights_only=True), d / fname, True)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # rebuilt, never fatal
                warnings.warn(f"ignoring unreadable cache {d / fname}: {e}", stacklevel=2)
    data = build()
    for d in dirs:
        if (root is not None and cache_dir is None and d == root / ".metagrad-cache") or not _writable(d):
            continue
        tmp = d / f".{fname}.{os.getpid()}.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            torch.save(data, tmp)
            os.replace(tmp, d / fname)  # atomic: a reader never sees a half-written cache
            return Cached(data, d / fname, False)
        except OSError:
            tmp.unlink(missing_ok=True)
    warnings.warn(f"no writable cache folder among {[str(d) for d in dirs]}: set METAGRAD_CACHE", stacklevel=2)
    return Cached(data, None, False)
