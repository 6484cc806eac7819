"""The hosts beside MAML: ProtoNet, T-Net, BOIL (and ANIL, Meta-SGD as settings), each against a hand-written
float64 reference, and every plug-in on every host it supports (neutral setting = the host alone; gradients)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import metagrad
from metagrad import MAML, ProtoNet, methods
from metagrad.functional import param_roles
from metagrad.learners import embedding_of
from metagrad.models import MLP, TNet
from tests.helpers import assert_finite_gradients, conv64, image_batch, mlp64, reference_meta_grad
from tests.test_methods import NEUTRAL

ce = nn.functional.cross_entropy


def vector_batch(T=4, ways=3, shots=2, queries=3, dim=5, seed=0):
    """Classification tasks on vectors (an MLP embedding: no batch statistics, so every forward is per sample)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).clone()
    yq = torch.arange(ways).repeat_interleave(queries).expand(T, -1).clone()
    return metagrad.TaskBatch(torch.randn(T, ways * shots, dim, generator=g, dtype=torch.float64), ys,
                              torch.randn(T, ways * queries, dim, generator=g, dtype=torch.float64), yq)


def mlp_embedding(seed=0, dim=5, out=4):
    torch.manual_seed(seed)
    return MLP(dim, (8,), out).double()


# -- ProtoNet -------------------------------------------------------------------------------------------------------
def ref_protonet_task_losses(model, batch):
    """Snell et al.'s loss per task, by hand: class means of the support embeddings, −squared distances."""
    losses = []
    for t in range(len(batch)):
        ns = batch.support_x.shape[1]
        z = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        zs, zq = z[:ns], z[ns:]
        ways = int(batch.support_y[t].max()) + 1
        protos = torch.stack([zs[batch.support_y[t] == k].mean(0) for k in range(ways)])
        logits = -torch.stack([((zq - protos[k]) ** 2).sum(1) for k in range(ways)], dim=1)
        losses.append(ce(logits, batch.query_y[t]))
    return torch.stack(losses)


@pytest.mark.parametrize("make", [mlp_embedding, lambda: embedding_of(conv64())], ids=["mlp", "conv4"])
def test_protonet_loss_and_gradient_match_a_hand_written_reference(make):
    model = make()
    batch = vector_batch() if isinstance(model, MLP) else image_batch(T=3, shots=2)
    learner = ProtoNet(model)
    out = learner.meta_loss(batch)
    ref = ref_protonet_task_losses(copy.deepcopy(model), batch)
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    ref_model = copy.deepcopy(model)
    ref_loss = ref_protonet_task_losses(ref_model, batch).mean()
    want = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    assert torch.allclose(out.task_losses, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(got, want))
    assert all(g.abs().sum() > 0 for g in got)


def test_protonet_protocol_evaluate_adapt_predict_and_meta_backward():
    batch = vector_batch(T=4)
    learner = ProtoNet(mlp_embedding(), plugins=[methods.create("trlearner", group_size=2, probe_size=4)])
    out = learner.meta_loss(batch)
    out.loss.backward()
    whole = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    chunked = metagrad.meta_backward(learner, batch, chunk=2)
    assert torch.allclose(chunked.loss, out.loss.detach(), rtol=1e-12)
    assert all(torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14) for p, g in zip(learner.parameters(), whole))
    ev = learner.evaluate(batch)
    assert torch.allclose(ev.query_loss, out.query_loss.detach()) and not ev.loss.requires_grad
    fast = learner.adapt(batch.support_x[1], batch.support_y[1])
    logits = learner.predict(fast, batch.query_x[1])
    assert torch.allclose(ce(logits, batch.query_y[1]), out.task_losses[1].detach(), rtol=1e-10)
    with pytest.raises(ValueError, match="no inner loop"):
        learner.evaluate(batch, inner_steps=1)
    gap = metagrad.TaskBatch(batch.support_x, batch.support_y.clone(), batch.query_x, batch.query_y)
    gap.support_y[2, gap.support_y[2] == 1] = 0
    with pytest.raises(ValueError, match="lacks a class"):
        learner.meta_loss(gap)


