"""The run directory: its file names, the one atomic write, and the readers and writers of every run file.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
iteration, append-only), ``faults.jsonl`` (skipped meta-updates), ``checkpoint.pt`` and its kept copies
``checkpoint-<iteration>.pt`` (see :mod:`metagrad.checkpoint`), ``eval.json`` (evaluation records),
``scores.json`` (their per-task scores), ``diagnostics.json`` and ``curves.png``; a study folder holds
``study.json``. This module alone names them, reads them and writes them.

Every file that is rewritten goes through :func:`write_atomic`: a temporary file ``.<name>.tmp-<pid>`` in the same
folder, flushed and fsync'ed, then ``os.replace``d into place, and removed on any failure (a full disk, a target
that is a directory), so no failure leaves half a file or a stray temporary one. A process killed mid-write leaves
its temporary file; :func:`open_run` (called by whatever opens a run directory to write in it) removes those of
processes that are gone. The two JSON-lines logs are appended to (:func:`open_log`, :func:`append_fault`): a kill
tears at most their last line, which :func:`truncate_log` drops on resume. :func:`describe` turns an ``OSError``
into the one line the command line prints.

Example:
    >>> write_atomic(run_dir / EVAL, json.dumps(records))
    >>> with naming(run_dir / METRICS):
    ...     log.write(line)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .config import Config, dumps, load
from .reading import FileFormatError, check_regular, read_json, read_jsonl

# ------------------------------------------------------------------------------------------------ file names
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
SCORES = "scores.json"
FAULTS = "faults.jsonl"
DIAGNOSTICS = "diagnostics.json"
PLOT = "curves.png"
MANIFEST = "study.json"
# The files a run reads or writes by name; with the kept copies ``checkpoint-<iteration>.pt`` and what a resume
# sets aside (``*.corrupt``, ``*.damaged``), any of them makes a directory hold a run (see :func:`held_files`).
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, EVAL, SCORES)
OUTPUTS = (*RUN_FILES, FAULTS, DIAGNOSTICS, PLOT)
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
_ASIDE = (".corrupt", ".damaged")


def numbered_checkpoint(iteration: int) -> str:
    """The name of the kept copy of the checkpoint at ``iteration``: ``checkpoint-<iteration, 8 digits>.pt``."""
    return f"checkpoint-{int(iteration):08d}.pt"


def checkpoint_iteration(name: str) -> int | None:
    """The iteration of a kept checkpoint copy's file name, None for any other name."""
    m = _NUMBERED.match(name)
    return int(m.group(1)) if m else None


class RunFileWarning(UserWarning):
    """A run file was damaged; what could be kept was kept, and the warning says what was set aside."""


