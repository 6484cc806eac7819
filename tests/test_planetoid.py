"""Cora / CiteSeer few-shot node classification and the GCN base learner.

Counts against the published numbers, the standard assembly, episodes (disjoint class sets, balance, seeding),
one-line errors, the GCN's shapes / feature hook / functional_call / batched path, second-order derivatives
through the sparse products checked by finite differences in float64, and a short hand-written MAML run.

The data comes from the shared copy (``<repo>/../shared/data/planetoid`` or ``$METAGRAD_DATA/planetoid``);
tests that need it are skipped cleanly when it is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metagrad import data, models
from metagrad.data.errors import DataError
from metagrad.data.planetoid import _read_verified, load_planetoid
from metagrad.models.gcn import GCN


def _shared_root() -> Path | None:
    env = os.environ.get("METAGRAD_DATA")
    for p in ([Path(env) / "planetoid"] if env else []) + [Path(__file__).resolve().parents[2] / "shared/data/planetoid"]:
        if (p / "Cora/raw/ind.cora.x").is_file() and (p / "CiteSeer/raw/ind.citeseer.x").is_file():
            return p
    return None


ROOT = _shared_root()
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(ROOT is None, reason="shared Planetoid data not found (set METAGRAD_DATA)")]


def make(name: str = "cora", split: str = "train", **kw: object) -> data.Benchmark:
    args: dict = {"ways": 2, "shots": 5, "queries": 10, "meta_batch_size": 4, "seed": 0, "root": ROOT}
    return data.create(name, split=split, **{**args, **kw})


# ------------------------------------------------------------------------------------------------ the graphs
# Published: Yang et al. 2016 / Kipf & Welling 2017 (nodes, features, classes); PyG's edge_index after removing
# self loops and duplicates (10556 / 2 and 9104 / 2 undirected edges).
@pytest.mark.parametrize("name,nodes,features,classes,edges,unlabelled", [
    ("cora", 2708, 1433, 7, 5278, 0),
    ("citeseer", 3327, 3703, 6, 4552, 15),
])
def test_counts_match_published(name: str, nodes: int, features: int, classes: int, edges: int,
                                unlabelled: int) -> None:
    g = load_planetoid(name, ROOT)
    assert (g.num_nodes, g.num_features, g.num_classes, g.num_edges) == (nodes, features, classes, edges)
    assert int((g.labels == -1).sum()) == unlabelled
    # CiteSeer's nodes missing from test.index have zero features; every labelled node has some.
    row_nnz = torch.zeros(nodes, dtype=torch.long).index_add_(
        0, g.features.indices()[0], torch.ones(g.features._nnz(), dtype=torch.long))
    assert bool((row_nnz[g.labels == -1] == 0).all()) and bool((row_nnz[g.labels >= 0] > 0).all())
    a = g.adjacency
    assert a._nnz() == 2 * edges + nodes  # symmetric, one self loop per node, no duplicates
    assert torch.equal(a.to_dense(), a.to_dense().t())


def test_adjacency_is_symmetric_normalised() -> None:
    # D^-1/2 (A + I) D^-1/2 has sqrt(deg) as eigenvector with eigenvalue 1 (deg counts the self loop).
    g = load_planetoid("cora", ROOT)
    a = g.adjacency.double()
    deg = torch.zeros(g.num_nodes, dtype=torch.float64).index_add_(
        0, a.indices()[0], torch.ones(a._nnz(), dtype=torch.float64))
    s = deg.sqrt().unsqueeze(1)
    torch.testing.assert_close(torch.sparse.mm(a, s), s)


def test_assembly_puts_test_rows_at_test_index() -> None:
    # Row k of tx / ty belongs to node test.index[k] (the file is unsorted): Kipf & Welling's reordering.
    raw = _read_verified("citeseer", ROOT / "CiteSeer/raw")
    g = load_planetoid("citeseer", ROOT)
    ids = torch.from_numpy(raw["test.index"])
    dense = g.features.to_dense()
    torch.testing.assert_close(dense[ids[:50]], torch.from_numpy(raw["tx"][:50].toarray()))
    assert torch.equal(g.labels[ids], torch.from_numpy(raw["ty"].argmax(1)))
    assert torch.equal(g.labels[:100], torch.from_numpy(raw["ally"][:100].argmax(1)))


def test_row_normalised_features() -> None:
    g = load_planetoid("citeseer", ROOT, feature_norm="row")
    sums = torch.sparse.sum(g.features, 1).to_dense()
    torch.testing.assert_close(sums[g.labels >= 0], torch.ones(int((g.labels >= 0).sum())))
    assert bool((sums[g.labels == -1] == 0).all())


# ------------------------------------------------------------------------------------------------ episodes
@pytest.mark.parametrize("name", ["cora", "citeseer"])
def test_splits_are_class_disjoint_and_episodes_balanced(name: str) -> None:
    labels = load_planetoid(name, ROOT).labels
    seen = {}
    for split in ("train", "val", "test"):
        bench = make(name, split, queries=7)
        assert (bench.task_type, bench.x_shape, bench.out_dim) == ("classification", (), 2)
        classes = set()
        for i in range(3):
            b = bench.batch(i)
            assert b.support_x.shape == (4, 10) and b.query_x.shape == (4, 14) and b.support_x.dtype == torch.int64
            for t in range(4):
                sx, sy, qx, qy = b.support_x[t], b.support_y[t], b.query_x[t], b.query_y[t]
                assert torch.equal(torch.bincount(sy), torch.tensor([5, 5]))
                assert torch.equal(torch.bincount(qy), torch.tensor([7, 7]))
                assert len(set(sx.tolist()) | set(qx.tolist())) == 24  # no node twice in a task
                for y in range(2):  # one class per label, the same in support and query
                    true = labels[torch.cat([sx[sy == y], qx[qy == y]])]
                    assert len(set(true.tolist())) == 1
                    classes |= set(true.tolist())
        assert classes <= set(bench.classes) and -1 not in classes
        seen[split] = set(bench.classes)
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])


def test_node_held_out_val_variant() -> None:
    train, val = make(split="train", val_classes=()), make(split="val", val_classes=())
    assert train.classes == val.classes == [0, 1, 2, 3, 4]
    for tp, vp in zip(train.pools, val.pools):
        assert not set(tp.tolist()) & set(vp.tolist())


def test_seeded_determinism() -> None:
    a, b, c = make(seed=3).batch(5), make(seed=3).batch(5), make(seed=4).batch(5)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    assert not torch.equal(a.support_x, make(seed=3).batch(6).support_x)


# ------------------------------------------------------------------------------------------------ bad input
def _copy_cora(dst: Path) -> Path:
    shutil.copytree(ROOT / "Cora", dst / "Cora")
    for f in (dst / "Cora/raw").iterdir():
        f.chmod(0o644)
    return dst


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        make(root=tmp_path / "nope")
    assert "does not exist" in _one_line(err)
    with pytest.raises(DataError) as err:
        make(root=tmp_path)  # exists, holds no Cora
    assert "ind.cora.x" in _one_line(err)


def test_tampered_file_is_refused_before_unpickling(tmp_path: Path) -> None:
    root = _copy_cora(tmp_path)
    graph = root / "Cora/raw/ind.cora.graph"
    blob = bytearray(graph.read_bytes())
    blob[100] ^= 1
    graph.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        make(root=root)
    assert "sha256 mismatch" in _one_line(err) and "ind.cora.graph" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    root = _copy_cora(tmp_path)
    (root / "Cora/raw/ind.cora.ty").unlink()
    with pytest.raises(DataError) as err:
        make(root=root)
    assert "ind.cora.ty" in _one_line(err)


@pytest.mark.parametrize("kw,words", [
    ({"split": "test", "ways": 3}, "fewer than ways=3"),
    ({"test_classes": (5, 9)}, "classes 0..6"),
    ({"test_classes": (4, 5), "val_classes": (3, 4)}, "overlap"),
    ({"split": "test", "shots": 150, "queries": 40}, "only 180 nodes"),
    ({"feature_norm": "l2"}, "feature_norm"),
])
def test_bad_episode_arguments(kw: dict, words: str) -> None:
    with pytest.raises(DataError) as err:
        make(**kw)
    assert words in _one_line(err)


# ------------------------------------------------------------------------------------------------ the GCN
@pytest.fixture(scope="module")
def cora() -> data.Benchmark:
    return make()


def test_gcn_shapes_parameters_and_feature_hook(cora: data.Benchmark) -> None:
    torch.manual_seed(0)
    model = models.create("gcn", cora, hidden=16)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "head.weight", "head.bias"]
    assert set(model.state_dict()) == set(names)  # the graph stays out of checkpoints
    b = cora.batch(0)
    assert model(b.support_x[0]).shape == (10, 2) and model(b.support_x).shape == (4, 10, 2)
    logits, feats = model(b.query_x[1], return_features=True)
    # The paper's formula, written out densely: logits = Â relu(Â X W1 + b1) W2 + b2; features = Â H1.
    a, x = cora.graph.adjacency.to_dense(), cora.graph.features.to_dense()
    h1 = torch.relu(a @ x @ model.layers[0].weight.t() + model.layers[0].bias)
    torch.testing.assert_close(feats, (a @ h1)[b.query_x[1]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model.head(feats))
    with pytest.raises(TypeError):
        model(b.support_x[0].float())


def test_gcn_functional_call_and_batched_path(cora: data.Benchmark) -> None:
    torch.manual_seed(0)
    model = models.create("gcn", cora, hidden=8)
    b = cora.batch(1)
    params = {n: p.detach() + 0.1 * torch.randn(4, *p.shape) for n, p in model.named_parameters()}
    out, feats = model.forward_batched(params, b.query_x, return_features=True)
    for t in range(4):
        o, f = functional_call(model, {n: p[t] for n, p in params.items()}, (b.query_x[t],),
                               {"return_features": True})
        torch.testing.assert_close(out[t], o)
        torch.testing.assert_close(feats[t], f)


def test_gcn_double_and_dense_graph(cora: data.Benchmark) -> None:
    torch.manual_seed(0)
    sparse = models.create("gcn", cora, hidden=8).double()
    assert sparse.adjacency.dtype == sparse.features.dtype == torch.float64 and sparse.adjacency.is_sparse
    dense = GCN(cora.graph.features.to_dense().double(), cora.graph.adjacency.to_dense().double(), 8, 2).double()
    dense.load_state_dict(sparse.state_dict())
    ids = cora.batch(0).support_x[0]
    torch.testing.assert_close(sparse(ids), dense(ids))


def test_gcn_dropout_only_in_training(cora: data.Benchmark) -> None:
    torch.manual_seed(0)
    model = models.create("gcn", cora, hidden=16, dropout=0.5)
    ids = cora.batch(0).support_x[0]
    out = model(ids)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert torch.equal(model(ids), model(ids)) and not torch.allclose(model(ids), out)


def _small_graph(n: int = 12, f: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, n, generator=g) < 0.3).double()
    a = ((a + a.t()) > 0).double().fill_diagonal_(1.0)
    d = a.sum(1).rsqrt()
    x = (torch.rand(n, f, generator=g) < 0.4).double()
    return x.to_sparse(), (d[:, None] * a * d[None]).to_sparse()


def _shifted(theta: dict, dirs: dict, s: float) -> dict:
    return {n: (t + s * dirs[n]).requires_grad_() for n, t in theta.items()}


def test_second_order_through_sparse_products_finite_differences() -> None:
    """d/dW1 <∇_W1 L, v> (a Hessian-vector product through both sparse products) and a one-step MAML
    meta-gradient, each against central differences in float64."""
    torch.manual_seed(0)
    x, a = _small_graph()
    model = GCN(x, a, hidden=5, out_dim=3).double()
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    sx, sy = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 0, 1, 2])
    qx, qy = torch.tensor([6, 7, 8, 9, 10, 11]), torch.tensor([2, 1, 0, 2, 1, 0])
    v = torch.randn_like(theta["layers.0.weight"])

    def loss(p: dict, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (ids,)), y)

    def grad_dot_v(w1: torch.Tensor) -> torch.Tensor:
        w1 = w1 if w1.requires_grad else w1.requires_grad_()
        g = torch.autograd.grad(loss({**theta, "layers.0.weight": w1}, sx, sy), w1, create_graph=True)[0]
        return (g * v).sum()

    def maml(p: dict) -> torch.Tensor:
        g = torch.autograd.grad(loss(p, sx, sy), [p[n] for n in names], create_graph=True)
        return loss({n: p[n] - 0.7 * gi for n, gi in zip(names, g)}, qx, qy)

    w1 = theta["layers.0.weight"].clone().requires_grad_()
    hvp = torch.autograd.grad(grad_dot_v(w1), w1)[0]
    leaves = {n: t.clone().requires_grad_() for n, t in theta.items()}
    meta = torch.autograd.grad(maml(leaves), [leaves[n] for n in names])
    eps = 1e-6
    for _ in range(3):
        u = torch.randn_like(w1)
        fd = (grad_dot_v(w1.detach() + eps * u) - grad_dot_v(w1.detach() - eps * u)) / (2 * eps)
        torch.testing.assert_close((hvp * u).sum(), fd.detach(), rtol=1e-6, atol=1e-9)
        dirs = {n: torch.randn_like(t) for n, t in theta.items()}
        fd = (maml(_shifted(theta, dirs, eps)) - maml(_shifted(theta, dirs, -eps))) / (2 * eps)
        torch.testing.assert_close(sum((g * dirs[n]).sum() for g, n in zip(meta, names)), fd.detach(),
                                   rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------ learning
def _adapt(model: GCN, params: dict, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> dict:
    """One inner SGD step (α = 0.5) for T tasks at once, on task-batched parameters."""
    t = x.shape[0]
    p = {n: w.unsqueeze(0).expand(t, *w.shape) for n, w in params.items()}
    loss = F.cross_entropy(model.forward_batched(p, x).flatten(0, 1), y.flatten()) * t  # sum of task means
    g = torch.autograd.grad(loss, list(p.values()), create_graph=create_graph)
    return {n: w - 0.5 * gi for (n, w), gi in zip(p.items(), g)}


def _accuracy(model: GCN, bench: data.Benchmark) -> float:
    b = bench.batch(0)  # 100 tasks
    fast = _adapt(model, dict(model.named_parameters()), b.support_x, b.support_y, create_graph=False)
    with torch.no_grad():
        return (model.forward_batched(fast, b.query_x).argmax(-1) == b.query_y).float().mean().item()


def test_maml_learns_cora_2way_5shot() -> None:
    """Second-order MAML, hand-written: 150 meta-steps of 4 tasks (~5 s on 2 idle cores).

    Accuracy on fresh train-class tasks rises (~0.70 → ~0.90 over seeds 0-5); novel test classes stay well above
    chance (~0.65 → ~0.70): most of what a GCN gets on 5 shots comes from the graph, not from meta-training.
    """
    threads = torch.get_num_threads()
    # Thousands of small ops: one thread costs little on an idle box and is ~10x faster on a busy 2-core one, where
    # every parallel op waits a time slice for its descheduled partner thread.
    torch.set_num_threads(1)
    try:
        before, after, test_acc = _meta_train_cora()
    finally:
        torch.set_num_threads(threads)
    assert after > before + 0.08, (before, after)
    assert test_acc > 0.6, test_acc


def _meta_train_cora() -> tuple[float, float, float]:
    torch.manual_seed(0)
    train = make(meta_batch_size=4, seed=0)
    probe = make(meta_batch_size=100, seed=1000)  # unseen episodes of the train classes
    test = make(split="test", meta_batch_size=100, seed=2000)
    model = models.create("gcn", train, hidden=16)
    before = _accuracy(model, probe)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(150):
        b = train.batch(i)
        fast = _adapt(model, dict(model.named_parameters()), b.support_x, b.support_y, create_graph=True)
        opt.zero_grad()
        F.cross_entropy(model.forward_batched(fast, b.query_x).flatten(0, 1), b.query_y.flatten()).backward()
        opt.step()
    return before, _accuracy(model, probe), _accuracy(model, test)


@pytest.mark.parametrize("name,classes", [("cora", 7), ("citeseer", 6)])
def test_folds_rotate_the_held_out_pair_over_every_class(name: str, classes: int) -> None:
    from metagrad.data.planetoid import fold_classes

    folds = (classes + 1) // 2
    tested = set()
    for k in range(folds):
        split = {s: set(make(name, s, fold=k).classes) for s in ("train", "val", "test")}
        assert split["test"] == set(fold_classes(classes, k)[0]) and len(split["test"]) == 2
        assert not (split["train"] & split["val"]) and not (split["train"] & split["test"])
        assert not (split["val"] & split["test"])
        assert split["train"] | split["val"] | split["test"] == set(range(classes))
        tested |= split["test"]
    assert tested == set(range(classes))
    # Validation on held-out nodes of the training classes leaves more classes to train on.
    assert len(make(name, "train", fold=0, val_classes=()).classes) == classes - 2
    with pytest.raises(DataError, match="fold must be an integer in 0"):
        make(name, fold=folds)
    with pytest.raises(DataError, match="not both"):
        make(name, fold=0, test_classes=(0, 1))