@pytest.mark.parametrize("key", ["trlearner", "cml"])
def test_protonet_takes_any_embedding_module(key):
    """A plain module (no ``return_features``) is an embedding; plug-ins sized by it need its size, inferred from
    a last Linear or given."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    out = ProtoNet(seq, plugins=[methods.create(key)]).meta_loss(vector_batch())
    assert torch.isfinite(out.loss) and out.loss > out.query_loss
    with pytest.raises(ValueError, match="embedding_dim"):
        ProtoNet(nn.Sequential(nn.Flatten()), plugins=[methods.create(key)])
    assert ProtoNet(nn.Sequential(nn.Flatten()), plugins=[methods.create(key)], embedding_dim=5).embedding_dim == 5


@pytest.mark.parametrize("key", ["meta_gna", "cxgrad"])
def test_inner_loop_plugins_are_refused_on_protonet_with_a_reason(key):
    with pytest.raises(ValueError, match=f"{key}.*does not run on protonet: .*no inner loop"):
        ProtoNet(embedding_of(conv64()), plugins=[methods.create(key)])


# -- TRLearner on ProtoNet --------------------------------------------------------------------------------------------
def ref_trlearner_protonet(model, heads_w, batch, weight, tau, group, probes):
    """The spec's Hosts reading by hand: P_ij = sorted softmax(−‖e_i − c_j‖²) of task i's probe embeddings e_i
    against task j's prototypes c_j; m_i = [mean; std] of task i's support embeddings at θ."""
    T, ns = len(batch), batch.support_x.shape[1]
    ways = int(batch.support_y.max()) + 1
    base, protos, probe_emb = [], [], []
    for t in range(T):
        z = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        zs, zq = z[:ns], z[ns:]
        c = torch.stack([zs[batch.support_y[t] == k].mean(0) for k in range(ways)])
        logits = -((zq[:, None, :] - c[None]) ** 2).sum(-1)
        base.append(ce(logits, batch.query_y[t]))
        protos.append(c)
        probe_emb.append(zq[:probes])
    with torch.no_grad():
        m = []
        for t in range(T):
            f = model(batch.support_x[t])
            v = torch.cat([f.mean(0), f.std(0, unbiased=False)])
            m.append(v / v.norm())
    loss_tr = 0.0
    for i in range(T):
        g0 = (i // group) * group
        members = [j for j in range(g0, min(g0 + group, T)) if j != i]
        sims = []
        for j in members:
            s = 0.0
            for k in range(heads_w.shape[0]):
                a, b = heads_w[k] * m[i], heads_w[k] * m[j]
                s = s + (a @ b) / (a.norm() * b.norm())
            sims.append(s / heads_w.shape[0])
        rel = torch.softmax(torch.stack(sims) / tau, 0)

        def p(i_, j_):
            lg = -((probe_emb[i_][:, None, :] - protos[j_][None]) ** 2).sum(-1)
            return torch.softmax(lg, 1).sort(1, descending=True).values

        mix = sum(r * p(i, j) for r, j in zip(rel, members))
        loss_tr = loss_tr + ((p(i, i) - mix) ** 2).mean()
    return torch.stack(base).mean() + weight * loss_tr / T


def test_trlearner_on_protonet_matches_a_hand_written_reference():
    batch = vector_batch(T=6)
    model = mlp_embedding()
    plug = methods.create("trlearner", weight=0.7, temperature=0.3, group_size=3, probe_size=4, probes="first")
    learner = ProtoNet(model, plugins=[plug]).double()
    with torch.no_grad():
        plug.head_weights.add_(0.3 * torch.randn_like(plug.head_weights))
    out = learner.meta_loss(batch)
    params = [*model.parameters(), plug.head_weights]
    got = torch.autograd.grad(out.loss, params)
    ref_model = copy.deepcopy(model)
    heads = plug.head_weights.detach().clone().requires_grad_()
    ref = ref_trlearner_protonet(ref_model, heads, batch, 0.7, 0.3, 3, 4)
    want = torch.autograd.grad(ref, [*ref_model.parameters(), heads])
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(got, want))
    assert out.loss > out.query_loss and got[-1].abs().sum() > 0


def test_trlearner_on_protonet_is_free_of_the_episodes_class_order():
    """Relabelling one task's classes (a permutation) leaves the consistency term unchanged."""
    batch = vector_batch(T=4)
    plug = methods.create("trlearner", weight=1.0, probe_size=9)
    learner = ProtoNet(mlp_embedding(), plugins=[plug]).double()
    perm = torch.tensor([2, 0, 1])
    moved = metagrad.TaskBatch(batch.support_x, batch.support_y.clone(), batch.query_x, batch.query_y.clone())
    moved.support_y[1], moved.query_y[1] = perm[batch.support_y[1]], perm[batch.query_y[1]]
    a, b = learner.meta_loss(batch), learner.meta_loss(moved)
    assert torch.allclose(a.query_loss, b.query_loss, rtol=1e-12)
    assert torch.allclose(a.loss, b.loss, rtol=1e-12) and a.loss > a.query_loss


