"""A model and a benchmark defined outside the package, by import path and by entry point, through the CLI.

The entry point comes from a real installed distribution: the test writes a wheel of a tiny package (pure Python,
its ``entry_points.txt`` declaring ``metagrad.models`` and ``metagrad.benchmarks``) and pip installs it, offline,
into a folder put on the path, as ``pip install --target`` would for any plug-in package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from metagrad import checkpoint as ckpt
from metagrad import cli, data, models
from metagrad import config as C
from metagrad.rundir import read_records

NET = textwrap.dedent('''
    """A user's model and benchmark, outside metagrad."""
    import torch
    from torch import nn

    import metagrad


    class SmallNet(nn.Module):
        def __init__(self, in_dim, out_dim, hidden):
            super().__init__()
            self.body = nn.Linear(in_dim, hidden)
            self.head = nn.Linear(hidden, out_dim)

        def forward(self, x, return_features=False):
            feats = torch.tanh(self.body(x))
            out = self.head(feats)
            return (out, feats) if return_features else out


    def small(in_shape, out_dim, hidden: int = 4):
        return SmallNet(in_shape[0], out_dim, hidden)


    def waves(split, shots, queries, meta_batch_size, seed):   # no ways, no root: it takes what it names
        return metagrad.data.create("sinusoid", split, shots=shots, queries=queries,
                                    meta_batch_size=meta_batch_size, seed=seed)
''')

SMALL = ["train.iterations=3", "train.val_every=0", "train.log_every=1", "train.meta_batch_size=4", "eval.tasks=4",
         "train.threads=1", "train.checkpoint_every=0"]


def _wheel(folder: Path, package: str) -> Path:
    """A py3-none-any wheel of ``package`` (one module holding NET) with entry points for metagrad's groups."""
    files = {f"{package}/__init__.py": NET,
             f"{package}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n",
             f"{package}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n",
             f"{package}-0.1.dist-info/entry_points.txt": f"[metagrad.models]\nwheelnet = {package}:small\n\n"
                                                          f"[metagrad.benchmarks]\nwheelwaves = {package}:waves\n"}
    record = [f"{name},sha256={_digest(text)},{len(text.encode())}" for name, text in files.items()]
    files[f"{package}-0.1.dist-info/RECORD"] = "\n".join([*record, f"{package}-0.1.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{package}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def user_code(tmp_path_factory):
    """A folder with ``usernet.py`` (import paths) and a pip-installed package ``mgplug`` (entry points), on the
    path of this process and of the processes it starts."""
    root = tmp_path_factory.mktemp("user")
    (root / "src").mkdir()
    (root / "src" / "usernet.py").write_text(NET)
    wheel = _wheel(root, "mgplug")
    site = root / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                          "--disable-pip-version-check", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    paths = [str(root / "src"), str(site)]
    mp = pytest.MonkeyPatch()
    for p in paths:
        mp.syspath_prepend(p)
    old = [p for p in (__import__("os").environ.get("PYTHONPATH") or "").split(":") if p]
    mp.setenv("PYTHONPATH", ":".join([*paths, *old]))
    yield root
    mp.undo()
    for name in ("usernet", "mgplug"):
        sys.modules.pop(name, None)


def _train(out: Path, *sets: str, resume: bool = False) -> None:
    args = ["train", "--out-dir", str(out), "--no-progress", "--set", *sets]
    args = [*args, "--resume"] if resume else ["train", "--config", "sinusoid-10shot", *args[1:]]
    assert cli.main(args) == 0


def test_entry_points_are_listed_with_the_built_ins(user_code):
    assert {"conv4", "mlp", "wheelnet"} <= set(models.available())
    assert {"sinusoid", "wheelwaves"} <= set(data.available())


@pytest.mark.parametrize("model, bench", [("usernet:small", "usernet:waves"), ("wheelnet", "wheelwaves")])
def test_a_user_model_trains_resumes_evaluates_and_reports(user_code, tmp_path, model, bench):
    run = tmp_path / "run"
    _train(run, *SMALL, f"model.name={model}", "model.kwargs.hidden=6", f"benchmark.name={bench}")
    state = ckpt.load_latest(run)
    assert state["iteration"] == 3 and tuple(state["learner"]["model.body.weight"].shape) == (6, 1)
    _train(run, "train.iterations=5", resume=True)                  # the run's own config: the user's model
    assert ckpt.load_latest(run)["iteration"] == 5
    assert C.load(run / "config.json").model == C.ModelConfig(name=model, kwargs={"hidden": 6})
    assert cli.main(["eval", str(run), "--tasks", "3", "--steps", "0", "1"]) == 0
    assert [r["inner_steps"] for r in read_records(run)[-2:]] == [0, 1]
    if ":" in model:  # the entry point's report is the study's, below
        assert cli.main(["report", str(run), "--out", str(tmp_path / "report"), "--no-compute"]) == 0
        assert (tmp_path / "report" / "report.md").is_file()


def test_a_user_model_trains_on_two_ranks_and_in_a_study(user_code, tmp_path):
    sets = [*SMALL, "model.name=wheelnet", "model.kwargs.hidden=5", "benchmark.name=usernet:waves"]
    res = subprocess.run([sys.executable, "-m", "metagrad", "train", "--config", "sinusoid-10shot", "--nproc", "2",
                          "--no-progress", "--out-dir", str(tmp_path / "two"), "--set", *sets],
                         capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    state = ckpt.load_latest(tmp_path / "two")
    assert state["info"]["world_size"] == 2 and tuple(state["learner"]["model.head.weight"].shape) == (1, 5)
    study = tmp_path / "study.toml"
    study.write_text(f'presets = ["sinusoid-10shot"]\nmethods = ["maml", "meta_gna"]\nseeds = 1\n'
                     f'set = {json.dumps([*SMALL, "model.name=wheelnet", "model.kwargs.hidden=3"])}\n')
    assert cli.main(["study", str(study), "--out", str(tmp_path / "study"), "--no-report"]) == 0
    cells = json.loads((tmp_path / "study" / "study.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["trained", "trained"], cells
    runs = sorted((tmp_path / "study").glob("sinusoid-10shot/*/seed0"))
    assert len(runs) == 2 and all(C.load(r / "config.json").model.name == "wheelnet" for r in runs)
    assert cli.main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "report")]) == 0
    assert "meta_gna" in (tmp_path / "report" / "report.md").read_text()


def test_a_user_model_that_is_missing_is_one_line_before_anything_is_written(user_code, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "sinusoid-10shot", "--out-dir", str(out), "--set",
                     "model.name=usernet:nothing"]) == 2
    assert "module 'usernet' has no attribute 'nothing'" in capsys.readouterr().err and not out.exists()
    assert cli.main(["train", "--config", "sinusoid-10shot", "--out-dir", str(out), "--set",
                     "model.name=usernet:small", "model.kwargs.depth=2"]) == 2
    assert "small takes no argument 'depth' (it takes: hidden)" in capsys.readouterr().err and not out.exists()


def test_an_import_path_is_found_in_the_working_directory(tmp_path, monkeypatch):
    """``metagrad`` as a console script has no current directory on sys.path; an import path still finds
    ``./module.py`` there (after everything on sys.path)."""
    (tmp_path / "cwdnet.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        model = models.create("cwdnet:small", {"x_shape": (2,), "out_dim": 3}, hidden=7)
    finally:
        sys.modules.pop("cwdnet", None)
    assert model(torch.zeros(4, 2)).shape == (4, 3) and model.body.out_features == 7
