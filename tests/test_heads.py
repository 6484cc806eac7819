"""Heads for other ways (Proto-MAML's prototype head, the mean-row head) and norms without running statistics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from metagrad import MAML, cli, data
from metagrad import config as C
from metagrad.build import evaluation_learner, head_for, make_benchmark, make_learner
from metagrad.prototypes import prototype_head, prototypes
from metagrad.tasks import TaskBatch


class Blobs(data.Benchmark):
    """Episodes of Gaussian blobs in 8 dimensions: each task draws ``ways`` class centres, samples around them."""

    name, task_type, x_shape = "blobs", "classification", (8,)

    def __init__(self, split, ways, shots, queries, meta_batch_size, seed):
        super().__init__(split, meta_batch_size, seed)
        self.ways, self.shots, self.queries, self.out_dim = ways, shots, queries, ways

    def batch(self, index):
        g = data.generator(self.name, self.seed, self.split, index)
        t, w = self.meta_batch_size, self.ways
        centres = 2 * torch.randn(t, w, 1, 8, generator=g)

        def draw(n):
            x = (centres + 0.5 * torch.randn(t, w, n, 8, generator=g)).reshape(t, w * n, 8)
            return x, torch.arange(w).repeat_interleave(n).expand(t, -1).clone()

        return TaskBatch(*draw(self.shots), *draw(self.queries))


class Net(nn.Module):
    def __init__(self, in_dim=8, out_dim=5, hidden=16):
        super().__init__()
        self.body, self.head = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)

    def forward(self, x, return_features=False):
        feats = torch.tanh(self.body(x))
        out = self.head(feats)
        return (out, feats) if return_features else out


def net(in_shape, out_dim, hidden: int = 16):
    return Net(in_shape[0], out_dim, hidden)


# ------------------------------------------------------------------------------------------------ the math
def test_prototype_logits_are_negative_squared_distances_up_to_a_per_row_constant():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(2, 12, 6, generator=g, dtype=torch.float64), torch.arange(4).repeat(3).expand(2, -1)
    mu = prototypes(feats, labels, 4)
    assert torch.allclose(mu[1, 2], feats[1, labels[1] == 2].mean(0))
    weight, bias = prototype_head(mu)
    f = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    logits = f @ weight.transpose(1, 2) + bias.unsqueeze(1)               # [T, N, ways]
    gap = logits - (-torch.cdist(f, mu) ** 2)                              # must not depend on the class
    assert torch.allclose(gap, gap[..., :1].expand_as(gap), atol=1e-10)
    assert torch.allclose(gap[..., 0], (f * f).sum(-1), atol=1e-10)          # the dropped −‖f‖²


def _body_step(head: str) -> float:
    """How far one inner step moves the body, from θ whose head rows all equal their mean (the 5 → 3 way case)."""
    torch.manual_seed(0)
    model = Net(out_dim=3).double()
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(1, 16).expand(3, 16))
        model.head.bias.fill_(0.3)
        model.body.weight.mul_(0.1)            # small features: a support loss far from zero with either head
    learner = MAML(model, inner_lr=0.5, head=head).eval()
    batch = Blobs("test", 3, 2, 2, 1, 0).batch(0).to(dtype=torch.float64)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0], inner_steps=1)
    return (fast["body.weight"] - model.body.weight).norm().item()


def test_the_prototype_head_gives_the_body_a_gradient_where_the_mean_rows_give_none():
    """Identical rows: Σ_c (p_c − y_c)·w = 0, the body does not move at the first step; prototype rows differ."""
    assert _body_step("trained") < 1e-12
    assert _body_step("prototype") > 1e-3


def test_zero_steps_of_the_prototype_head_is_the_nearest_prototype_classifier():
    torch.manual_seed(0)
    model = Net(out_dim=4)
    learner = MAML(model, inner_lr=0.5, head="prototype").eval()
    batch = Blobs("test", 4, 3, 5, 6, 1).batch(0)
    acc = learner.evaluate(batch, inner_steps=0).task_accuracies
    with torch.no_grad():
        _, fs = model(batch.support_x, return_features=True)
        _, fq = model(batch.query_x, return_features=True)
    nearest = torch.cdist(fq, prototypes(fs, batch.support_y, 4)).argmin(-1)
    assert torch.allclose(acc, (nearest == batch.query_y).float().mean(1))


def test_the_prototype_head_refuses_a_model_it_cannot_serve():
    with pytest.raises(ValueError, match="needs a last nn.Linear with a bias"):
        MAML(nn.Sequential(nn.Linear(8, 4, bias=False)), head="prototype")
    with pytest.raises(ValueError, match="needs loss='cross_entropy'"):
        MAML(Net(), head="prototype", loss="mse")

    class Wrong(Net):
        def forward(self, x, return_features=False):
            out = self.head(torch.tanh(self.body(x)))
            return (out, x) if return_features else out           # not the head's input

    learner = MAML(Wrong(), head="prototype")
    with pytest.raises(ValueError, match="return_features must return the head's input"):
        learner.evaluate(Blobs("test", 5, 1, 1, 2, 0).batch(0), inner_steps=0)


# ------------------------------------------------------------------------------------------------ choosing a head
def test_the_head_choice_for_each_number_of_ways():
    assert [head_for("auto", w, 5) for w in (5, 20)] == ["trained", "prototype"]
    assert head_for("prototype", 5, 5) == "prototype" and head_for("mean", 20, 5) == "mean"
    with pytest.raises(C.ConfigError, match="trained 5-way, these tasks are 20-way; use eval.head=prototype"):
        head_for("trained", 20, 5)
    with pytest.raises(C.ConfigError, match="eval.head=mean makes a head for other ways"):
        head_for("mean", 5, 5)


def test_evaluation_learner_builds_the_head_it_records():
    cfg = C.resolve("sinusoid-10shot", ["model.name=tests.test_heads:net", "benchmark.name=tests.test_heads:Blobs",
                                        "benchmark.ways=5", "benchmark.shots=2", "benchmark.queries=3"])
    five = make_benchmark(cfg, "test", 0, 4)
    weights = make_learner(cfg, five).state_dict()
    three = make_benchmark(cfg, "test", 0, 4, ways=3)
    for head, want in [("auto", "prototype"), ("mean", "mean"), ("prototype", "prototype")]:
        learner, extra = evaluation_learner(cfg, three, weights, 5, head)
        assert extra == {"head": want, "ways": 3, "trained_ways": 5} and learner.head == \
            ("prototype" if want == "prototype" else "trained")
        rows = learner.state_dict()["model.head.weight"]
        assert rows.shape == (3, 16) and torch.allclose(rows, weights["model.head.weight"].mean(0).expand(3, 16))
    learner, extra = evaluation_learner(cfg, five, weights, 5)
    assert extra == {"head": "trained"} and torch.equal(learner.state_dict()["model.head.weight"],
                                                        weights["model.head.weight"])


def test_train_evaluates_at_eval_ways_with_the_prototype_head(tmp_path, capsys):
    sets = ["model.name=tests.test_heads:net", "benchmark.name=tests.test_heads:Blobs", "benchmark.ways=5",
            "benchmark.shots=2", "benchmark.queries=3", "train.iterations=2", "train.meta_batch_size=4",
            "train.val_every=0", "eval.tasks=8", "eval.inner_steps=[0, 1]", "eval.ways=3", "maml.inner_lr=0.5",
            "train.threads=1"]
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "sinusoid-10shot", "--no-progress", "--out-dir", str(run), "--set",
                     *sets]) == 0
    records = json.loads((run / "eval.json").read_text())
    assert [(r["head"], r["ways"], r["trained_ways"]) for r in records] == [("prototype", 3, 5)] * 2
    assert cli.main(["eval", str(run), "--tasks", "4"]) == 0                 # the run's eval.ways, again
    assert json.loads((run / "eval.json").read_text())[-1]["ways"] == 3
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli.main(["train", "--config", "sinusoid-10shot", "--out-dir", str(bad), "--set", *sets,
                     "eval.head=trained"]) == 2
    assert "eval.head=trained" in capsys.readouterr().err and not bad.exists()
    assert cli.main(["train", "--config", "sinusoid-10shot", "--out-dir", str(bad), "--set", "eval.ways=3"]) == 2
    assert "eval.ways applies to classification" in capsys.readouterr().err and not bad.exists()


# ------------------------------------------------------------------------------------------------ batch norm
class BNNet(nn.Module):
    def __init__(self, track: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if track else nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.Linear(4, 5)

    def forward(self, x, return_features=False):
        feats = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        out = self.head(feats)
        return (out, feats) if return_features else out


def test_a_norm_that_tracks_running_statistics_is_refused_naming_the_fix():
    """A plain nn.BatchNorm2d (PyTorch's default: running statistics tracked) would score in eval mode with
    statistics mixed over every task: refused when the learner is built, so it cannot fall silently."""
    with pytest.raises(ValueError, match=r"BNNet.bn is a BatchNorm2d that tracks running statistics: build it with "
                                         r"track_running_stats=False") as err:
        MAML(BNNet())
    assert "\n" not in str(err.value)
    learner = MAML(BNNet(track=False))                                     # the fix: batch statistics always
    x = torch.randn(2, 5, 1, 6, 6)
    batch = TaskBatch(x, torch.arange(5).expand(2, -1).clone(), x, torch.arange(5).expand(2, -1).clone())
    train_mode = learner.train().evaluate(batch, inner_steps=1).task_losses
    assert torch.allclose(learner.eval().evaluate(batch, inner_steps=1).task_losses, train_mode)
