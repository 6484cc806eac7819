"""Every code block of the user guides runs: docs/own-data.md and docs/own-model.md (a missing guide is skipped).

The blocks of one guide run in order, in one temporary folder (a later block may use files an earlier one
wrote, as a reader following the page would; that folder is on ``sys.path``): ```python blocks each in a fresh
namespace (a block whose first line is ``# file: NAME.py`` is also saved as that file, as the page tells the reader
to do), and the ``metagrad`` command lines of ```bash blocks through :func:`metagrad.cli.main`. Command lines
get ``CI_SETTINGS`` appended so that they take a few steps; other shell commands (``pip install ...``) are not run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import metagrad
from metagrad.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ("own-data.md", "own-model.md")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
CI_SETTINGS = {  # appended to `metagrad <command>` lines: a few steps, a few tasks, one thread
    "train": ["--set", "train.iterations=4", "--set", "train.meta_batch_size=2", "--set", "train.val_every=2",
              "--set", "train.val_tasks=4", "--set", "eval.tasks=4", "--set", "train.threads=1",
              "--set", "train.log_every=2", "--no-progress"],
    "eval": ["--tasks", "4"],
    "study": ["--set", "train.iterations=4", "--set", "train.meta_batch_size=2", "--set", "train.val_every=2",
              "--set", "train.val_tasks=4", "--set", "eval.tasks=4", "--set", "train.threads=1"],
}


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def commands(code: str) -> list[list[str]]:
    """The ``metagrad`` command lines of a shell block, continuation lines joined, as argument lists."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["metagrad"]:
            out.append(words[1:])
        elif words[:3] == ["python", "-m", "metagrad"]:
            out.append(words[3:])
    return out


def test_the_extractor_finds_python_and_command_lines() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nmetagrad train --config p \\\n  --set a=b  # why\npip x\n```\n"
    assert blocks(text) == [("python", "x = 1\n"), ("bash", "metagrad train --config p \\\n  --set a=b  # why\npip x\n")]
    assert commands(blocks(text)[1][1]) == [["train", "--config", "p", "--set", "a=b"]]


@pytest.mark.parametrize("guide", GUIDES)
def test_every_code_block_runs(guide: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = DOCS / guide
    if not path.is_file():
        pytest.skip(f"docs/{guide} is not written yet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python block.py` run there: modules a block writes import
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    ran = 0
    try:
        for i, (lang, code) in enumerate(blocks(path.read_text())):
            if lang == "python":
                if code.startswith("# file: "):
                    Path(code.split("\n", 1)[0].removeprefix("# file: ").strip()).write_text(code)
                exec(compile(code, f"docs/{guide} block {i}", "exec"), {"__name__": "__main__"})  # noqa: S102 (our docs)
                ran += 1
            elif lang in ("bash", "sh", "shell", "console"):
                for argv in commands(code):
                    assert main([*argv, *CI_SETTINGS.get(argv[0], [])]) == 0, f"docs/{guide} block {i}: {argv}"
                    ran += 1
    finally:
        torch.set_num_threads(threads)
    assert ran, f"docs/{guide} has no code block to run"


def test_every_public_name_of_metagrad_data_is_documented() -> None:
    text = (DOCS / "own-data.md").read_text()
    missing = [n for n in metagrad.data.__all__ if f"`{n}" not in text]
    assert not missing, f"docs/own-data.md does not describe {missing}"
