"""The one reader of every JSON, JSON-lines and TOML file of a run or a study: a value, or one line naming the file.

Every ``config.json``, ``eval.json``, ``scores.json``, ``diagnostics.json``, ``study.json``, ``metrics.jsonl``,
``faults.jsonl``, preset and study TOML is read here, and whatever is wrong with it becomes a
:class:`FileFormatError` (a ``ValueError``: ``metagrad`` prints it as one line, exit status 2) that names the
file and says what to do: not valid JSON or TOML, not UTF-8, nested deeper than :data:`MAX_DEPTH` (a
``RecursionError`` otherwise, here or in whoever walks it), an integer of more than :data:`MAX_DIGITS` digits
(an ``OverflowError`` once a float is made of it), the wrong top-level type (a list where a table belongs).
Something that is not a regular file (a FIFO, which a reader would wait on for ever; a directory) is an
``OSError`` naming it, checked on the open descriptor, so a FIFO is never waited on.

A JSON-lines log is read line by line: a line that is not an object with an integer ``iteration`` (``[1, 2]``,
``5``, ``"iteration": "four"``, bytes that are not UTF-8) is a damaged line, returned apart with its number;
a last line without its newline that does not parse is a write torn by a kill, dropped silently.

Example:
    >>> records = read_json(run_dir / "eval.json", list)
    >>> rows, damaged = read_jsonl(run_dir / "metrics.jsonl")
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MAX_DEPTH = 32     # tables and lists within each other; metagrad's own files use at most 6
MAX_DIGITS = 20    # |int| < 10^20: beyond every count, seed and size (2^63 has 19 digits)
MAX_BYTES = 1 << 30


class FileFormatError(ValueError):
    """A run or study file that cannot be read as what it should hold; the message is one line naming it."""


def check_regular(path: str | os.PathLike[str]) -> None:
    """``path``, when anything is there, is a regular file (or a link to one); else the OSError naming it.

    A FIFO would make a reader wait for ever, a directory or a device fail half-way through a run."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise FileNotFoundError(errno.ENOENT, "a broken symbolic link, expected a file", str(path)) from None
        return
    _check_mode(st, path)


def _check_mode(st: os.stat_result, path: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise OSError(errno.EINVAL, f"{kind}, expected a regular file", str(path))


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file ``path`` (never waits on a FIFO); OSError naming it otherwise."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        _check_mode(st, path)
        if st.st_size > MAX_BYTES:
            raise FileFormatError(f"{path} is {st.st_size} bytes, more than any run file holds: not a run file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str], fix: str = "") -> str:
    """The UTF-8 text of ``path``; FileFormatError naming it when it is not UTF-8."""
    blob = read_bytes(path)
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not UTF-8 text (byte {e.start}){_fix(fix)}") from None


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _TooBig(len(text.lstrip("-")))
    return int(text)


class _TooBig(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(f"an integer of {digits} digits (at most {MAX_DIGITS})")


def check_value(path: str | os.PathLike[str], value: Any, fix: str = "") -> Any:
    """``value`` read from ``path`` with no nesting deeper than MAX_DEPTH and no integer longer than MAX_DIGITS
    digits (walked without recursion); FileFormatError naming ``path`` otherwise."""
    todo = [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise FileFormatError(f"{path} is nested more than {MAX_DEPTH} levels deep: not a metagrad file"
                                  f"{_fix(fix)}")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**MAX_DIGITS:
            raise FileFormatError(f"{path} holds {_TooBig(len(str(abs(v))))}, too big for any setting{_fix(fix)}")
        if isinstance(v, dict):
            todo += [(x, depth + 1) for x in v.values()]
        elif isinstance(v, list):
            todo += [(x, depth + 1) for x in v]
    return value


def _type_name(kind: type) -> str:
    return {dict: "an object (a table of keys)", list: "a list"}.get(kind, kind.__name__)


def parse_json(path: str | os.PathLike[str], text: str, kind: type | None = None, fix: str = "") -> Any:
    """``text`` (the contents of ``path``) as JSON of top-level type ``kind``; FileFormatError naming ``path``."""
    try:
        value = json.loads(text, parse_int=_int)
    except _TooBig as e:
        raise FileFormatError(f"{path} holds {e}, too big for any setting{_fix(fix)}") from None
    except RecursionError:
        raise FileFormatError(f"{path} is nested too deeply to read: not a metagrad file{_fix(fix)}") from None
    except ValueError as e:   # json.JSONDecodeError, and the interpreter's own integer limit
        raise FileFormatError(f"{path} is not valid JSON ({' '.join(str(e).split())}){_fix(fix)}") from None
    check_value(path, value, fix)
    if kind is not None and not isinstance(value, kind):
        got = "null" if value is None else _type_name(type(value))
        raise FileFormatError(f"{path} must hold {_type_name(kind)}, got {got}{_fix(fix)}")
    return value


def read_json(path: str | os.PathLike[str], kind: type | None = None, fix: str = "") -> Any:
    """The JSON value in the file ``path``, of top-level type ``kind`` when given (``dict`` or ``list``).

    Raises:
        FileFormatError: one line naming the file (bad encoding, bad JSON, too deep, a huge integer, wrong type);
            ``fix`` is appended as the advice.
        OSError: it cannot be opened, or is not a regular file.
    """
    return parse_json(path, read_text(path, fix), kind, fix)


def read_toml(path: str | os.PathLike[str], fix: str = "") -> dict[str, Any]:
    """The table in the TOML file ``path``; FileFormatError naming it (as :func:`read_json`)."""
    text = read_text(path, fix)
    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise FileFormatError(f"{path} is nested too deeply to read{_fix(fix)}") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise FileFormatError(f"{path}: not valid TOML ({' '.join(str(e).split())}){_fix(fix)}") from None
    return check_value(path, value, fix)


def is_record(row: Any) -> bool:
    """Whether a parsed log line is a record: an object with an integer ``iteration``."""
    it = row.get("iteration") if isinstance(row, dict) else None
    return isinstance(it, int) and not isinstance(it, bool)


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The records of the JSON-lines log ``path`` and its damaged lines as ``(line number, text)``.

    A torn last line (no newline, does not parse) is neither: a kill cut it. A missing file has neither.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return [], []
    blob = read_bytes(path)
    lines = blob.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows, damaged = [], []
    for n, raw in enumerate(lines, 1):
        text = raw.decode("utf-8", errors="replace")
        try:
            row = json.loads(raw.decode("utf-8"), parse_int=_int) if raw.strip() else None
            ok = is_record(row) and check_value(path, row) is row
        except (ValueError, RecursionError):   # bad UTF-8, bad JSON, a huge or too deep value
            ok = False
        if ok:
            rows.append(row)
        elif n < len(lines) or blob.endswith(b"\n"):   # not a torn last write: damage
            damaged.append((n, text))
    return rows, damaged


__all__ = ["MAX_DEPTH", "MAX_DIGITS", "FileFormatError", "check_regular", "check_value", "is_record", "parse_json",
           "read_bytes", "read_json", "read_jsonl", "read_text", "read_toml"]