# -- T-Net ------------------------------------------------------------------------------------------------------------
def test_tnet_transforms_are_outer_only_and_get_outer_gradients():
    torch.manual_seed(0)
    model = TNet(conv64())
    learner = MAML(model, inner_lr=0.4, inner_steps=2)
    names = [n for n, role in param_roles(model).items() if role == "outer"]
    assert names and all(n.startswith("transforms.") for n in names) and len(names) == 5   # 4 convs + head
    assert not set(names) & set(learner.adapted)
    assert {n for n in model.state_dict() if not n.startswith("transforms.")} == \
        {f"model.{n}" for n in conv64().state_dict()}
    with torch.no_grad():   # off the identity, so the transforms shape the inner steps
        for n in names:
            model.get_parameter(n).add_(0.1 * torch.randn_like(model.get_parameter(n)))
    batch = image_batch(T=2)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0], create_graph=True)
    theta = dict(model.named_parameters())
    assert all(torch.equal(fast[n], theta[n]) for n in names)                              # no inner update
    assert not torch.equal(fast["model.blocks.0.conv.weight"], theta["model.blocks.0.conv.weight"])
    grads = torch.autograd.grad(learner.meta_loss(batch).loss, [theta[n] for n in names])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)               # outer gradients


@pytest.mark.parametrize("make, batch", [(mlp64, "regression"), (conv64, "image")])
def test_tnet_at_identity_with_frozen_transforms_equals_maml(make, batch):
    from tests.helpers import regression_batch
    b = regression_batch() if batch == "regression" else image_batch(T=3)
    loss = "mse" if batch == "regression" else "cross_entropy"
    plain = MAML(make(), inner_lr=0.1, inner_steps=2, loss=loss)
    tnet = MAML(TNet(make()), inner_lr=0.1, inner_steps=2, loss=loss)
    for p in tnet.model.transforms.parameters():
        p.requires_grad_(False)
    a, b_ = plain.meta_loss(b), tnet.meta_loss(b)
    assert torch.allclose(a.loss, b_.loss, rtol=1e-10)
    ga = torch.autograd.grad(a.loss, list(plain.model.parameters()))
    gb = torch.autograd.grad(b_.loss, list(tnet.model.model.parameters()))
    assert all(torch.allclose(x, y, rtol=1e-8, atol=1e-13) for x, y in zip(ga, gb))


def test_tnet_transform_acts_as_a_linear_map_after_its_layer():
    torch.manual_seed(0)
    net = TNet(MLP(3, (4,), 2).double())
    with torch.no_grad():
        for p in net.transforms.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(5, 3, dtype=torch.float64)
    lin0, lin1 = net.model.layers
    t0, t1 = net.transforms["layers_0"].weight, net.transforms["layers_1"].weight
    want = lin1(torch.relu(lin0(x) @ t0.T)) @ t1.T
    assert torch.allclose(net(x), want, rtol=1e-12)
    params = {n: p * 1.5 for n, p in net.named_parameters()}   # functional_call uses the given transforms
    assert not torch.allclose(functional_call(net, params, (x,)), want)
    assert not net.model.layers[0]._forward_hooks   # hooks live only for a call: the wrapper copies cleanly


