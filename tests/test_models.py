"""The models stay plain: what they import, and the registry that builds a benchmark's model."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metagrad import config as C
from metagrad import data, models
from metagrad import functional as fn
from metagrad.batched import conv4 as batched_conv4
from metagrad.evaluation import make_model

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
    assert "models" in _imported(PKG / "evaluation.py")


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


def test_make_model_builds_through_the_registry():
    cfg = C.resolve("sinusoid-10shot", ["model.hidden=[16, 8]"])
    bench = data.create("sinusoid", "train", shots=5, queries=5, meta_batch_size=2, seed=0)
    model = make_model(cfg, bench)
    assert isinstance(model, models.MLP)
    assert [p.shape for p in model.parameters()] == [p.shape for p in models.MLP(1, (16, 8), 1).parameters()]
