"""Downloads, against a local HTTP server on 127.0.0.1 only (the tests never touch the internet).

The server hands out the shared rebuilt Omniglot zips under the official names (their md5 is not the official
one, so the tests pass their own), and can cut a transfer short.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metagrad import data
from metagrad.data.download import OMNIGLOT_MD5, download_file, download_omniglot
from metagrad.data.errors import DataError
from metagrad.data.omniglot import ensure_downloaded

SHARED = Path(os.environ.get("METAGRAD_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "omniglot"
ZIPS = {"images_background.zip": SHARED / "images_background_rebuilt.zip",
        "images_evaluation.zip": SHARED / "images_evaluation_rebuilt.zip"}
RUNS = SHARED / "official/one-shot-classification/all_runs.zip"
pytestmark = [pytest.mark.data, pytest.mark.skipif(not all(p.is_file() for p in [*ZIPS.values(), RUNS]),
                                                   reason="shared Omniglot zips not found (set METAGRAD_DATA)")]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    served = tmp_path_factory.mktemp("served")
    for name, src in ZIPS.items():
        shutil.copy(src, served / name)
    (served / "one-shot-classification").mkdir()
    shutil.copy(RUNS, served / "one-shot-classification/all_runs.zip")
    (served / "short.zip").write_bytes(ZIPS["images_evaluation.zip"].read_bytes()[:100_000])
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            hits.append(self.path)
            if self.path.startswith("/cut/"):  # promise the whole file, send half, hang up
                body = (served / self.path[len("/cut/"):]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", hits=hits, dir=served,
                          sums={n: md5(p) for n, p in ZIPS.items()})
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_official_checksums_are_the_published_ones() -> None:
    assert OMNIGLOT_MD5 == {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
                            "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}


def test_download_verifies_and_places_both_zips(server: SimpleNamespace, tmp_path: Path) -> None:
    paths = download_omniglot(tmp_path, server.url, server.sums)
    assert [p.name for p in paths] == list(ZIPS) and leftovers(tmp_path) == sorted(ZIPS)
    assert all(md5(p) == server.sums[p.name] for p in paths)
    before = len(server.hits)
    download_omniglot(tmp_path, server.url, server.sums)  # already there: nothing is fetched again
    assert len(server.hits) == before


def test_checksum_mismatch_leaves_nothing(server: SimpleNamespace, tmp_path: Path) -> None:
    dest = tmp_path / "images_background.zip"
    with pytest.raises(DataError, match="md5 .* expected 68d2efa1") as e:  # the official sum: the rebuilt zip differs
        download_file(f"{server.url}/images_background.zip", dest, OMNIGLOT_MD5["images_background.zip"])
    assert "\n" not in str(e.value) and leftovers(tmp_path) == []


def test_truncated_transfer_leaves_nothing(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        download_file(f"{server.url}/cut/images_evaluation.zip", tmp_path / "e.zip", server.sums["images_evaluation.zip"])
    assert "\n" not in str(e.value) and ("cut short" in str(e.value) or "could not download" in str(e.value))
    assert leftovers(tmp_path) == []


def test_truncated_file_fails_its_checksum(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="md5"):
        download_file(f"{server.url}/short.zip", tmp_path / "e.zip", server.sums["images_evaluation.zip"])
    assert leftovers(tmp_path) == []


def test_missing_file_and_unreachable_server(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="could not download .*404"):
        download_file(f"{server.url}/nope.zip", tmp_path / "n.zip", None)
    with pytest.raises(DataError, match="could not download"):
        download_file("http://127.0.0.1:9/x.zip", tmp_path / "n.zip", None, timeout=5)  # port 9: nobody listens
    assert leftovers(tmp_path) == []


def test_omniglot_download_option_fetches_only_when_missing(server: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "omniglot"
    assert ensure_downloaded(root, server.url, server.sums) == root
    assert leftovers(root) == sorted(ZIPS)
    before = len(server.hits)
    ensure_downloaded(root, server.url, server.sums)
    assert len(server.hits) == before
    with pytest.raises(DataError, match="md5"):
        ensure_downloaded(tmp_path / "other", server.url, None)  # default: the official sums, which these fail
    assert leftovers(tmp_path / "other") == []


def test_lake20_download(server: SimpleNamespace, tmp_path: Path) -> None:
    b = data.create("omniglot-lake20", "test", ways=20, shots=1, root=tmp_path, download=True,
                    download_url=server.url)  # all_runs.zip is the official file: the official md5 holds
    assert (tmp_path / "one-shot-classification/all_runs.zip").is_file()
    assert b.batch(0).support_x.shape == (20, 20, 1, 28, 28)


@pytest.mark.slow
def test_download_true_end_to_end_matches_npz(server: SimpleNamespace, tmp_path: Path) -> None:
    args = {"ways": 5, "shots": 1, "queries": 5, "meta_batch_size": 4, "cache_dir": tmp_path / "cache"}
    got = data.create("omniglot", "test", root=tmp_path / "dl", download=True, download_url=server.url,
                      download_md5=server.sums, **args)
    want = data.create("omniglot", "test", root=SHARED, source="npz", **args)
    assert torch.equal(got.pool.images, want.pool.images) and got.class_names == want.class_names
