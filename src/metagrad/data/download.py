"""Fetching official data files: standard library only, checksum-verified, never a partial file left behind.

Example:
    >>> from metagrad.data.download import download_omniglot
    >>> download_omniglot("~/data/omniglot")            # the two official zips, md5-checked
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .errors import DataError

#: The dataset's public home (Lake et al. 2015); the zips live in its ``python/`` folder.
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
#: Official md5 of the two image zips (the published ``md5sums``) and of Lake's one-shot runs
#: (``one-shot-classification/all_runs.zip``, computed from a byte-for-byte copy of the official file).
OMNIGLOT_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
LAKE_RUNS_FILE = "one-shot-classification/all_runs.zip"
LAKE_RUNS_MD5 = "e8996daecdf12afeeb4a53a179f06b19"
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: str | os.PathLike[str], md5: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file renamed into place only once it is complete.

    Args:
        url: what to fetch (any scheme urllib opens: https, http, file).
        dest: the final path; its folder is created.
        md5: the expected hex md5 of the whole file; None skips the check (only for files with no published sum).
        timeout: seconds without data before giving up.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataError: the transfer failed or was cut short, or the checksum does not match. No file is left behind.
    """
    dest = Path(dest).expanduser()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {str(dest.parent)!r} for the download ({e}): pass a writable root") from e
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        h, got = hashlib.md5(), 0
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            length = r.headers.get("Content-Length")
            for block in iter(lambda: r.read(_CHUNK), b""):
                f.write(block)
                h.update(block)
                got += len(block)
        # urllib returns a short body without complaint when the server closes early: check the length ourselves.
        if length is not None and got != int(length):
            raise DataError(f"download of {url} was cut short: got {got} of {length} bytes; check the connection "
                            "and try again")
        if md5 is not None and h.hexdigest() != md5.lower():
            raise DataError(f"download of {url} has md5 {h.hexdigest()}, expected {md5}: the file is corrupt, "
                            "truncated or not the official one; try again or check the URL")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # HTTPError's str() carries the status ("HTTP Error 404: ..."); other URLErrors keep it in .reason.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise DataError(f"could not download {url}: {reason}; check the URL and the connection, or place the file "
                        f"at {str(dest)!r} yourself") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_omniglot(root: str | os.PathLike[str], base_url: str = OMNIGLOT_URL,
                      checksums: Mapping[str, str | None] | None = None, force: bool = False) -> list[Path]:
    """Fetch the official ``images_background.zip`` and ``images_evaluation.zip`` into ``root``.

    Args:
        root: the Omniglot data folder (created if needed).
        base_url: where the zips live, ``{base_url}/{name}`` (tests point it at a local server).
        checksums: file name -> expected md5 (default :data:`OMNIGLOT_MD5`); only the names given are fetched.
        force: download again even if the file is already there.

    Returns:
        The paths of the zips.
    """
    sums = dict(OMNIGLOT_MD5 if checksums is None else checksums)
    out = []
    for name, md5 in sums.items():
        dest = Path(root).expanduser() / name
        if force or not dest.is_file():
            download_file(f"{base_url.rstrip('/')}/{name}", dest, md5)
        out.append(dest)
    return out
