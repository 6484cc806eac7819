"""TRLearner: relation invariants, groups, neutrality, an independent reference, finite differences, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MAML, TaskBatch, methods
from metagrad.methods.cml import CML
from metagrad.methods.trlearner import TRLearner, task_groups
from tests.helpers import (
    NoFeatures,
    assert_close_rel,
    assert_directional_derivative,
    assert_finite_gradients,
    conv64,
    grads_of,
    image_batch,
    mlp64,
    ref_adapt,
    regression_batch,
)

F = nn.functional


def reference_trlearner(model, batch, heads, *, lr, steps, first_order, weight, tau, groups, probe, own="query",
                        probes="spread"):
    """MAML + TRLearner written per task and per pair, with no metagrad code. Returns (loss, M̃ rows).

    Probes: ``probe`` query inputs, evenly spaced over the query set ("spread") or the first ones ("first").
    ``own="query"``: P_ii is the model on the whole query set at the probe rows; "probe": on the probes alone.
    """
    nq = batch.query_x.shape[1]
    n = min(probe, nq)
    picks = list(range(n)) if probes == "first" or n == nq else [round(k * (nq - 1) / (n - 1)) for k in range(n)]
    cls = batch.is_classification
    loss_fn = F.cross_entropy if cls else F.mse_loss
    theta = dict(model.named_parameters())
    T, K = len(batch), heads.shape[0]
    fasts = [ref_adapt(model, theta, batch.support_x[t], batch.support_y[t], lr, steps, first_order, loss_fn)
             for t in range(T)]
    query = sum(loss_fn(functional_call(model, fasts[t], (batch.query_x[t],)), batch.query_y[t])
                for t in range(T)) / T
    metas = []
    for t in range(T):
        th = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
        if cls:
            _, f = functional_call(model, th, (batch.support_x[t],), {"return_features": True})
            m = torch.cat([f.mean(0), ((f - f.mean(0)) ** 2).mean(0).sqrt()])
        else:
            loss = loss_fn(functional_call(model, th, (batch.support_x[t],)), batch.support_y[t])
            last = list(th)[-2:]   # the MLP's output layer: weight, bias
            m = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [th[n] for n in last])])
        metas.append((m / m.norm()).detach())

    def cos(a, b):
        return (a * b).sum() / (a.norm() * b.norm())

    def probe_out(fast, x):
        out = functional_call(model, fast, (x,), {"return_features": True})
        return out[1] if cls else out[0]

    tr, rows = 0.0, {}
    for g in groups:
        for i in g:
            others = [j for j in g if j != i]
            sims = torch.stack([sum(cos(heads[k] * metas[i], heads[k] * metas[j]) for k in range(K)) / K
                                for j in others])
            e = torch.exp(sims / tau)
            rows[i] = dict(zip(others, e / e.sum()))
            x = batch.query_x[i][picks]
            mix = sum(rows[i][j] * probe_out(fasts[j], x) for j in others)
            mine = probe_out(fasts[i], batch.query_x[i])[picks] if own == "query" else probe_out(fasts[i], x)
            tr = tr + ((mine - mix) ** 2).mean()
    return query + weight * tr / T, rows


# -- the defining invariants ---------------------------------------------------------------------------------------
def test_relation_rows_sum_to_one_and_ignore_class_order():
    model, batch = conv64(), image_batch(T=4, seed=1)
    learner = MAML(model, inner_lr=0.4, plugins=[TRLearner()])
    rel = learner.meta_loss(batch).diagnostics["trlearner.relation"]
    assert rel.shape == (4, 4)
    assert torch.allclose(rel.sum(1), torch.ones(4, dtype=rel.dtype), atol=1e-12)
    assert (rel.diagonal() == 0).all() and (rel >= 0).all()
    # Each task's support set: samples shuffled and class ids relabelled. The adapted models change, M̃ may not.
    g = torch.Generator().manual_seed(0)
    sx, sy = batch.support_x.clone(), batch.support_y.clone()
    for t in range(4):
        order, relabel = torch.randperm(3, generator=g), torch.tensor([2, 0, 1])
        sx[t], sy[t] = batch.support_x[t][order], relabel[batch.support_y[t][order]]
    permuted = TaskBatch(sx, sy, batch.query_x, relabel[batch.query_y])
    out = learner.meta_loss(permuted)
    assert torch.allclose(out.diagnostics["trlearner.relation"], rel, rtol=0, atol=1e-12)
    assert not torch.allclose(out.query_loss, learner.meta_loss(batch).query_loss)
    # ... while other support images do change it (the invariance is not a constant).
    other = learner.meta_loss(image_batch(T=4, seed=7)).diagnostics["trlearner.relation"]
    assert (other - rel).abs().max() > 1e-6


def test_groups():
    assert [list(g) for g in task_groups(8, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(g) for g in task_groups(3, 4)] == [[0, 1, 2]]
    assert [list(g) for g in task_groups(6, 4)] == [[0, 1, 2, 3], [4, 5]]
    assert [list(g) for g in task_groups(5, 2)] == [[0, 1], [2, 3, 4]]   # a lone last task joins the previous
    model, batch = mlp64(), regression_batch(T=8, seed=2)
    plug = TRLearner(weight=1.0, group_size=4)
    learner = MAML(model, inner_lr=0.05, loss="mse", plugins=[plug])
    out = learner.meta_loss(batch)
    assert out.diagnostics["trlearner.relation"].shape == (4, 4)   # the first group's M̃
    halves = [learner.meta_loss(batch.select(s)) for s in (slice(0, 4), slice(4, 8))]
    term = out.loss - out.query_loss
    assert torch.allclose(term, sum(h.loss - h.query_loss for h in halves) / 2, rtol=1e-10)


# -- neutrality, reference, gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_weight_zero_is_plain_maml(kind):
    model, batch = (mlp64(), regression_batch(T=4)) if kind == "mse" else (conv64(), image_batch(T=4))
    plain_out, plain = grads_of(MAML(model, inner_lr=0.1, loss=kind), batch)
    out, grads = grads_of(MAML(model, inner_lr=0.1, loss=kind, plugins=[TRLearner(weight=0.0)]), batch)
    assert torch.equal(out.loss, plain_out.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain))


@pytest.mark.parametrize("kind, T, group_size, probe, first_order, own, probes", [
    ("mse", 5, 2, 5, False, "query", "spread"),   # groups [0,1] [2,3,4]; probes a strict subset of the 7 queries
    ("mse", 5, 2, 5, False, "probe", "first"),
    ("mse", 4, 4, 16, True, "probe", "spread"),   # probes = all queries (the core's query output is reused)
    ("cross_entropy", 4, 4, 16, False, "query", "spread"),
    ("cross_entropy", 3, 4, 4, True, "query", "spread"),  # 4 of 6 queries: P_ii with the query set's statistics
    ("cross_entropy", 3, 4, 4, False, "probe", "spread"),  # 4 of 6 queries: P_ii with the probe set's statistics
    ("cross_entropy", 3, 4, 4, False, "query", "first"),
])
def test_matches_independent_reference(kind, T, group_size, probe, first_order, own, probes):
    if kind == "mse":
        model, batch, lr, steps = mlp64(1), regression_batch(T=T, seed=3), 0.05, 2
    else:
        model, batch, lr, steps = conv64(1), image_batch(T=T, seed=3), 0.4, 1
    plug = TRLearner(weight=0.5, temperature=0.7, group_size=group_size, probe_size=probe, own=own, probes=probes)
    learner = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss=kind, plugins=[plug])
    out, grads = grads_of(learner, batch)
    ref, rows = reference_trlearner(model, batch, plug.head_weights, lr=lr, steps=steps, first_order=first_order,
                                    weight=0.5, tau=0.7, groups=task_groups(T, group_size), probe=probe, own=own,
                                    probes=probes)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()) + [plug.head_weights])
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert_close_rel(grads, ref_grads, 1e-6)
    rel = out.diagnostics["trlearner.relation"]
    for i in range(rel.shape[0]):
        for j, v in rows[i].items():
            assert abs(rel[i, j].item() - v.item()) < 1e-10


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_finite_differences(kind):
    model, batch = (mlp64(2), regression_batch(T=4, seed=4)) if kind == "mse" else (conv64(2), image_batch(T=3))
    plug = TRLearner(weight=1.0)
    learner = MAML(model, inner_lr=0.1 if kind == "mse" else 0.4, loss=kind, plugins=[plug])
    # m_i is detached by definition (a stop-gradient), so the meta-loss to difference is the one with m_i held
    # at its value at the unperturbed θ.
    frozen, meta = plug.meta_data, {}
    plug.meta_data = lambda ctx: meta.setdefault("m", frozen(ctx))
    _, grads = grads_of(learner, batch)
    params = [p for p in learner.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    # Conv4: a ReLU or max-pool switch makes the inner gradient, hence θ', jump; keep the steps small.
    eps = 1e-6 if kind == "mse" else 1e-7
    assert_directional_derivative(lambda: learner.meta_loss(batch).loss, params, grads, direction, eps)


# -- composition with the other plug-ins and the learner's options --------------------------------------------------
OPTIONS = [{}, {"adapt": "head"}, {"first_order": True}, {"learn_inner_lr": "per_step", "inner_steps": 2}]


@pytest.mark.parametrize("options", OPTIONS, ids=["maml", "anil", "first_order", "per_step"])
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_with_cml_and_learner_options(kind, options):
    model, batch = (mlp64(), regression_batch(T=4)) if kind == "mse" else (conv64(), image_batch(T=4))
    tr, cml = TRLearner(), CML()
    # ANIL on classification: features do not adapt, so P_ij = P_ii and the relation term relates no tasks (zero
    # here: the 16 probes cover the 6 queries, so P_ii has the probes' statistics).
    vanishes = kind == "cross_entropy" and options.get("adapt") == "head"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = MAML(model, inner_lr=0.1, loss=kind, plugins=[tr, cml], **options).double()
    assert any("relates no tasks" in str(w.message) for w in caught) == vanishes
    out = learner.meta_loss(batch)
    named = [(n, p) for n, p in learner.named_parameters()]
    grads = torch.autograd.grad(out.loss, [p for _, p in named])
    for (n, _), g in zip(named, grads):
        assert torch.isfinite(g).all(), n
        if vanishes and n == "plugins.0.head_weights":
            # zero up to rounding (P_ij and P_ii come from the same features, computed in different orders)
            assert g.abs().max() < 1e-20 and out.diagnostics["trlearner.loss"].abs() < 1e-12
            continue
        assert g.abs().sum() > 0, n    # θ, the inner rates, the relation heads and the co-learner all learn
    d = out.diagnostics
    assert torch.allclose(out.loss, out.query_loss + 0.1 * d["trlearner.loss"] + d["cml.loss"], rtol=1e-10)
    # Each term is the one it would be alone.
    alone_plug = TRLearner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the same ANIL warning as above, already checked
        alone = MAML(model, inner_lr=0.1, loss=kind, plugins=[alone_plug], **options).double()
    alone.load_state_dict({k: v for k, v in learner.state_dict().items() if not k.startswith("plugins.1.")})
    assert torch.allclose(alone.meta_loss(batch).diagnostics["trlearner.loss"], d["trlearner.loss"], rtol=1e-10)


@pytest.mark.parametrize("own, probe_size, zero", [("query", 6, True), ("probe", 2, True), ("query", 2, False)])
def test_anil_relates_no_tasks_and_the_warning_says_when_the_term_is_zero(own, probe_size, zero):
    """ANIL on Conv4: every partner's P_ij is the task's own probe features, so the heads get a zero gradient.
    The term is zero when P_ii has the probe set's BN statistics (probes = the 6 queries, or own="probe"), but not
    with own="query" and 2 probes of 6 queries: the warning must not claim it is identically zero."""
    plug = TRLearner(weight=1.0, probe_size=probe_size, own=own)
    with pytest.warns(UserWarning, match="relates no tasks") as caught:
        learner = MAML(conv64(), inner_lr=0.4, adapt="head", plugins=[plug])
    assert "identically zero" not in str(caught[0].message) and "statistics" in str(caught[0].message)
    out = learner.meta_loss(image_batch(T=4))
    assert (out.diagnostics["trlearner.loss"].abs() < 1e-12) == zero
    (heads,) = torch.autograd.grad(out.loss, [plug.head_weights])
    assert heads.abs().max() < 1e-12


@pytest.mark.parametrize("own, probe_size", [("query", 6), ("probe", 2), ("query", 2)])
def test_anil_computes_the_shared_partner_features_once_with_the_same_value_and_gradients(own, probe_size):
    """ANIL: P_ij is the same tensor for every partner j, so the term is computed from one probe forward (none when
    P_ii is it). Against the general path (G−1 permuted forwards), float64: the same loss, the same gradients."""
    results = []
    for shared in (True, False):
        plug = TRLearner(weight=1.0, probe_size=probe_size, own=own, group_size=3)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the ANIL warning, checked above
            learner = MAML(conv64(), inner_lr=0.4, adapt="head", plugins=[plug]).double()
        assert plug._shared_features
        plug._shared_features = shared          # False: the general path, one forward per partner offset
        out = learner.meta_loss(image_batch(T=5))
        params = [p for p in learner.parameters() if p.requires_grad]
        results.append((out.loss, out.diagnostics["trlearner.loss"], torch.autograd.grad(out.loss, params)))
    (loss, term, grads), (ref_loss, ref_term, ref_grads) = results
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert torch.allclose(term, ref_term, rtol=1e-9, atol=1e-24)
    assert (term.abs() > 1e-6) == (own == "query" and probe_size == 2)   # the statistics gap only
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-14)


def test_the_shared_path_is_taken_only_when_no_adapted_parameter_feeds_the_features():
    for options, shared in (({"adapt": "head"}, True), ({}, False), ({"adapt": "no_norm"}, False)):
        plug = TRLearner()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MAML(conv64(), inner_lr=0.4, plugins=[plug], **options)
        assert plug._shared_features == shared, options
    regression = TRLearner()
    MAML(mlp64(), inner_lr=0.1, loss="mse", adapt="head", plugins=[regression])   # P = outputs: they adapt
    assert not regression._shared_features
    anil = TRLearner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MAML(conv64(), inner_lr=0.4, adapt="head", plugins=[anil])
    anil.attach(MAML(mlp64(), inner_lr=0.1, loss="mse", adapt="head").view())   # re-attached: nothing stale
    assert not anil._shared_features


@pytest.mark.parametrize("key", [k for k in methods.available() if k not in ("trlearner", "cml")])
def test_composes_with_every_other_plugin(key):
    model, batch = conv64(), image_batch(T=4)
    learner = MAML(model, inner_lr=0.4, plugins=[methods.create(key), TRLearner(), CML(head="conv")]).double()
    out = learner.meta_loss(batch)
    named = list(learner.named_parameters())
    grads = torch.autograd.grad(out.loss, [p for _, p in named], allow_unused=True)
    # θ, the other plug-in's parts, the relation heads and the co-learner: each a finite, non-zero gradient.
    assert_finite_gradients(named, grads)
    assert torch.isfinite(out.diagnostics["trlearner.loss"]) and torch.isfinite(out.diagnostics["cml.loss"])


def test_evaluate_skips_the_term_unless_asked():
    model, batch = mlp64(), regression_batch(T=4)
    learner = MAML(model, inner_lr=0.05, loss="mse", plugins=[TRLearner()])
    train = learner.meta_loss(batch)
    ev = learner.evaluate(batch)
    assert torch.allclose(ev.loss, train.query_loss.detach(), rtol=1e-12)
    ev_terms = learner.evaluate(batch, outer_terms=True)   # outer terms under no_grad: meta-data still computed
    assert torch.allclose(ev_terms.loss, train.loss.detach(), rtol=1e-12)


def test_registry_and_state():
    plug = methods.create("trlearner", weight=0.2, heads=3)
    assert isinstance(plug, TRLearner) and plug.weight == 0.2
    learner = MAML(conv64(), plugins=[plug])
    assert plug.head_weights.shape == (3, 2 * 4) and plug.head_weights.dtype == torch.float64
    assert "plugins.0.head_weights" in learner.state_dict()
    assert any(p is plug.head_weights for p in learner.parameters())
    assert learner.needs_features   # classification: P_ii reuses the query features when probes cover the set
    assert MAML(mlp64(), loss="mse", plugins=[TRLearner()]).plugins[0].head_weights.shape == (4, 8 + 1)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused():
    learner = MAML(mlp64(), inner_lr=0.05, loss="mse", plugins=[TRLearner()])
    with pytest.raises(ValueError, match="TRLearner needs >= 2 tasks per meta-batch"):
        learner.meta_loss(regression_batch(T=1))
    MAML(mlp64(), loss="mse", plugins=[TRLearner(weight=0.0)]).meta_loss(regression_batch(T=1))  # neutral: fine

    with pytest.raises(ValueError, match="return_features"):
        MAML(NoFeatures(), plugins=[TRLearner()])

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.w * x

    with pytest.raises(ValueError, match="nn.Linear"):
        MAML(NoLinear(), loss="mse", plugins=[TRLearner()])
    for bad in ({"group_size": 1}, {"temperature": 0.0}, {"heads": 0}, {"weight": -1.0}, {"probe_size": 0}):
        with pytest.raises(ValueError, match="TRLearner needs"):
            TRLearner(**bad)
    with pytest.raises(ValueError, match="TRLearner own must be"):
        TRLearner(own="partner")
    with pytest.raises(ValueError, match="TRLearner probes must be"):
        TRLearner(probes="random")


def test_spread_probes_cover_the_query_set():
    rows = TRLearner(probe_size=16).probe_rows(75)
    assert rows.tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 39, 44, 49, 54, 59, 64, 69, 74]
    assert {r // 15 for r in rows.tolist()} == {0, 1, 2, 3, 4}   # every class of a class-ordered 5-way set
    assert TRLearner(probe_size=16, probes="first").probe_rows(75).tolist() == list(range(16))
    assert TRLearner(probe_size=16).probe_rows(10).tolist() == list(range(10))


def test_own_readings_agree_without_batch_statistics_and_differ_with_them():
    """An MLP's output on the probes is a slice of its output on the query set, so the two P_ii readings give the
    same term; Conv4's batch-statistics BN makes them differ (the statistics of 15 queries against 4 probes)."""
    for model, batch, kind, differ in ((mlp64(5), regression_batch(T=4, seed=5), "mse", False),
                                       (conv64(5), image_batch(T=3), "cross_entropy", True)):
        terms = []
        for own in ("query", "probe"):
            plug = TRLearner(weight=1.0, probe_size=4, own=own)
            torch.manual_seed(0)
            plug_learner = MAML(model, inner_lr=0.1, loss=kind, plugins=[plug])
            terms.append(plug_learner.meta_loss(batch).diagnostics["trlearner.loss"])
        if differ:
            assert not torch.allclose(terms[0], terms[1], rtol=1e-6)
        else:
            assert torch.allclose(terms[0], terms[1], rtol=1e-12)
