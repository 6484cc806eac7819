"""Benchmarks from the user's own labelled data: :func:`from_tensors` and :func:`from_dataset`.

Both return a :class:`~metagrad.data.Benchmark` whose meta-batch ``i`` is a pure function of
``(seed, split, i)``, drawn by the sampler every image benchmark uses, so training, exact resume, distributed
shares and evaluation treat it like a shipped benchmark. Inputs are used as given (same dtype, same values: no
rescaling); labels are remapped to ``0..ways-1`` per task. A dataset is read lazily: a meta-batch reads the
items its tasks sample and nothing else.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..tasks import TaskBatch
from .base import SPLITS, Benchmark, check_split, generator
from .errors import DataError
from .images import check_episodes, draw_episodes, split_episodes

Classes = Mapping[str, Sequence[int]] | Sequence[float]


class _Reader(Protocol):
    def start(self, position: int) -> tuple[int, ...]: ...  # the input shape, from the item at ``position``

    def __call__(self, positions: torch.Tensor) -> torch.Tensor: ...


def _as_labels(y: Any, what: str) -> torch.Tensor:
    """``y`` as an int64 tensor ``[N]``, or a DataError when it holds anything but integers."""
    fix = f"{what} must be integer class labels: map them to ints first (e.g. torch.unique(y, return_inverse=True)[1])"
    if isinstance(y, torch.Tensor) or (hasattr(y, "__array__") and hasattr(y, "dtype")):  # a tensor or an array
        try:
            t = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{what} has dtype {y.dtype}; {fix}") from e
    else:
        values = list(y)
        bad = next((v for v in values if not _is_int(v)), None)
        if bad is not None:
            raise DataError(f"{what} holds {bad!r}, not an integer; {fix}")
        t = torch.tensor([int(v) for v in values], dtype=torch.long)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{what} has dtype {t.dtype}; {fix}")
    if t.dim() != 1:
        raise DataError(f"{what} must be one label per item, shape [N], got {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.long)


def _is_int(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def classes_of_split(classes: Classes, labels: torch.Tensor, split: str, split_seed: int) -> list[int]:
    """The labels of ``split``'s classes, from a mapping split → labels or from fractions (train, val, test)."""
    present = sorted(set(labels.tolist()))
    if isinstance(classes, Mapping):
        unknown = [k for k in classes if k not in SPLITS]
        if unknown:
            raise DataError(f"classes has a split {unknown[0]!r}: use the keys {', '.join(SPLITS)}")
        if split not in classes:
            raise DataError(f"classes has no {split!r} entry: add classes[{split!r}] = its labels")
        seen: dict[int, str] = {}
        for name, labs in classes.items():
            for lab in _as_labels(labs, f"classes[{name!r}]").tolist():
                if lab in seen:
                    where = "twice in" if seen[lab] == name else f"in both {seen[lab]!r} and"
                    raise DataError(f"class {lab} is {where} {name!r}: list each class in one split only")
                seen[lab] = name
        chosen = _as_labels(classes[split], f"classes[{split!r}]").tolist()
        missing = [lab for lab in chosen if lab not in set(present)]
        if missing:
            raise DataError(f"class {missing[0]} of classes[{split!r}] has no items in the labels: remove it or fix "
                            "the labels")
        return chosen
    fractions = list(classes) if not isinstance(classes, str | bytes) else []
    if (len(fractions) != 3 or not all(isinstance(f, numbers.Real) and 0 <= f <= 1 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6):
        raise DataError(f"classes must map split → labels or be fractions (train, val, test) in [0, 1] summing to "
                        f"1, e.g. (0.6, 0.2, 0.2); got {classes!r}")
    # A permutation seeded apart from the stream's seed: evaluation seeds its val/test streams on its own, and the
    # classes of each split must stay the same whatever seed a stream has.
    perm = torch.randperm(len(present), generator=generator("classes", int(split_seed))).tolist()
    n, cum = len(present), [0.0]
    for f in fractions:
        cum.append(cum[-1] + f)
    cuts = [round(c * n) for c in cum[:3]] + [n]
    k = SPLITS.index(split)
    return [present[j] for j in perm[cuts[k]:cuts[k + 1]]]


class _UserEpisodes(Benchmark):
    """N-way K-shot episodes over the user's items, read through ``reader`` (positions → stacked inputs)."""

    task_type = "classification"

    def __init__(self, reader: _Reader, labels: torch.Tensor, split: str, *, name: str, classes: Classes,
                 ways: int, shots: int, queries: int, meta_batch_size: int, seed: int, split_seed: int) -> None:
        super().__init__(check_split(split), meta_batch_size, seed)
        self.name = name
        chosen = classes_of_split(classes, labels, split, split_seed)
        if not chosen:
            raise DataError(f"{name}: the {split} split has no classes: give it some in classes= (a larger "
                            "fraction or a list of labels)")
        values, index = torch.tensor(chosen).sort()
        members = torch.isin(labels, values).nonzero().squeeze(1)
        cls_of = index[torch.searchsorted(values, labels[members])]  # position in `chosen` of each item's class
        counts = torch.bincount(cls_of, minlength=len(chosen))
        check_episodes(name, split, ways, shots, queries, counts, chosen, unit="items")
        self.order = members[cls_of.argsort(stable=True)]  # the split's item positions, class after class
        self.counts, self.offsets = counts, torch.cumsum(counts, 0) - counts
        self.class_labels = chosen
        self.reader = reader
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.x_shape = reader.start(int(self.order[0]))
        self.out_dim = self.ways

    @property
    def num_classes(self) -> int:
        """How many classes the split holds."""
        return len(self.class_labels)

    def batch(self, index: int) -> TaskBatch:
        # One stream key for tensors and datasets: the same items and seed give the same episodes in either form.
        g = generator("user", self.seed, self.split, int(index))
        T, per = self.meta_batch_size, self.shots + self.queries
        cls, pick = draw_episodes(self.counts, g, T, self.ways, per)
        positions = self.order[self.offsets[cls].unsqueeze(-1) + pick]  # [T, ways, per] item positions
        x = self.reader(positions.reshape(-1))
        return split_episodes(x.view(T, self.ways, per, *x.shape[1:]), self.shots)


class _TensorReader:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def start(self, position: int) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return self.x[positions.to(self.x.device)]


def _read_item(dataset: Any, i: int) -> tuple[torch.Tensor, Any]:
    """``dataset[i]`` as (input tensor, integer label), or a one-line DataError naming the fix."""
    item = dataset[i]
    if not isinstance(item, Sequence) or len(item) < 2:
        raise DataError(f"dataset[{i}] is a {type(item).__name__}, not an (x, label) pair: wrap the dataset so "
                        "its items are (x, label)")
    try:
        x = torch.as_tensor(item[0])
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"dataset[{i}][0] is a {type(item[0]).__name__}, not an array: convert it in the "
                        "dataset (e.g. a ToTensor transform)") from e
    if not _is_int(item[1]):
        raise DataError(f"dataset[{i}] has label {item[1]!r}, not an integer class label: make the dataset return "
                        "integer class labels (map names to ints)")
    return x, item[1]


