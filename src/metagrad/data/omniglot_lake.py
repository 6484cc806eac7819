"""Lake et al.'s 20 within-alphabet 20-way one-shot runs (``all_runs.zip``), the classic Omniglot test.

Each run holds 20 training images (``runNN/training/classKK.png``, one per class, from one evaluation alphabet)
and 20 test images (``runNN/test/itemMM.png``); ``runNN/class_labels.txt`` pairs each test item with its class,
one ``runNN/test/itemMM.png runNN/training/classKK.png`` per line. Published error rates: people 4.5%,
Bayesian Program Learning 3.3% (Lake et al., Science 2015).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..tasks import TaskBatch
from . import register
from .base import Benchmark
from .download import LAKE_RUNS_FILE, LAKE_RUNS_MD5, OMNIGLOT_URL, download_file
from .errors import DataError
from .files import FileTree
from .images import decode_ink, fill_parallel, resample_filter, resolve_root

RUNS, WAYS = 20, 20
#: Where the runs may sit under an Omniglot root: the zip, or the folder it extracts to.
RUN_PLACES = ("official/one-shot-classification/all_runs.zip", "one-shot-classification/all_runs.zip",
              "all_runs.zip", "official/one-shot-classification/all_runs", "one-shot-classification/all_runs",
              "all_runs")
_LABELS = re.compile(r"^(.*?)run(\d+)/class_labels\.txt$")


def find_runs(root: Path) -> Path:
    """The ``all_runs.zip`` (or its extracted folder) under ``root``, or a DataError that lists where it looked."""
    for place in RUN_PLACES:
        p = root / place
        if p.is_file() or (p.is_dir() and (p / "run01").is_dir()):
            return p
    raise DataError(f"omniglot-lake20: no all_runs.zip under {str(root)!r} (looked for {', '.join(RUN_PLACES)}): "
                    "pass the Omniglot root that holds one-shot-classification/all_runs.zip, or download=True")


def _parse_labels(text: str, run: int) -> list[int]:
    """The class (0-based) of test items 1..20, from ``class_labels.txt``."""
    pairs = {}
    for line in text.split("\n"):
        if line.strip():
            item = re.search(r"item(\d+)\.png", line)
            cls = re.search(r"class(\d+)\.png", line)
            if item is None or cls is None:
                raise DataError(f"omniglot-lake20: run {run:02d}: cannot parse class_labels.txt line {line!r}")
            pairs[int(item.group(1))] = int(cls.group(1)) - 1
    if sorted(pairs) != list(range(1, WAYS + 1)) or not all(0 <= c < WAYS for c in pairs.values()):
        raise DataError(f"omniglot-lake20: run {run:02d}: class_labels.txt does not list items 1..20 with classes "
                        "1..20: the runs are damaged; copy all_runs.zip again")
    return [pairs[i] for i in range(1, WAYS + 1)]


def lake_runs(root: str | os.PathLike[str] | None = None, image_size: int = 28,
              resample: str = "lanczos") -> list[TaskBatch]:
    """Lake's 20 runs, each a TaskBatch of one 20-way 1-shot task, images processed as by the Omniglot loader.

    Args:
        root: the Omniglot root (or a folder holding ``all_runs.zip``); default ``default_root("omniglot")``.
        image_size: side of the resized images (28, like the Omniglot benchmark).
        resample: PIL filter, as for the Omniglot benchmark.

    Returns:
        20 TaskBatches (T = 1): ``support_x [1, 20, 1, H, W]`` the training images of classes 1..20 with
        ``support_y = 0..19``; ``query_x [1, 20, 1, H, W]`` test items 1..20 with ``query_y`` their class.

    Example:
        >>> runs = lake_runs("shared/data/omniglot")
        >>> len(runs), runs[0].support_x.shape
        (20, torch.Size([1, 20, 1, 28, 28]))
    """
    path = find_runs(resolve_root("omniglot", root, "one-shot-classification/all_runs.zip"))
    tree = FileTree(path)
    prefixes = {int(m.group(2)): m.group(1) for m in map(_LABELS.match, tree.names) if m}
    if sorted(prefixes) != list(range(1, RUNS + 1)):
        raise DataError(f"omniglot-lake20: {str(path)!r} holds runs {sorted(prefixes)}, expected run01..run20 each "
                        "with class_labels.txt: copy all_runs.zip again")
    labels, files = [], []
    for r in range(1, RUNS + 1):
        base = f"{prefixes[r]}run{r:02d}"
        labels.append(_parse_labels(tree.read(f"{base}/class_labels.txt").decode(), r))
        files += [f"{base}/training/class{k:02d}.png" for k in range(1, WAYS + 1)]
        files += [f"{base}/test/item{m:02d}.png" for m in range(1, WAYS + 1)]
    resample_filter(resample)
    out = np.empty((len(files), image_size, image_size), np.uint8)
    fill_parallel(out, lambda i: decode_ink(tree.read(files[i]), image_size, resample, f"{files[i]} in {path}"))
    x = torch.div(torch.from_numpy(out), 255.0).view(RUNS, 2, WAYS, 1, image_size, image_size)
    support_y = torch.arange(WAYS).unsqueeze(0)
    return [TaskBatch(x[r, 0].unsqueeze(0), support_y.clone(), x[r, 1].unsqueeze(0),
                      torch.tensor([labels[r]], dtype=torch.long), (r + 1,)) for r in range(RUNS)]


@register("omniglot-lake20")
class OmniglotLake20(Benchmark):
    """Lake's 20 one-shot runs as a benchmark: every ``batch(i)`` is the same TaskBatch of all 20 runs (T = 20).

    Only ``split="test"``, ``ways=20``, ``shots=1`` are meaningful; ``queries`` and ``meta_batch_size`` are fixed
    by the runs (20 test items per run, 20 runs) and ignored. Evaluate with ``tasks(20)``; error rate is
    ``1 - accuracy`` (people 4.5%, BPL 3.3%).

    Example:
        >>> bench = metagrad.data.create("omniglot-lake20", "test", ways=20, shots=1)
        >>> batch = bench.batch(0)     # support_x [20, 20, 1, 28, 28], query_y [20, 20]
    """

    task_type = "classification"
    fixed_ways = WAYS
    num_tasks = RUNS        # the runs are a fixed set: evaluation takes each once

    def __init__(self, split: str = "test", ways: int = 20, shots: int = 1, queries: int = 1,
                 meta_batch_size: int = RUNS, seed: int = 0, root: str | os.PathLike[str] | None = None, *,
                 image_size: int = 28, resample: str = "lanczos", download: bool = False,
                 download_url: str = OMNIGLOT_URL, download_md5: str | None = LAKE_RUNS_MD5) -> None:
        if split != "test":
            raise DataError(f"omniglot-lake20: unknown split {split!r}: Lake's runs are a test set only, use "
                            "split='test' (meta-train on 'omniglot' with protocol='lake')")
        if ways != WAYS or shots != 1:
            raise DataError(f"omniglot-lake20: the runs are 20-way 1-shot, got ways={ways}, shots={shots}: pass "
                            "ways=20, shots=1")
        super().__init__("test", RUNS, seed)
        if download:
            base = Path(root).expanduser() if root is not None else resolve_root("omniglot", None, "all_runs.zip")
            try:
                find_runs(base)
            except DataError:
                download_file(f"{download_url.rstrip('/')}/{LAKE_RUNS_FILE}", base / LAKE_RUNS_FILE, download_md5)
            root = base
        runs = lake_runs(root, int(image_size), resample)
        self.name = "omniglot-lake20"
        self.ways, self.shots, self.queries = WAYS, 1, 1
        self.x_shape = (1, int(image_size), int(image_size))
        self.out_dim = WAYS
        self._batch = TaskBatch(torch.cat([r.support_x for r in runs]), torch.cat([r.support_y for r in runs]),
                                torch.cat([r.query_x for r in runs]), torch.cat([r.query_y for r in runs]),
                                tuple(range(1, RUNS + 1)))

    def batch(self, index: int) -> TaskBatch:
        b = self._batch  # the runs are fixed: every index gives them all (copies, so callers may modify them)
        return TaskBatch(b.support_x.clone(), b.support_y.clone(), b.query_x.clone(), b.query_y.clone(), b.task_ids)
