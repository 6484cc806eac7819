"""Checkpoints that survive a kill: atomic writes, a checksum, the last K kept, RNG capture, one-line errors.

A run directory holds ``checkpoint.pt``, the latest good checkpoint (a plain ``torch.save`` dict), and the
last K checkpoints as ``checkpoint-<iteration>.pt`` (the newest is a second copy of ``checkpoint.pt``). Every
file is written to a temporary file in the same directory, flushed and fsync'ed, then moved into place with
``os.replace`` (atomic on POSIX), so a kill or a power cut at any moment leaves the previous or the new file,
never half of one. ``checkpoint.pt`` is written before the numbered copy, so it is never older than one.

Each checkpoint carries ``"checksum"``: a sha256 over its contents (every tensor's bytes, dtype and shape,
every plain value), computed on the tensors themselves rather than the file bytes, so it is the same on any
platform and for any ``map_location``. Reading goes through :func:`candidates`, newest first;
:func:`load_latest` skips a missing, truncated, incomplete or checksum-failing checkpoint with a
:class:`CheckpointWarning` and returns the previous good one.

Example:
    >>> save(run_dir, {"learner": learner.state_dict(), "iteration": 10, "rng": rng_state()}, keep=3)
    >>> state = load_latest(run_dir)        # CheckpointError (one line) if no checkpoint is usable
    >>> set_rng_state(state["rng"])
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from . import rundir

FILENAME = rundir.CHECKPOINT
REQUIRED = ("learner", "optimizer", "iteration", "rng", "config")
CHECKSUM = "checksum"
# The types of the entries a resume reads (older checkpoints may lack "meter", "wall", "info", "bad_in_row").
TYPES: dict[str, type | tuple[type, ...]] = {"learner": dict, "optimizer": dict, "iteration": int, "rng": dict,
                                             "config": dict, "meter": dict, "wall": (int, float), "info": dict,
                                             "bad_in_row": int}
_OS_FAULTS = (errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR)  # not the file's contents


class CheckpointError(ValueError):
    """A missing, unreadable or incomplete checkpoint; the message is one line."""


class CheckpointWarning(UserWarning):
    """The newest checkpoint was unusable and an older good one is used instead."""


def path_of(run_dir: str | Path) -> Path:
    """Where the latest checkpoint of ``run_dir`` lives."""
    return Path(run_dir) / FILENAME


def numbered_path(run_dir: str | Path, iteration: int) -> Path:
    """Where the kept copy of the checkpoint at ``iteration`` lives."""
    return Path(run_dir) / rundir.numbered_checkpoint(iteration)


def numbered(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The kept ``checkpoint-<iteration>.pt`` files of a run as ``(iteration, path)``, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(it, p) for p in run_dir.iterdir() if (it := rundir.checkpoint_iteration(p.name)) is not None
             and p.is_file()]
    return sorted(found, reverse=True)


def candidates(run_dir: str | Path) -> list[Path]:
    """Existing checkpoints of a run, newest first: ``checkpoint.pt``, then the kept copies by iteration."""
    p = path_of(run_dir)
    return ([p] if p.is_file() else []) + [q for _, q in numbered(run_dir)]


def checksum(state: Any) -> str:
    """sha256 over a checkpoint's contents (tensors by dtype, shape and bytes; plain values by repr)."""
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        items = sorted(((k, v) for k, v in obj.items() if k != CHECKSUM), key=lambda kv: repr(kv[0]))
        h.update(f"D{len(items)}".encode())
        for k, v in items:
            h.update(repr(k).encode())
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):  # pickling may turn one into the other: hash both alike
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def save(run_dir: str | Path, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``state`` (plus its checksum) atomically as the run's checkpoint; returns its path.

    ``keep`` > 0 also writes ``checkpoint-<iteration>.pt`` and deletes all but the newest ``keep`` of those.
    """
    buf = io.BytesIO()
    torch.save({**state, CHECKSUM: checksum(state)}, buf)
    data = buf.getvalue()
    target = path_of(run_dir)
    write_atomic(target, data)
    if keep > 0 and "iteration" in state:
        write_atomic(numbered_path(run_dir, state["iteration"]), data)
        for _, old in numbered(run_dir)[keep:]:
            old.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return target


def write_atomic(target: Path, data: bytes) -> None:
    """``data`` into ``target`` through a temporary file in the same folder (see :func:`metagrad.rundir.write_atomic`)."""
    rundir.write_atomic(target, data)


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files killed processes left behind in ``run_dir`` (:func:`metagrad.rundir.remove_temporaries`)."""
    return rundir.remove_temporaries(run_dir)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable across a power cut; not every platform lets a directory be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read one checkpoint, checking it is complete; CheckpointError if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        # weights_only: a checkpoint is tensors and plain containers only, so loading one runs no code.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if e.errno in _OS_FAULTS:  # permission, a failing disk: the file may be fine; never skip it or call it corrupt
            raise
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({_cause(e)}); "
                              "restore it from a copy or start a new run") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({_cause(e)}); "
                              "restore it from a copy or start a new run") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (missing {', '.join(missing)})")
    # Checkpoints written before checksums existed have none: they are accepted as they are.
    if CHECKSUM in state and checksum(state) != state[CHECKSUM]:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its contents do not match its sha256 "
                              "checksum; restore it from a copy or start a new run")
    wrong = [k for k, kind in TYPES.items() if k in state and (not isinstance(state[k], kind)
                                                             or isinstance(state[k], bool))]
    if wrong or state["iteration"] < 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is malformed ({', '.join(wrong) or 'iteration'} of the "
                              "wrong type or value); restore it from a copy or start a new run")
    return state