class _DatasetReader:
    """Reads ``dataset[i]`` for the positions asked (each once per call) and checks every item on the way."""

    def __init__(self, dataset: Any, labels: torch.Tensor) -> None:
        self.dataset, self.labels = dataset, labels

    def start(self, position: int) -> tuple[int, ...]:
        x0 = self._item(position)
        self.first, self.x_shape, self.dtype = position, tuple(x0.shape), x0.dtype
        return self.x_shape

    def _item(self, i: int) -> torch.Tensor:
        x, label = _read_item(self.dataset, i)
        if int(label) != int(self.labels[i]):
            raise DataError(f"dataset[{i}] has label {int(label)} but labels[{i}] is {int(self.labels[i])}: pass "
                            "labels= in the dataset's order, or leave it out")
        return x

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        unique, inverse = positions.unique(return_inverse=True)
        items = []
        for i in unique.tolist():
            x = self._item(i)
            if tuple(x.shape) != self.x_shape or x.dtype != self.dtype:
                raise DataError(f"items differ in shape: dataset[{i}][0] is {x.dtype} {tuple(x.shape)} but "
                                f"dataset[{self.first}][0] is {self.dtype} {self.x_shape}: make every item one "
                                "shape and dtype (e.g. a Resize transform)")
            items.append(x)
        return torch.stack(items)[inverse]


def _as_inputs(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Sequence) and x and all(isinstance(v, torch.Tensor) for v in x):
        for i, v in enumerate(x):
            if v.shape != x[0].shape or v.dtype != x[0].dtype:
                raise DataError(f"items differ in shape: x[{i}] is {v.dtype} {tuple(v.shape)} but x[0] is "
                                f"{x[0].dtype} {tuple(x[0].shape)}: resize or pad every item to one shape and dtype")
        return torch.stack(list(x))
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"x must be a tensor [N, ...] or a list of equal-shaped tensors: {e}") from e


