"""The models stay plain: what they import, and the registry that builds a benchmark's model."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metagrad import config as C
from metagrad import data, models
from metagrad import functional as fn
from metagrad.batched import conv4 as batched_conv4
from metagrad.build import make_model

PKG = Path(models.__file__).resolve().parent.parent


def _imported(path: Path) -> set[str]:
    """The metagrad sub-packages/modules a file imports (relative imports resolved), e.g. {"config", "models"}."""
    parts = path.relative_to(PKG).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:len(parts) - node.level])
                mod = [*base, *(node.module.split(".") if node.module else [])]
                found.update([mod[0]] if mod else [a.name.split(".")[0] for a in node.names])
            elif node.module and node.module.startswith("metagrad"):
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [a.name.split(".")[0] for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("metagrad."))
    return found


@pytest.mark.parametrize("package,forbidden", [("models", {"functional", "batched", "data", "methods"}),
                                               ("data", {"models", "batched", "methods"})])
def test_imports_run_one_way(package, forbidden):
    files = sorted((PKG / package).rglob("*.py"))
    assert files
    for path in files:
        bad = _imported(path) & forbidden
        assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_the_import_scan_sees_relative_and_absolute_imports():
    assert {"functional", "models"} <= _imported(PKG / "batched" / "conv4.py")
    assert "models" in _imported(PKG / "build.py")


def test_conv4_batched_forward_is_registered_for_its_exact_type():
    model = models.Conv4(1, ways=3, width=4)
    assert fn.batched_forward_of(model) is batched_conv4.conv4_forward_batched

    class Sub(models.Conv4):
        pass

    assert fn.batched_forward_of(Sub(1, ways=3, width=4)) is None   # a subclass may change forward


def test_conv4_is_the_module_of_the_spec():
    """api.md: 4 blocks of [Conv2d 3×3 → BatchNorm2d (batch statistics) → ReLU → MaxPool2d(2)], then flatten →
    Linear; forward(x, return_features=False) and nothing else (no extra outputs or attributes for a plug-in)."""
    model = models.Conv4(1, ways=5, width=8, image_size=28)
    for block in model.blocks:
        kinds = [(name, type(m)) for name, m in block.named_children()]
        assert kinds == [("conv", torch.nn.Conv2d), ("bn", torch.nn.BatchNorm2d), ("relu", torch.nn.ReLU),
                         ("pool", torch.nn.MaxPool2d)]
        assert block.conv.kernel_size == (3, 3) and block.conv.padding == (1, 1) and block.conv.bias is None
        assert not block.bn.track_running_stats and block.pool.kernel_size == 2
    assert [n for n, _ in model.named_parameters()] == [
        *(f"blocks.{i}.{p}" for i in range(4) for p in ("conv.weight", "bn.weight", "bn.bias")),
        "head.weight", "head.bias"]
    assert list(inspect.signature(models.Conv4.forward).parameters) == ["self", "x", "return_features"]
    assert not hasattr(model, "map_shape")
    x = torch.rand(3, 1, 28, 28)
    out, feats = model(x, return_features=True)
    assert feats.shape == (3, 8) and torch.equal(out, model(x)) and torch.equal(out, model.head(feats))


def _graph(n: int = 12, f: int = 6) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, n, generator=g) < 0.3).float()
    a = ((a + a.t()) > 0).float().fill_diagonal_(1.0)
    return SimpleNamespace(features=torch.rand(n, f, generator=g), adjacency=a / a.sum(1, keepdim=True))


def test_create_builds_each_benchmark_kind():
    sinusoid = data.create("sinusoid", "train", shots=5, queries=5, meta_batch_size=2, seed=0)
    mlp = models.create("auto", sinusoid, hidden=(8, 8))
    assert isinstance(mlp, models.MLP) and mlp(torch.zeros(3, 1)).shape == (3, 1)
    images = {"x_shape": (3, 32, 32), "out_dim": 5, "task_type": "classification"}
    conv = models.create("auto", images, width=8, pool="stride")
    assert isinstance(conv, models.Conv4) and conv.pool == "stride" and conv.head.in_features == 8
    assert conv(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    graph = SimpleNamespace(name="toy", x_shape=(), out_dim=2, task_type="classification", graph=_graph())
    gcn = models.create("auto", graph, hidden=4, dropout=0.1)
    assert isinstance(gcn, models.GCN) and gcn.dropout == 0.1 and gcn(torch.tensor([0, 3])).shape == (2, 2)
    assert models.available() == ["conv4", "gcn", "mlp"]


def test_create_refuses_a_model_that_does_not_fit_in_one_line():
    images = {"x_shape": (1, 28, 28), "out_dim": 5}
    for name, bench, message in [("mlp", images, "mlp needs vector inputs"), ("gcn", images, "needs a graph"),
                                 ("conv4", {"x_shape": (1,), "out_dim": 1}, r"conv4 needs \[C, H, W\]"),
                                 ("resnet", images, "unknown model 'resnet'")]:
        with pytest.raises(C.ConfigError, match=message):
            models.create(name, bench)


def _shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


def test_make_model_builds_through_the_registry_with_the_model_kwargs():
    bench = data.create("sinusoid", "train", shots=5, queries=5, meta_batch_size=2, seed=0)
    cfg = C.resolve("sinusoid-10shot", ["model.kwargs.hidden=[16, 8]"])
    assert isinstance(make_model(cfg, bench), models.MLP)
    assert _shapes(make_model(cfg, bench)) == _shapes(models.MLP(1, (16, 8), 1))
    images = SimpleNamespace(name="toy", x_shape=(1, 28, 28), out_dim=5, task_type="classification")
    cfg = C.resolve("omniglot-5w1s", ["model.kwargs.width=8", "model.kwargs.pool=stride"])
    assert _shapes(make_model(cfg, images)) == _shapes(models.Conv4(1, 5, width=8, pool="stride"))


def test_old_model_keys_read_into_kwargs_and_build_the_same_model():
    """Configs written before ``model.kwargs`` hold all five old keys; they build the model they built then."""
    old = {"hidden": [40, 40], "width": 64, "bias": False, "pool": "max", "dropout": 0.0}
    images = SimpleNamespace(name="toy", x_shape=(1, 28, 28), out_dim=5, task_type="classification")
    graph = SimpleNamespace(name="toy", x_shape=(), out_dim=2, task_type="classification", graph=_graph())
    sinusoid = data.create("sinusoid", "train", shots=5, queries=5, meta_batch_size=2, seed=0)
    for model, bench, want in [({"name": "conv4", **old, "width": 32}, images, models.Conv4(1, 5, width=32)),
                               ({"name": "gcn", **old, "hidden": [16]}, graph,
                                models.GCN(graph.graph.features, graph.graph.adjacency, hidden=16, out_dim=2)),
                               ({"name": "mlp", **old, "width": 8}, sinusoid, models.MLP(1, (40, 40), 1)),
                               ({"name": "auto", **old, "hidden": [20]}, sinusoid, models.MLP(1, (20,), 1))]:
        cfg = C.from_dict({"model": model})
        assert _shapes(make_model(cfg, bench)) == _shapes(want), model
    assert C.from_dict({"model": {"name": "conv4", **old, "bias": True}}).model.kwargs == {"bias": True}
    # A kept result's config.json (written with all five keys) reads back to no arguments: the defaults.
    kept = sorted(Path(__file__).resolve().parents[1].glob("results/*/*/maml/seed0/config.json"))
    for path in kept[:3]:
        assert C.load(path).model.kwargs in ({}, {"hidden": [16]}), path


@pytest.mark.parametrize("preset, item, message", [
    ("omniglot-5w1s", "model.kwargs.pool=avg", "model.kwargs.pool: expected one of max, stride, none, got 'avg'"),
    ("omniglot-5w1s", "model.pool=avg", "model.kwargs.pool: expected one of max, stride, none, got 'avg'"),
    ("omniglot-5w1s", "model.kwargs.width=wide", "model.kwargs.width: expected int, got 'wide'"),
    ("omniglot-5w1s", "model.kwargs.depth=3", "conv4 takes no argument 'depth' .it takes: width, bias, pool."),
    ("omniglot-5w1s", "model.kwargs.out_dim=3", "model.kwargs.out_dim: out_dim is set by metagrad"),
    ("omniglot-5w1s", "model.name=resnet", "unknown model 'resnet': choose one of conv4, gcn, mlp, an import path"),
    ("omniglot-5w1s", "model.name=nosuchmodule:f", "cannot import 'nosuchmodule'"),
    ("omniglot-5w1s", "model.name=metagrad.models:nothing", "module 'metagrad.models' has no attribute 'nothing'"),
    ("sinusoid-10shot", "model.kwargs.hidden=[40, 0]", r"model.kwargs.hidden: expected a non-empty list of widths"),
    ("cora-2w5s", "model.kwargs.dropout=1", r"model.kwargs.dropout: a probability in \[0, 1\), got 1"),
])
def test_a_bad_model_setting_is_one_line_naming_the_key(preset, item, message):
    benches = {"omniglot-5w1s": {"x_shape": (1, 28, 28), "out_dim": 5},
               "sinusoid-10shot": {"x_shape": (1,), "out_dim": 1, "task_type": "regression"},
               "cora-2w5s": SimpleNamespace(name="toy", x_shape=(), out_dim=2, graph=_graph())}
    with pytest.raises(C.ConfigError, match=message) as err:
        make_model(C.resolve(preset, [item]), benches[preset])
    assert "\n" not in str(err.value)


SAMPLES = {"vectors": {"x_shape": (3,), "out_dim": 4, "task_type": "classification"},
           "images": {"x_shape": (1, 28, 28), "out_dim": 4, "task_type": "classification"},
           "graph": SimpleNamespace(name="toy", x_shape=(), out_dim=4, task_type="classification", graph=_graph())}


def _sample_input(bench) -> torch.Tensor:
    shape = bench["x_shape"] if isinstance(bench, dict) else bench.x_shape
    return torch.tensor([0, 3, 5]) if not shape else torch.rand(3, *shape)


@pytest.mark.parametrize("name", models.available())
def test_every_registered_model_keeps_the_model_contract(name):
    """What docs/own-model.md asks of a model, for every registered one: it builds for some kind of input with its
    defaults, ``forward(x, return_features=True)`` returns ``(out, feats)`` with ``feats`` the input of its last
    ``nn.Linear`` (ANIL, the prototype head, CML), and no norm tracks running statistics."""
    built = []
    for kind, bench in SAMPLES.items():
        try:
            built.append((kind, bench, models.create(name, bench)))
        except C.ConfigError:
            continue
    assert built, f"{name} builds for none of {list(SAMPLES)}"
    for _, bench, model in built:
        x = _sample_input(bench)
        out, feats = model(x, return_features=True)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert out.shape == (3, 4) and torch.allclose(out, head(feats), atol=1e-6) and torch.equal(out, model(x))
        assert not any(getattr(m, "track_running_stats", False) for m in model.modules())


def test_a_built_in_model_is_one_file_and_its_registration(tmp_path, monkeypatch):
    """A module dropped into metagrad.models (here: a folder added to the package's path) that registers itself is a
    model by name everywhere (`--set model.name=tiny`), and nothing else names it."""
    (tmp_path / "tiny.py").write_text(
        "from metagrad.models.mlp import MLP\nfrom metagrad.models.registry import register\n\n\n"
        "@register('tiny')\ndef tiny(in_shape, out_dim, width: int = 3):\n"
        "    return MLP(in_shape[0], (width,), out_dim)\n")
    from metagrad.models import registry

    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    try:
        assert "tiny" in models.available()
        bench = data.create("sinusoid", "train", shots=5, queries=5, meta_batch_size=2, seed=0)
        model = make_model(C.resolve("sinusoid-10shot", ["model.name=tiny", "model.kwargs.width=5"]), bench)
        assert _shapes(model) == [(5, 1), (5,), (1, 5), (1,)]
    finally:
        sys.modules.pop("metagrad.models.tiny", None)
