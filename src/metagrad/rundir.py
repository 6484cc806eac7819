"""Run-directory file primitives: the one atomic write, and OS errors that name their file.

Every run file (``config.json``, ``eval.json``, ``checkpoint*.pt``, a rewritten ``metrics.jsonl``) is written by
:func:`write_atomic`: a temporary file in the same folder, flushed and fsync'ed, then ``os.replace``d into place,
and removed on any failure (a full disk, a target that is a directory), so no failure leaves half a file or a
stray temporary one. :func:`describe` turns an ``OSError`` into the one line the command line prints.

Example:
    >>> write_atomic(run_dir / "eval.json", json.dumps(records))
    >>> with naming(run_dir / "metrics.jsonl"):
    ...     log.write(line)
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class RunFileWarning(UserWarning):
    """A run file was damaged; what could be kept was kept, and the warning says what was set aside."""


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    Raises:
        OSError: naming ``path`` (the temporary file is removed first).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    blob = data.encode() if isinstance(data, str) else data
    try:
        with naming(path):
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Give an ``OSError`` raised inside without a file name (a failed ``write``, ``flush``) the name ``path``."""
    try:
        yield
    except OSError as e:
        # No name, or a temporary file's: name the file it stands for.
        if e.filename is None or Path(str(e.filename)).name.startswith("."):
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise


def check_files(folder: str | os.PathLike[str], names: tuple[str, ...]) -> None:
    """Each of ``names`` that exists in ``folder`` is a regular file this process can read; else the OSError.

    Run before a run starts writing, so a run file that is a directory or unreadable stops it in one line.
    """
    for name in names:
        path = Path(folder) / name
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if path.exists():
            with open(path, "rb"):
                pass


# The fields every evaluation record has, and the JSON types they must have (report and resume rely on them).
RECORD_FIELDS: dict[str, tuple[type, ...]] = {"split": (str,), "metric": (str,), "inner_steps": (int,),
                                              "tasks": (int,), "mean": (int, float), "ci95": (int, float)}
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"iteration": (int,), "benchmark": (str,)}


def check_records(path: str | os.PathLike[str], records: object) -> list[dict]:
    """``records`` read from the evaluation file ``path``, checked: a list of objects with typed fields.

    Raises:
        ValueError: one line naming the file, the record (1-based) and the field.
    """
    if not isinstance(records, list):
        raise ValueError(  # noqa: TRY004 - bad file content, reported like every other bad input
            f"{path} must hold a list of evaluation records, got {type(records).__name__}")
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(  # noqa: TRY004 - as above
                f"{path}: record {n} must be an object with {', '.join(RECORD_FIELDS)}, got {r!r:.40}")
        for key, types in (*RECORD_FIELDS.items(), *OPTIONAL_FIELDS.items()):
            if key not in r:
                if key in RECORD_FIELDS:
                    raise ValueError(f"{path}: record {n} has no {key!r}; move the file away to start a fresh one")
                continue
            v = r[key]
            if isinstance(v, bool) or not isinstance(v, types):
                raise ValueError(  # noqa: TRY004 - as above
                    f"{path}: record {n}: {key} must be {' or '.join(t.__name__ for t in types)}, got {v!r:.40}")
    return records


_CAUSES = {errno.ENOSPC: "no space left on the device (disk full)",
           errno.EFBIG: "file too large (disk full or a file size limit)",
           errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "is a directory, expected a file",
           errno.ENOTDIR: "a part of the path is not a directory", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied (operation not permitted)", errno.EROFS: "read-only file system",
           errno.ENOENT: "no such file or directory", errno.EIO: "input/output error (failing disk?)"}


def describe(e: OSError) -> str:
    """One line for an OS error: the file, then the cause in plain words (disk full, is a directory, …)."""
    if not e.errno:  # raised by metagrad itself with its own message
        return str(e) or type(e).__name__
    cause = _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    where = str(e.filename) if e.filename is not None else "a run file"
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    return f"cannot use {where}: {cause} (errno {e.errno})"


__all__ = ["RunFileWarning", "check_files", "check_records", "describe", "naming", "write_atomic"]