def from_tensors(x: Any, y: Any, split: str, *, classes: Classes, ways: int, shots: int, queries: int,
                 meta_batch_size: int, seed: int, split_seed: int = 0) -> Benchmark:
    """A few-shot classification benchmark over labelled tensors: item ``i`` is ``x[i]`` of class ``y[i]``.

    Args:
        x: inputs ``[N, *x_shape]`` (a tensor, a numpy array or a list of equal-shaped tensors), used as given:
            same dtype, same values (normalise them beforehand if the model needs it).
        y: integer class labels ``[N]`` (any integers; each task relabels its classes ``0..ways-1``).
        split: "train" | "val" | "test".
        classes: which classes each split holds: a mapping ``{"train": [labels], "val": [...], "test": [...]}``
            (class-disjoint), or fractions ``(train, val, test)`` summing to 1 that split the sorted label set by
            a permutation seeded with ``split_seed``.
        ways, shots, queries: N-way K-shot episodes with Q query items per class.
        meta_batch_size: tasks per TaskBatch.
        seed: the stream's seed; meta-batch ``i`` is a pure function of ``(seed, split, i)``.
        split_seed: the seed of the fractions' class permutation (kept apart from ``seed`` so that streams with
            different seeds split the classes alike).

    Raises:
        DataError: one line naming the fix (too few classes or items, a class in two splits, non-integer labels,
            items of different shapes).

    Example:
        >>> x, y = torch.randn(200, 8), torch.arange(200) % 20
        >>> train = metagrad.data.from_tensors(x, y, "train", classes=(0.6, 0.2, 0.2), ways=5, shots=1,
        ...                                    queries=5, meta_batch_size=4, seed=0)
        >>> train.batch(0).support_x.shape
        torch.Size([4, 5, 8])
    """
    inputs, labels = _as_inputs(x), _as_labels(y, "y")
    if inputs.dim() < 1 or len(inputs) != len(labels):
        raise DataError(f"x has {len(inputs) if inputs.dim() else 0} items but y has {len(labels)} labels: give "
                        "one label per item")
    return _UserEpisodes(_TensorReader(inputs), labels, split, name="tensors", classes=classes, ways=ways,
                         shots=shots, queries=queries, meta_batch_size=meta_batch_size, seed=seed,
                         split_seed=split_seed)


def from_dataset(dataset: Any, split: str, *, labels: Any = None, classes: Classes, ways: int, shots: int,
                 queries: int, meta_batch_size: int, seed: int, split_seed: int = 0) -> Benchmark:
    """A few-shot classification benchmark over a map-style dataset whose items are ``(x, label)``.

    The dataset is read lazily: building the benchmark reads one item (for the input shape), and meta-batch
    ``i`` reads only the items its tasks sample. Without ``labels`` every item is read once to learn its label;
    pass ``labels`` (e.g. ``dataset.targets`` of a torchvision dataset) to skip that pass.

    Args:
        dataset: anything with ``len(dataset)`` and ``dataset[i] -> (x, label)``; ``x`` a tensor or array, all
            of one shape and dtype, used as given.
        split, classes, ways, shots, queries, meta_batch_size, seed, split_seed: as in :func:`from_tensors`.
        labels: the integer label of every item, in the dataset's order (checked against each item read).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.randn(200, 8), torch.arange(200) % 20)
        >>> test = metagrad.data.from_dataset(ds, "test", classes=(0.6, 0.2, 0.2), ways=5, shots=1, queries=5,
        ...                                   meta_batch_size=4, seed=0)
    """
    n = len(dataset)
    if n == 0:
        raise DataError("the dataset is empty: give it (x, label) items")
    if labels is None:
        labels = [_read_item(dataset, i)[1] for i in range(n)]  # the indexing pass: labels= skips it
    labels_t = _as_labels(labels, "labels")
    if len(labels_t) != n:
        raise DataError(f"labels has {len(labels_t)} entries but the dataset has {n} items: give one label per item")
    return _UserEpisodes(_DatasetReader(dataset, labels_t), labels_t, split, name="dataset", classes=classes,
                         ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size, seed=seed,
                         split_seed=split_seed)
