"""Checkpoints that survive a kill: atomic writes, RNG capture, one-line errors on corrupt files.

A run directory holds ``checkpoint.pt``, the latest good checkpoint. It is written to a temporary file in the
same directory, flushed and fsync'ed, then moved over the old one with ``os.replace`` (atomic on POSIX), so
a kill at any moment leaves either the previous or the new checkpoint, never half of one.

Reading goes through :func:`candidates`, the checkpoints of a run newest first. Today that is the one file;
keeping the last K (``checkpoint-<iteration>.pt``) and falling back to an older one when the newest is
corrupt only needs :func:`save` to also write the numbered copy and :func:`load_latest` to try the next
candidate instead of raising.

Example:
    >>> save(run_dir, {"learner": learner.state_dict(), "iteration": 10, "rng": rng_state()})
    >>> state = load_latest(run_dir)        # CheckpointError (one line) if missing or corrupt
    >>> set_rng_state(state["rng"])
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

FILENAME = "checkpoint.pt"
REQUIRED = ("learner", "optimizer", "iteration", "rng", "config")


class CheckpointError(ValueError):
    """A missing, unreadable or incomplete checkpoint; the message is one line."""


def path_of(run_dir: str | Path) -> Path:
    """Where the latest checkpoint of ``run_dir`` lives."""
    return Path(run_dir) / FILENAME


def candidates(run_dir: str | Path) -> list[Path]:
    """Existing checkpoints of a run, newest first (the seam for keep-last-K)."""
    p = path_of(run_dir)
    return [p] if p.is_file() else []


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically as the run's checkpoint; returns its path."""
    target = path_of(run_dir)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)
    return target


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
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({first[:200]}); "
                              "restore it from a copy or start a new run") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (missing {', '.join(missing)})")
    return state


def load_latest(run_dir: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The newest usable checkpoint of ``run_dir``; CheckpointError if there is none."""
    found = candidates(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r} ({FILENAME} is missing): nothing to resume; "
                              "start over in another directory")
    return load(found[0], map_location)


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


__all__ = ["CheckpointError", "candidates", "load", "load_latest", "path_of", "rng_state", "save", "set_rng_state"]