# ------------------------------------------------------------------------------------------------ writing
def temporary(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`write_atomic` writes ``path`` through: ``.<name>.tmp-<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    Raises:
        OSError: naming ``path`` (the temporary file is removed first).
    """
    path = Path(path)
    tmp = temporary(path)
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


def write_json(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON (``json.dumps`` options ``dumps``) and a final newline into ``path``, by :func:`write_atomic`."""
    write_atomic(path, json.dumps(obj, **dumps) + "\n")


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of :func:`write_atomic` in ``folder`` whose process is gone (killed mid-write,
    or this one); a running process's are left to it. Returns the files deleted."""
    folder = Path(folder)
    stale = []
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and not _running(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            stale.append(p)
    return stale


def _running(pid: int) -> bool:
    """Whether another live process has this id (this process's own writes are never in flight here)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OSError, OverflowError):  # an id out of range (a crafted suffix): no such process
        return False
    try:  # a killed process not yet reaped (a zombie) writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def open_run(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` as a Path, with the temporary files of processes killed mid-write removed (see above)."""
    run_dir = Path(run_dir)
    remove_temporaries(run_dir)
    return run_dir


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


def is_run_file(name: str) -> bool:
    """Whether ``name`` is a file a run writes or sets aside: a run file, a kept checkpoint copy, ``*.corrupt``,
    ``*.damaged``."""
    base = name.removesuffix(".corrupt").removesuffix(".damaged")
    return base in OUTPUTS or _NUMBERED.match(base) is not None


def held_files(run_dir: str | os.PathLike[str]) -> list[str]:
    """The run files in ``run_dir`` (any kind of entry with a run file's name), sorted: a directory holding any
    holds a run, and a new run refuses to start over them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if is_run_file(p.name))


def check_files(folder: str | os.PathLike[str], names: tuple[str, ...] = ()) -> None:
    """Every run file in ``folder`` (see :func:`is_run_file`, and each of ``names``), and every place a run
    will write (``curves.png``, a future kept copy), is a regular file this process can read, or absent; else
    the OSError naming it.

    Run before a run starts writing, so a run file that is a directory, a FIFO or unreadable stops it in one
    line instead of a hang or a failure after training.
    """
    folder = Path(folder)
    here = held_files(folder)
    for name in dict.fromkeys([*names, *OUTPUTS, *here]):
        path = folder / name
        check_regular(path)
        if path.exists():
            with open(path, "rb"):
                pass


# ------------------------------------------------------------------------------------------------ config
def read_config(run_dir: str | os.PathLike[str]) -> Config:
    """The run's ``config.json`` as a checked Config (ConfigError, one line, when missing or bad)."""
    return load(Path(run_dir) / CONFIG)


def write_config(run_dir: str | os.PathLike[str], cfg: Config) -> Path:
    """Write the resolved config as the run's ``config.json`` (atomically); returns its path."""
    path = Path(run_dir) / CONFIG
    write_atomic(path, dumps(cfg))
    return path


# ------------------------------------------------------------------------------------------------ the logs
def open_log(path: str | os.PathLike[str]) -> IO[str]:
    """A JSON-lines log (``metrics.jsonl``) opened for appending, its errors naming it."""
    with naming(path):
        return open(path, "a")  # the caller holds it for the run's length


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (empty when there is none). A torn last line is skipped; a damaged one
    (not an object with an integer ``iteration``) too, with one :class:`RunFileWarning` naming the file and
    the lines."""
    rows, damaged = read_jsonl(path)
    if damaged:
        warnings.warn(f"{path}: line {_where(damaged)} {'is' if len(damaged) == 1 else 'are'} not a record (an "
                      "object with an integer iteration): skipped", RunFileWarning, stacklevel=2)
    return rows


def _where(damaged: list[tuple[int, str]]) -> str:
    return ", ".join(str(n) for n, _ in damaged[:10]) + (" …" if len(damaged) > 10 else "")


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The parsed lines of a run's ``metrics.jsonl`` (a torn last line is skipped)."""
    return read_log(Path(run_dir) / METRICS)


def read_faults(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The skipped meta-updates of a run (``faults.jsonl``), one dict each."""
    return read_log(Path(run_dir) / FAULTS)


def append_fault(run_dir: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one skipped meta-update to the run's ``faults.jsonl``."""
    path = Path(run_dir) / FAULTS
    with naming(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: str | os.PathLike[str], iteration: int) -> None:
    """Keep the log lines up to ``iteration``: lines logged after the checkpoint are dropped (they are logged
    again), and so is a torn last line (a kill mid-write). Any other damaged line is set aside in
    ``<name>.damaged`` with a :class:`RunFileWarning`: its values cannot be logged again, but are not lost silently.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    with naming(path):
        rows, damaged = read_jsonl(path)
    keep = [json.dumps(r) for r in rows if r["iteration"] <= iteration]
    if damaged:
        aside = path.with_name(f"{path.name}.damaged")
        old = aside.read_text() if aside.is_file() else ""
        write_atomic(aside, old + "".join(f"{line}\n" for _, line in damaged))
        warnings.warn(f"{path.name} line {_where(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged (not a metrics "
                      f"record): set aside in {aside.name}; those iterations' logged values are lost, the training "
                      "itself is not", RunFileWarning, stacklevel=2)
    write_atomic(path, "".join(f"{line}\n" for line in keep))


# ------------------------------------------------------------------------------------------------ records
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


def read_records(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``eval.json`` (empty when there is none)."""
    path = Path(run_dir) / EVAL
    if not os.path.lexists(path):
        return []
    records = read_json(path, list, "move it away to start a fresh one")
    return check_records(path, records)  # a list of records with typed fields, or one line naming the file


def scores_key(record: dict[str, Any]) -> str:
    """The key of a record's per-task scores in ``scores.json``: what was scored, when, on which tasks."""
    parts = [record.get("benchmark", ""), record["split"], f"steps{record['inner_steps']}",
             f"iter{record.get('iteration', '')}", f"ways{record.get('ways', '')}", record.get("task_set", "")]
    if record.get("head", "trained") != "trained":  # the same tasks scored with another starting head
        parts.append(f"head{record['head']}")
    return "/".join(map(str, parts))


def read_scores(run_dir: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The per-task scores of a run (``scores.json``: scores key → values; empty when there is none)."""
    path = Path(run_dir) / SCORES
    if not os.path.lexists(path):
        return {}
    fix = "move it away and re-run `metagrad eval`"
    scores = read_json(path, dict, fix)
    for key, values in scores.items():
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise FileFormatError(f"{path}: {key!r} must be a list of per-task numbers, got {values!r:.40}; {fix}")
    return scores


def record_scores(run_dir: str | os.PathLike[str], record: dict[str, Any]) -> list[float] | None:
    """The per-task scores of one ``eval.json`` record (None for records written before they were kept)."""
    key = record.get("scores_key")
    return read_scores(run_dir).get(key) if key else None


def append_records(run_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> Path:
    """Append records to ``eval.json`` and their per-task scores to ``scores.json``, each rewritten atomically
    (scores first, so a record never names scores that were not written)."""
    run_dir = Path(run_dir)
    scores, kept = read_scores(run_dir), []
    for r in records:
        r = dict(r)
        values = r.pop("scores", None)
        if values is not None:
            r["scores_key"] = scores_key(r)
            scores[r["scores_key"]] = values
        kept.append(r)
    write_json(run_dir / SCORES, scores, separators=(",", ":"))
    path = run_dir / EVAL
    write_json(path, [*read_records(run_dir), *kept], indent=2)
    return path


# ------------------------------------------------------------------------------------------------ derived data
def read_diagnostics(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ``diagnostics.json``, or None when it is missing or unreadable (it can be computed again)."""
    try:
        return read_json(Path(run_dir) / DIAGNOSTICS, dict)
    except (OSError, ValueError):
        return None


def write_diagnostics(run_dir: str | os.PathLike[str], diag: dict[str, Any]) -> Path:
    """Write ``diag`` as the run's ``diagnostics.json``; returns its path."""
    path = Path(run_dir) / DIAGNOSTICS
    write_json(path, diag)
    return path


# ------------------------------------------------------------------------------------------------ studies
def method_label(plugins: Sequence[str]) -> str:
    """The row name of a set of plug-ins, and its folder in a study: ``maml`` or the sorted keys joined by ``+``."""
    return "+".join(sorted(plugins)) or "maml"


def cell_dir(out_dir: str | os.PathLike[str], preset: str, label: str, seed: int, fold: int | None = None) -> Path:
    """A study cell's run directory: ``<out>/<preset>/<label>/seed<k>``, or ``.../<label>/fold<f>/seed<k>``."""
    where = Path(out_dir) / preset / label
    return (where if fold is None else where / f"fold{fold}") / f"seed{seed}"


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A study folder's ``study.json`` (None when the folder holds none)."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        return None
    manifest = read_json(path, dict, "move it away (the study writes a new one)")
    if not isinstance(manifest.get("cells", []), list) or not all(isinstance(c, dict) for c in manifest.get("cells", [])):
        raise FileFormatError(f"{path}: 'cells' must be a list of cell records; move it away (the study writes a "
                              "new one)")
    return manifest


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write a study's ``study.json`` (the status of every cell) into ``folder``; returns its path."""
    path = Path(folder) / MANIFEST
    write_json(path, manifest, indent=2)
    return path


# ------------------------------------------------------------------------------------------------ OS errors
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
    own = e.strerror and e.strerror != os.strerror(e.errno)  # metagrad's own words for the cause
    cause = e.strerror if own else _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    where = str(e.filename) if e.filename is not None else "a run file"
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    return f"cannot use {where}: {cause} (errno {e.errno})"


__all__ = ["CHECKPOINT", "CONFIG", "DIAGNOSTICS", "EVAL", "FAULTS", "MANIFEST", "METRICS", "OUTPUTS", "PLOT",
           "RUN_FILES", "SCORES", "RunFileWarning", "append_fault", "append_records", "cell_dir", "check_files",
           "check_records", "check_regular", "checkpoint_iteration", "describe", "held_files", "is_run_file", "method_label", "naming", "numbered_checkpoint", "open_log",
           "open_run", "read_config", "read_diagnostics", "read_faults", "read_log", "read_manifest",
           "read_metrics", "read_records", "read_scores", "record_scores", "remove_temporaries", "scores_key",
           "temporary", "truncate_log", "write_atomic", "write_config", "write_diagnostics", "write_json",
           "write_manifest"]