def _cause(e: Exception) -> str:
    """torch's reason for refusing a file, in a few words. Its own hint to retry with ``weights_only=False`` (run
    the pickle's code) is never passed on: for a damaged or foreign file that is the unsafe advice."""
    text = " ".join(str(e).split())
    if "weights_only" in text or "Weights only load failed" in text or isinstance(e, pickle.UnpicklingError):
        return "not a tensors-only torch file"
    return text[:200] or type(e).__name__


def find_latest(run_dir: str | Path, map_location: str | torch.device | None = "cpu",
                accept: Callable[[Path, dict[str, Any]], None] | None = None
                ) -> tuple[Path, dict[str, Any], list[CheckpointError]]:
    """The newest usable checkpoint as ``(path, state, errors of the newer unusable ones)``; ``accept(path,
    state)`` may raise CheckpointError to call a readable checkpoint unusable too (e.g. one that does not fit the
    model).

    Raises:
        CheckpointError: there is no checkpoint, or none is usable (the newest one's problem is named).
    """
    found = candidates(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r} ({FILENAME} is missing): nothing to resume; "
                              "start over in another directory")
    errors: list[CheckpointError] = []
    if not path_of(run_dir).is_file():  # only kept copies: checkpoint.pt itself was lost
        errors.append(CheckpointError(f"{FILENAME} is missing"))
    for path in found:
        try:
            state = load(path, map_location)
            if accept is not None:
                accept(path, state)
            return path, state, errors
        except CheckpointError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise CheckpointError(f"{errors[0]} (and the {len(errors) - 1} older kept checkpoints are unusable too)")


def load_latest(run_dir: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The newest usable checkpoint of ``run_dir``, warning when a newer one had to be skipped."""
    path, state, errors = find_latest(run_dir, map_location)
    if errors:
        warnings.warn(fallback_message(path, state, errors), CheckpointWarning, stacklevel=2)
    return state


def fallback_message(path: Path, state: dict[str, Any], errors: list[CheckpointError]) -> str:
    return (f"{len(errors)} newer checkpoint(s) unusable ({errors[0]}); using the previous good one, "
            f"{path.name} (iteration {int(state['iteration'])})")


# --------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every global RNG a run may draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["CheckpointError", "CheckpointWarning", "candidates", "checksum", "find_latest", "load", "load_latest",
           "numbered", "numbered_path", "path_of", "remove_temporaries", "rng_state", "save", "set_rng_state",
           "write_atomic"]
