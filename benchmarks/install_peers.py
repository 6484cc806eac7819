"""Install the peer libraries (higher, learn2learn) into their own virtual environment, benchmarks/.peers-venv.

The library and its tests never need them. The environment gets the same torch build as the interpreter that
runs this script (so timings compare like with like), metagrad itself (editable), higher from PyPI, and
learn2learn 0.2.0 built from its sdist: its pre-generated C files predate Python 3.11, so they are regenerated
with a current Cython and the package is installed with ``--no-deps --no-build-isolation``. Its import then
needs ``gym`` and ``torchvision``; a stand-in torchvision (the names learn2learn imports, nothing more) is
written instead of the real one, whose wheels pin other torch builds.

Usage:
    .venv/bin/python benchmarks/install_peers.py            # or: benchmarks/speed.py --install-peers
    benchmarks/.peers-venv/bin/python benchmarks/speed.py   # speed.py re-runs itself there when it exists
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".peers-venv"
LEARN2LEARN = "learn2learn==0.2.0"

# Names learn2learn 0.2.0 imports from torchvision at `import learn2learn` (vision benchmarks and datasets).
STAND_IN = '''"""Stand-in for torchvision, written by metagrad's benchmarks/install_peers.py: learn2learn imports these names
at import time; the MAML benchmarks never call them."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stand-in: install the real torchvision to use learn2learn's data sets")


def __getattr__(name):
    return type(name, (_Missing,), {})
'''
SUBMODULES = ("transforms", "datasets", "datasets/folder", "datasets/omniglot", "datasets/utils", "models",
              "utils", "io")


def run(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def write_stand_in(site: Path) -> None:
    pkg = site / "torchvision"
    for sub in ("",) + SUBMODULES:
        d = pkg / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text(STAND_IN)
    (pkg / "__init__.py").write_text(STAND_IN + "\nfrom . import datasets, models, transforms, utils  # noqa\n"
                                     "__version__ = '0.0-stand-in'\n")


def install(venv: Path = VENV, pip_args: tuple[str, ...] = ()) -> Path:
    """Create ``venv`` and install the peers; returns its python."""
    import torch

    if not (venv / "bin" / "python").exists():
        run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    pip = (py, "-m", "pip", "install", "--no-input", *pip_args)
    run(*pip, f"torch=={torch.__version__}", "numpy", "pillow", "tqdm", "matplotlib", "cython", "gym",
        "requests", "scipy", "higher")
    run(*pip, "--no-deps", "-e", str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        run(py, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", tmp, LEARN2LEARN, *pip_args)
        (sdist,) = glob.glob(os.path.join(tmp, "learn2learn-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        (src,) = [p for p in glob.glob(os.path.join(tmp, "learn2learn-*")) if os.path.isdir(p)]
        pyx = glob.glob(os.path.join(src, "learn2learn", "**", "*.pyx"), recursive=True)
        run(py, "-m", "cython", "-3", *pyx)            # regenerate the C files for this Python
        run(*pip, "--no-deps", "--no-build-isolation", src)
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    write_stand_in(site)
    run(py, "-c", "import warnings; warnings.simplefilter('ignore'); import higher, learn2learn, metagrad; "
        "print('peers ok: higher', higher.__file__, '| learn2learn', learn2learn.__version__)")
    return venv / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("pip_args", nargs="*", help="extra arguments for pip (e.g. an index URL)")
    args = ap.parse_args(argv)
    install(args.venv, tuple(args.pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
