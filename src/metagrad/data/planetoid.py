"""Few-shot node classification on the Planetoid citation graphs Cora and CiteSeer.

Data: Yang, Cohen & Salakhutdinov, "Revisiting Semi-Supervised Learning with Graph Embeddings", ICML 2016
(the ``ind.<name>.*`` files, from Sen et al. 2008). Graph preprocessing follows Kipf & Welling, "Semi-Supervised
Classification with Graph Convolutional Networks", ICLR 2017: the symmetric normalised adjacency with self loops
``Â = D^-1/2 (A + I) D^-1/2``. Episodes follow Meta-GNN (Zhou et al., CIKM 2019): N-way K-shot tasks over
disjoint class sets of one transductive graph (the whole graph is visible; only labels are split).

Class split (fixed, so that a benchmark name means one protocol; classes are the files' label ids):
    Cora (7):     train {0, 1, 2}, val {3, 4}, test {5, 6}.
    CiteSeer (6): train {0, 1},    val {2, 3}, test {4, 5}.
    Val is class-disjoint, like every other benchmark here, because it is what model selection reads: a val made
    of held-out nodes of the train classes rose to 91% while test accuracy fell to 61% (Cora 2-way 5-shot, MAML).
    ``val_classes=()`` gives that Meta-GNN-like variant anyway (train keeps every non-test class, val holds out
    ``val_fraction`` of their nodes); ``test_classes=(...)`` / ``val_classes=(...)`` pick other classes, e.g. the
    cross-validation folds of Meta-GNN or three test classes for 3-way.

Rotations (``fold=k``, k = 0 … ⌈C/2⌉ − 1 for C classes): one fixed test pair makes every test episode a sample of
that one pair, so a study rotates it: fold k tests on classes {2k, 2k+1} mod C and validates on the next pair
{2k+2, 2k+3} mod C (or on held-out nodes with ``val_classes=()``); the other classes train. Every class is a
test class in some fold (Cora: {0,1} {2,3} {4,5} {6,0}; CiteSeer: {0,1} {2,3} {4,5}), and a report averages a
method over the folds (:mod:`metagrad.report`).

Features: ``feature_norm="none"`` (default) keeps the files' binary bag-of-words; ``"row"`` divides each row by
its sum, the GCN convention. Row sums of 18 (Cora) and 32 (CiteSeer) make row-normalised inputs ~0.05, so MAML's
plain-SGD inner step barely moves a GCN: in our runs MAML stayed at 50-57% test accuracy with them (α 0.5-20,
200 meta-steps) against ~70% with binary features.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..tasks import TaskBatch
from . import register
from .base import Benchmark, generator
from .errors import DataError
from .images import resolve_root

_DIRS = {"cora": "Cora", "citeseer": "CiteSeer"}
# sha256 of every raw file, from shared/data/planetoid/PROVENANCE.md. Pickles run code when loaded, so nothing
# is unpickled before all eight files of a data set match.
_SHA256 = {
    "cora": {
        "x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
        "tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
        "allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
        "y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
        "ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
        "ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
        "graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
        "test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    },
    "citeseer": {
        "x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
        "tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
        "allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
        "y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
        "ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
        "ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
        "graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
        "test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    },
}


@dataclass(frozen=True)
class Graph:
    """One citation graph, ready for a GCN.

    Attributes:
        name: "cora" or "citeseer".
        features: ``[N, F]`` float32 sparse COO: binary bag-of-words, or rows summing to 1 with
            ``feature_norm="row"`` (zero rows stay zero).
        adjacency: ``[N, N]`` float32 sparse COO ``D^-1/2 (A + I) D^-1/2``.
        labels: ``[N]`` int64 class ids; -1 for CiteSeer's 15 nodes that have no features and no label.
        num_edges: undirected edges of ``A`` without self loops or duplicates (Cora 5278, CiteSeer 4552).
    """

    name: str
    features: torch.Tensor
    adjacency: torch.Tensor
    labels: torch.Tensor
    num_edges: int

    @property
    def num_nodes(self) -> int:
        return self.features.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def load_planetoid(name: str, root: str | os.PathLike | None = None, feature_norm: str = "none") -> Graph:
    """Read, verify and assemble ``ind.<name>.*`` under ``root`` (``<root>/<Name>/raw/`` or a folder with the files).

    Cached per (name, root, feature_norm): train, val and test benchmarks share one graph.

    Args:
        name: "cora" or "citeseer".
        root: the folder holding ``Cora/raw`` and ``CiteSeer/raw``; default ``$METAGRAD_DATA/planetoid`` or a
            ``shared/data/planetoid`` next to or above the working directory or this package.
        feature_norm: "none" (binary bag-of-words as stored) or "row" (each row divided by its sum).

    Raises:
        DataError: unknown name or option, missing root or file, or a file whose sha256 is not the published one.
    """
    if name not in _DIRS:
        raise DataError(f"unknown Planetoid data set {name!r}: use one of {', '.join(_DIRS)}")
    if feature_norm not in ("none", "row"):
        raise DataError(f"feature_norm must be 'none' or 'row', got {feature_norm!r}")
    folder = resolve_root("planetoid", root, hint=f"{_DIRS[name]}/raw/ind.{name}.*")
    return _load_cached(name, str(folder.resolve()), feature_norm)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str, feature_norm: str) -> Graph:
    folder = _find_folder(name, Path(root))
    raw = _read_verified(name, folder)
    features, labels = _assemble(raw)
    if feature_norm == "row":
        features = _row_normalize(features)
    adjacency, num_edges = _normalized_adjacency(raw["graph"], features.shape[0])
    return Graph(name, _to_torch_sparse(features), adjacency, torch.from_numpy(labels), num_edges)


def _find_folder(name: str, root: Path) -> Path:
    for folder in (root / _DIRS[name] / "raw", root / _DIRS[name], root):
        if (folder / f"ind.{name}.x").is_file():
            return folder
    raise DataError(f"no ind.{name}.x under {root}: expected the layout {root}/{_DIRS[name]}/raw/ind.{name}.*")


def _scipy_sparse() -> Any:
    # Imported lazily: scipy is the optional "graph" extra, and every data module is imported on registry use.
    try:
        import scipy.sparse  # type: ignore[import-untyped]
    except ImportError as e:
        raise ImportError("the Planetoid benchmarks need scipy: pip install 'metagrad[graph]'") from e
    return scipy.sparse


def _read_verified(name: str, folder: Path) -> dict[str, Any]:
    blobs = {}
    for key, digest in _SHA256[name].items():
        path = folder / f"ind.{name}.{key}"
        if not path.is_file():
            raise DataError(f"missing Planetoid file {path}")
        blobs[key] = path.read_bytes()
        if hashlib.sha256(blobs[key]).hexdigest() != digest:
            raise DataError(f"sha256 mismatch for {path}: refusing to unpickle it; copy the original file back")
    raw: dict[str, Any] = {k: _SafeUnpickler(b).load() for k, b in blobs.items() if k != "test.index"}
    raw["test.index"] = np.array(blobs["test.index"].split(), dtype=np.int64)
    return raw


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only the classes the Planetoid files use (a second guard after the checksums).

    It also maps the long-deprecated ``scipy.sparse.csr`` path to ``scipy.sparse.csr_matrix``.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("collections", "defaultdict"), ("__builtin__", "list"), ("builtins", "list")})

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")  # Python-2 pickles

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("scipy.sparse.csr", "csr_matrix"):
            return _scipy_sparse().csr_matrix
        if (module, name) not in self._ALLOWED:
            raise DataError(f"unexpected object {module}.{name} in a Planetoid pickle")
        return super().find_class(module, name)


def _assemble(raw: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """Features ``[N, F]`` (scipy CSR) and labels ``[N]`` in node order, as Kipf & Welling's ``load_data``.

    ``allx`` holds nodes ``0..len(allx)-1``; row k of ``tx`` is node ``test.index[k]`` (the file is not sorted).
    Ids in the test range that ``test.index`` lacks (CiteSeer: 15) keep zero features and get label -1.
    """
    sp = _scipy_sparse()
    allx, tx, ally, ty, test_ids = raw["allx"], raw["tx"], raw["ally"], raw["ty"], raw["test.index"]
    n_all = allx.shape[0]
    if test_ids.min() != n_all or len(test_ids) != tx.shape[0]:
        raise DataError("Planetoid test.index does not continue allx: unexpected file contents")
    n = int(test_ids.max()) + 1
    rows = np.concatenate([np.arange(n_all), test_ids])  # node id of each stacked row
    stacked = sp.vstack([allx, tx]).tocoo()
    features = sp.csr_matrix((stacked.data, (rows[stacked.row], stacked.col)), shape=(n, allx.shape[1]))
    onehot = np.vstack([ally, ty])
    labels = np.full(n, -1, dtype=np.int64)
    labels[rows] = np.where(onehot.sum(1) > 0, onehot.argmax(1), -1)
    return features, labels


def _row_normalize(features: Any) -> Any:
    sp = _scipy_sparse()
    sums = np.asarray(features.sum(1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums, dtype=np.float64), where=sums > 0)
    return (sp.diags(inv) @ features).tocsr()


def _normalized_adjacency(graph: dict[int, list[int]], n: int) -> tuple[torch.Tensor, int]:
    """``D^-1/2 (A + I) D^-1/2`` and the undirected edge count of ``A``.

    The raw dict lists some edges twice (Cora: 302 repeated entries) and 124 CiteSeer nodes list themselves; like PyG we
    keep a binary, symmetric ``A`` without self loops and then add exactly one self loop per node (Kipf's code
    would weight a listed self loop 2).
    """
    sp = _scipy_sparse()
    src = np.fromiter((u for u, vs in graph.items() for _ in vs), dtype=np.int64)
    dst = np.fromiter((v for vs in graph.values() for v in vs), dtype=np.int64)
    if len(src) and max(src.max(), dst.max()) >= n:
        raise DataError(f"Planetoid graph refers to node {max(src.max(), dst.max())} but there are {n} nodes")
    keep = src != dst
    a = sp.coo_matrix((np.ones(int(keep.sum())), (src[keep], dst[keep])), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64)  # symmetric and binary: duplicates count once
    num_edges = a.nnz // 2
    a = a + sp.eye(n)
    d = 1.0 / np.sqrt(np.asarray(a.sum(1)).ravel())
    return _to_torch_sparse(sp.diags(d) @ a @ sp.diags(d)), num_edges


def _to_torch_sparse(m: Any) -> torch.Tensor:
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(idx, values, coo.shape, check_invariants=True).coalesce()


class PlanetoidFewShot(Benchmark):
    """N-way K-shot node classification episodes on one Planetoid graph (see the module docstring for splits).

    A task's inputs are node ids: ``support_x`` is int64 ``[T, ways·shots]`` (class-major: ``shots`` nodes of
    label 0, then of label 1, …), ``query_x`` ``[T, ways·queries]``. The model sees the whole graph through
    ``bench.graph`` or ``metagrad.models.create("gcn", bench)``. Batch ``i`` is a pure function of (seed, split, i).

    Args:
        name: "cora" or "citeseer".
        split: "train" | "val" | "test".
        ways, shots, queries: classes per task, support and query nodes per class.
        meta_batch_size: tasks per batch.
        seed: the stream's seed.
        root: the folder holding ``Cora/raw`` and ``CiteSeer/raw`` (default: see :func:`load_planetoid`).
        test_classes: class ids of the test split (default: the last two).
        val_classes: class ids of the val split (default: the two before the test classes); ``()`` makes val
            a held-out share of the train classes' nodes instead.
        val_fraction: that share, used only with ``val_classes=()``.
        feature_norm: "none" (binary features, default) or "row" (Kipf & Welling's row normalisation).
        fold: rotation k of the held-out classes (see the module docstring); not with ``test_classes``.

    Example:
        >>> bench = metagrad.data.create("cora", "train", ways=2, shots=5, queries=10, meta_batch_size=4)
        >>> batch = bench.batch(0)
        >>> batch.support_x.shape, batch.query_x.shape       # node ids
        (torch.Size([4, 10]), torch.Size([4, 20]))
        >>> model = metagrad.models.create("gcn", bench, hidden=16)   # a GCN over the whole graph
    """

    task_type = "classification"
    x_shape: tuple[int, ...] = ()

    def __init__(self, name: str, split: str = "train", ways: int = 2, shots: int = 5, queries: int = 10,
                 meta_batch_size: int = 4, seed: int = 0, root: str | os.PathLike | None = None,
                 test_classes: Sequence[int] | None = None, val_classes: Sequence[int] | None = None,
                 val_fraction: float = 0.2, feature_norm: str = "none", fold: int | None = None) -> None:
        super().__init__(split, meta_batch_size, seed)
        if ways < 2 or shots < 1 or queries < 1:
            raise ValueError(f"{name}: need ways >= 2, shots >= 1, queries >= 1, got {ways}, {shots}, {queries}")
        self.name, self.ways, self.shots, self.queries = name, int(ways), int(shots), int(queries)
        self.out_dim = self.ways
        self.graph = load_planetoid(name, root, feature_norm)
        if fold is not None:
            if test_classes is not None:
                raise DataError(f"{name}: pass fold or test_classes, not both")
            test_classes, rotated_val = fold_classes(self.graph.num_classes, fold)
            val_classes = rotated_val if val_classes is None else val_classes
        self.classes, self.pools = _split_pools(self.graph, split, test_classes, val_classes, val_fraction)
        if len(self.classes) < ways:
            raise DataError(f"{name} split {split!r} has {len(self.classes)} classes {self.classes}, fewer than "
                            f"ways={ways}: lower ways or pass test_classes/val_classes")
        smallest = min(len(p) for p in self.pools)
        if smallest < shots + queries:
            raise DataError(f"{name} split {split!r}: a class has only {smallest} nodes, fewer than "
                            f"shots + queries = {shots + queries}")

    def batch(self, index: int) -> TaskBatch:
        g = generator(self.name, self.seed, self.split, int(index))
        k = self.shots + self.queries
        picks = torch.empty(self.meta_batch_size, self.ways, k, dtype=torch.int64)
        for t in range(self.meta_batch_size):
            chosen = torch.randperm(len(self.classes), generator=g)[: self.ways]
            for j, c in enumerate(chosen.tolist()):
                pool = self.pools[c]
                picks[t, j] = pool[torch.randperm(len(pool), generator=g)[:k]]
        t = self.meta_batch_size
        first = index * t
        return TaskBatch(
            picks[:, :, : self.shots].reshape(t, -1),
            _class_major_labels(t, self.ways, self.shots),
            picks[:, :, self.shots:].reshape(t, -1),
            _class_major_labels(t, self.ways, self.queries),
            task_ids=tuple(range(first, first + t)),
        )


def fold_classes(n_classes: int, fold: int) -> tuple[list[int], list[int]]:
    """Test and val classes of rotation ``fold``: {2k, 2k+1} and {2k+2, 2k+3}, mod ``n_classes``."""
    folds = (n_classes + 1) // 2
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise DataError(f"fold must be an integer in 0..{folds - 1} for {n_classes} classes, got {fold!r}")
    return [2 * fold % n_classes, (2 * fold + 1) % n_classes], \
        [(2 * fold + 2) % n_classes, (2 * fold + 3) % n_classes]


def _class_major_labels(tasks: int, ways: int, per_class: int) -> torch.Tensor:
    """``[tasks, ways·per_class]``: 0 … 0, 1 … 1, …, each label ``per_class`` times."""
    return torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).contiguous()


def _split_pools(graph: Graph, split: str, test_classes: Sequence[int] | None, val_classes: Sequence[int] | None,
                 val_fraction: float) -> tuple[list[int], list[torch.Tensor]]:
    """The split's class ids and, per class, the node ids its episodes draw from."""
    name, n_cls = graph.name, graph.num_classes
    test = sorted(test_classes) if test_classes is not None else list(range(n_cls - 2, n_cls))
    rest = [c for c in range(n_cls) if c not in test]
    val = sorted(val_classes) if val_classes is not None else rest[-2:]
    for c in (*test, *val):
        if not 0 <= c < n_cls:
            raise DataError(f"{name} has classes 0..{n_cls - 1}, got class {c} in test_classes/val_classes")
    if set(test) & set(val) or len(set(test)) != len(test) or len(set(val)) != len(val):
        raise DataError(f"{name}: test_classes {test} and val_classes {val} must not repeat or overlap")
    train = [c for c in rest if c not in val]
    if not train:
        raise DataError(f"{name}: no classes left for train after test {test} and val {val}")
    nodes = {c: torch.nonzero(graph.labels == c).flatten() for c in range(n_cls)}  # label -1 never matches
    if val or split == "test":
        classes = {"train": train, "val": val, "test": test}[split]
        return classes, [nodes[c] for c in classes]
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{name}: val_fraction must be in (0, 1) with val_classes=(), got {val_fraction}")
    # A fixed permutation (independent of the stream seed): which nodes are val is part of the benchmark's
    # definition, like a published split list.
    pools = []
    for c in train:
        perm = nodes[c][torch.randperm(len(nodes[c]), generator=generator("planetoid-val", name, c))]
        n_val = round(val_fraction * len(perm))
        pools.append(perm[:n_val] if split == "val" else perm[n_val:])
    return train, pools


def _factory(name: str):
    def build(**kwargs: Any) -> PlanetoidFewShot:
        return PlanetoidFewShot(name, **kwargs)

    build.__doc__ = f"The ``{name}`` few-shot node classification benchmark (see :class:`PlanetoidFewShot`)."
    build.__signature__ = inspect.signature(functools.partial(PlanetoidFewShot, name))  # type: ignore[attr-defined]
    return build


register("cora")(_factory("cora"))
register("citeseer")(_factory("citeseer"))

__all__ = ["Graph", "PlanetoidFewShot", "fold_classes", "load_planetoid"]
