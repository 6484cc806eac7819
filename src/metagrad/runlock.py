"""One writer per run directory: an exclusive lock held for the whole of a command that writes into a run.

``train`` (new or resumed), ``eval`` (it appends records), a study's cells and the diagnostics that ``report``
writes into a run each hold :func:`locked` on the run directory from before they read anything in it until
they return. A second writer at the same time stops at once with :class:`RunInUseError`, one line naming the
holder's process id (``metagrad`` exits with status 2), instead of interleaving its metrics with the first's
and overwriting its checkpoints.

The lock is the standard library's ``fcntl.flock`` on ``<run dir>/.metagrad.lock``. The kernel drops an
``flock`` when its holder exits however it ends (a SIGKILL, a power cut of the process), so a lock left by a
killed process never blocks the next run: the file stays, the lock does not (no stale-pid guessing, which a
lock file without ``flock`` would need, and no dependency). The file inside the run directory, not beside it:
the study scripts under ``benchmarks/`` hold their own ``flock`` on ``<run dir>.lock`` while a child process
trains the cell, and the two must not collide. Under ``metagrad train --nproc N`` the launching process holds
the lock and its torchrun workers inherit the right to write (``METAGRAD_RUN_LOCK``); under any torchrun, rank
0 alone takes it, since rank 0 alone writes. A process may take the same lock again (it is counted), so a study
cell that trains, evaluates and writes its diagnostics holds one lock throughout.

The lock file is removed when the lock is released (a killed holder's stays, unlocked, until the next run
removes it). A new run's directory is made when the lock is taken; if the command then fails before writing
anything, the empty directory is removed again, so a refused config still leaves nothing behind.

Example:
    >>> with locked("runs/sin10"):
    ...     train(cfg, "runs/sin10")
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".metagrad.lock"
ENV = "METAGRAD_RUN_LOCK"   # "<resolved run dir>:<pid of the launcher holding it>", set for torchrun workers
_held: dict[str, list[int]] = {}   # resolved run dir -> [file descriptor, times taken] in this process


class RunInUseError(ValueError):
    """Another process holds the run directory's lock; the message is one line naming its process id."""


def _key(run_dir: Path) -> str:
    return str(run_dir.resolve())


def _pid_in(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def in_use_message(run_dir: str | os.PathLike[str], pid: str) -> str:
    who = f"process {pid}" if pid else "another process"
    return (f"run directory {str(run_dir)!r} is in use by {who} (another metagrad command writing into it): "
            "wait for it to finish, or choose another directory")


def holder(run_dir: str | os.PathLike[str]) -> str | None:
    """The process id (as text, possibly empty) of another process holding the lock of ``run_dir``, or None when
    it is free or held by this process. Takes nothing and writes nothing (``--dry-run`` asks this)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and _key(run_dir) in _held:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd)
        return None
    finally:
        os.close(fd)


def _inherited(run_dir: Path) -> bool:
    """Whether a launcher holding this run's lock started this process (``metagrad train --nproc N``)."""
    where, _, pid = os.environ.get(ENV, "").rpartition(":")
    if where != _key(run_dir) or not pid.isdigit():
        return False
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if fd is None:
        return False
    try:
        return _pid_in(fd) == pid and holder(run_dir) == pid
    finally:
        os.close(fd)


def _acquire(run_dir: Path) -> int:
    """Open and lock ``run_dir/.metagrad.lock`` (RunInUseError at once if held), write this pid into it."""
    path = run_dir / LOCK
    for _ in range(10):   # the file can be removed between open and flock by a holder cleaning up: retry
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IsADirectoryError(errno.EISDIR, f"{LOCK} is a symbolic link, expected a file",
                                        str(path)) from e
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise RunInUseError(in_use_message(run_dir, pid)) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise RunInUseError(in_use_message(run_dir, ""))  # pragma: no cover - ten removals in a row


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (made if missing) for the block; yields it as a Path.

    Raises:
        RunInUseError: another process holds it (one line naming its pid).
        NotADirectoryError: ``run_dir`` exists and is not a directory.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(run_dir))
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = _key(run_dir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield run_dir
        finally:
            _held[key][1] -= 1
        return
    if _inherited(run_dir):
        yield run_dir
        return
    try:
        fd = _acquire(run_dir)
    except BaseException:
        if made:
            _remove_if_empty(run_dir)
        raise
    _held[key] = [fd, 1]
    try:
        yield run_dir
    finally:
        del _held[key]
        with contextlib.suppress(OSError):   # removed while still held: a newcomer's flock sees the inode change
            if os.fstat(fd).st_ino == os.stat(run_dir / LOCK, follow_symlinks=False).st_ino:
                (run_dir / LOCK).unlink()
        os.close(fd)
        if made:
            _remove_if_empty(run_dir)


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a directory this lock made when nothing was written into it (a refused run)."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()   # fails, as it should, unless empty


def environment(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The environment entry that lets workers started by this process write into the run it holds locked."""
    return {ENV: f"{_key(Path(run_dir))}:{os.getpid()}"}


__all__ = ["ENV", "LOCK", "RunInUseError", "environment", "holder", "in_use_message", "locked"]