# -- BOIL -------------------------------------------------------------------------------------------------------------
def test_boil_adapts_the_body_and_never_applies_the_heads_inner_gradient():
    model = conv64()
    learner = MAML(model, inner_lr=0.4, inner_steps=2, adapt="body")
    head = ["head.weight", "head.bias"]
    assert set(learner.adapted) == set(dict(model.named_parameters())) - set(head)
    batch = image_batch(T=2)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0], create_graph=True)
    theta = dict(model.named_parameters())
    assert all(torch.equal(fast[n], theta[n]) for n in head)
    # The head's inner gradient is not zero: freezing it is BOIL's choice, not a vanishing gradient.
    inner = torch.autograd.grad(ce(model(batch.support_x[0]), batch.support_y[0]), [theta[n] for n in head])
    assert all(g.abs().sum() > 0 for g in inner)
    out = learner.meta_loss(batch)
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    ref_loss, want = reference_meta_grad(copy.deepcopy(model), batch, 0.4, 2, False, ce, adapt=list(learner.adapted))
    assert torch.allclose(out.loss, ref_loss, rtol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-13) for a, b in zip(got, want))


# -- every plug-in on every host it supports ----------------------------------------------------------------------------
HOSTS = {
    "maml": lambda plugins: MAML(conv64(), inner_lr=0.4, inner_steps=2, plugins=plugins),
    "anil": lambda plugins: MAML(conv64(), inner_lr=0.4, inner_steps=2, adapt="head", plugins=plugins),
    "boil": lambda plugins: MAML(conv64(), inner_lr=0.4, inner_steps=2, adapt="body", plugins=plugins),
    "meta_sgd": lambda plugins: MAML(conv64(), inner_lr=0.4, inner_steps=2, learn_inner_lr="per_element",
                                     plugins=plugins),
    "tnet": lambda plugins: MAML(TNet(conv64()), inner_lr=0.4, inner_steps=2, plugins=plugins),
    "protonet": lambda plugins: ProtoNet(embedding_of(conv64()), plugins=plugins),
}
LEARNER = {host: "protonet" if host == "protonet" else "maml" for host in HOSTS}
KEYS = methods.available()
SUPPORTED = [(h, k) for h in HOSTS for k in KEYS if LEARNER[h] in type(methods.create(k)).learners]
# Supported by the learner but refused by the plug-in's own check of the setting: CxGrad rescales adapted conv
# weights, and ANIL adapts none.
REFUSED_SETTING = {("anil", "cxgrad"): "adapts none"}
PAIRS = [p for p in SUPPORTED if p not in REFUSED_SETTING]


def build(host, plugins):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TRLearner on ANIL warns that it relates no tasks
        return HOSTS[host](plugins)


def test_every_plugin_declares_its_learners_and_the_pairs_cover_every_host():
    assert {k for _, k in PAIRS} == set(KEYS) and set(REFUSED_SETTING) <= set(SUPPORTED)
    assert {h for h, _ in PAIRS} == set(HOSTS)
    for key in KEYS:
        assert set(type(methods.create(key)).learners) <= set(metagrad.learners.available())


@pytest.mark.parametrize("host, key", [(h, k) for h in HOSTS for k in KEYS if (h, k) not in PAIRS])
def test_unsupported_pairs_are_refused(host, key):
    why = REFUSED_SETTING.get((host, key), f"does not run on {LEARNER[host]}")
    with pytest.raises(ValueError, match=why):
        build(host, [methods.create(key)])


@pytest.mark.parametrize("host, key", [p for p in PAIRS if NEUTRAL.get(p[1]) is not None])
def test_neutral_plugin_equals_its_host_alone(host, key):
    batch = image_batch(T=4)
    base = build(host, [])
    with_plugin = build(host, [methods.create(key, **NEUTRAL[key])])
    a, b = base.meta_loss(batch), with_plugin.meta_loss(batch)
    assert torch.allclose(a.loss, b.loss, rtol=1e-10)
    names = [n for n, _ in base.named_parameters()]
    own = dict(with_plugin.named_parameters())
    ga = torch.autograd.grad(a.loss, list(base.parameters()))
    gb = torch.autograd.grad(b.loss, [own[n] for n in names])
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-14) for x, y in zip(ga, gb))


@pytest.mark.parametrize("host, key", PAIRS)
def test_every_supported_pair_gives_finite_gradients(host, key):
    learner = build(host, [methods.create(key)])
    out = learner.meta_loss(image_batch(T=4))
    named = list(learner.named_parameters())
    grads = torch.autograd.grad(out.loss, [p for _, p in named], allow_unused=True)
    assert torch.isfinite(out.loss)
    # ANIL: TRLearner relates no tasks there (its heads get zero, as it warns).
    assert_finite_gradients(named, grads, may_vanish=lambda n: host == "anil" and "head_weights" in n)
