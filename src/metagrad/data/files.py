"""One read-only view of "files by relative name" over a folder or a zip, so each reader is written once."""

from __future__ import annotations

import os
import threading
import zipfile
import zlib
from pathlib import Path

from .errors import DataError


class FileTree:
    """The files under a folder, or inside a zip, by ``/``-separated name relative to it.

    Zips are read in place (never extracted). Reads are safe from several threads.

    Example:
        >>> tree = FileTree(Path("all_runs.zip"))
        >>> tree.read("run01/class_labels.txt")[:21]
        b'run01/test/item01.png'
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._local = threading.local()
        if self.path.is_dir():
            names = []
            for dirpath, _, files in os.walk(self.path):
                rel = os.path.relpath(dirpath, self.path)
                names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
            self.names = sorted(names)
        else:
            self._zip = self._open_zip()
            self.names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"{str(self.path)!r} is not a readable zip ({e}): it is corrupt or truncated; delete it "
                            "and download it again (download=True) or copy it again") from e

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``; a DataError if it cannot be read (corrupt zip member, I/O error)."""
        try:
            if self._zip is None:
                return (self.path / name).read_bytes()
            # One ZipFile per thread: members are then decompressed truly in parallel.
            zf = getattr(self._local, "zip", None)
            if zf is None:
                zf = self._local.zip = self._open_zip()
            return zf.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
            raise DataError(f"cannot read {name!r} from {str(self.path)!r} ({e}): the data is corrupt or "
                            "truncated; delete it and download or copy it again") from e
