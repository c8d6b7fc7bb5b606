"""Differentiable (live) bounds: the same numbers as the frozen graph, gradients that reach the
module (checked against finite differences), soundness under sampling and PGD (also for
BatchNorm in training mode, against the network with the batch's statistics frozen in), and
clear errors where the live graph cannot follow the module."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import frozen_stats_copy, randomize_batchnorm  # noqa: E402
from models import cnn_cert, mlp, resnet_block_net, small_cnn  # noqa: E402

from verifier import BoundedModel, LpBall, margin_spec  # noqa: E402
from verifier.attack import pgd  # noqa: E402
from verifier.errors import VerifierError  # noqa: E402
from verifier.graph.live import BatchStats, live_graph  # noqa: E402

NETS = {
    "mlp": (lambda: mlp(64, [32, 16], 10), (1, 8, 8)),
    "small_cnn": (lambda: small_cnn(1, 10, 8, width=4), (1, 8, 8)),
    "cnn_cert_bn": (lambda: cnn_cert(1, 10, 8, width=4, fc=16, bn=True), (1, 8, 8)),
    "cnn_cert_deep": (lambda: cnn_cert(1, 10, 8, width=4, fc=16, bn=True, extra_convs=1), (1, 8, 8)),
    "resnet": (lambda: resnet_block_net(1, 10, width=4, n_blocks=1), (1, 8, 8)),
}


def _make(name, seed=0):
    torch.manual_seed(seed)
    build, shape = NETS[name]
    net = build()
    randomize_batchnorm(net, torch.Generator().manual_seed(seed))
    return net.eval(), shape


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_live_bounds_equal_frozen_bounds_and_carry_gradients(name, method):
    net, shape = _make(name)
    bm = BoundedModel(net, input_shape=shape)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    C = margin_spec(torch.tensor([0, 3, 7]), 10)
    ball = LpBall(x, 0.02, clip=(0, 1))
    frozen = bm.bounds(ball, method, spec=C)
    live = bm.bounds(ball, method, spec=C, live=True)
    assert not frozen.lower.requires_grad and live.lower.requires_grad
    torch.testing.assert_close(live.lower, frozen.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.upper, frozen.upper, rtol=1e-5, atol=1e-5)
    live.lower.sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0


@pytest.mark.parametrize("name", ["mlp", "cnn_cert_bn"])
def test_live_gradient_matches_finite_differences(name):
    """d(sum of lower bounds)/d(one weight entry) against a central difference of the frozen
    bounds of re-traced perturbed copies (float64 graphs of a float32 module)."""
    net, shape = _make(name)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    C = margin_spec(torch.tensor([1, 5]), 10, dtype=torch.float64)
    ball = LpBall(x, 0.03, clip=(0, 1))
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    bm.bounds(ball, "crown-ibp", spec=C, live=True).lower.sum().backward()
    pname, p = [(n, p) for n, p in net.named_parameters() if p.ndim > 1][1]
    flat = int(p.grad.abs().argmax())          # an entry the bound depends on
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape))
    h = 2.0 ** -12
    vals = []
    for s in (1, -1):
        m2 = copy.deepcopy(net)
        with torch.no_grad():
            dict(m2.named_parameters())[pname][idx] += s * h
        h_true = (float(dict(m2.named_parameters())[pname][idx]) - float(p[idx])) * s
        assert abs(h_true - h) < 1e-3 * h
        b2 = BoundedModel(m2, input_shape=shape, dtype=torch.float64)
        vals.append(float(b2.bounds(ball, "crown-ibp", spec=C).lower.sum()))
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(float(p.grad[idx]) - fd) <= 1e-3 * max(1.0, abs(fd)), (float(p.grad[idx]), fd)
    assert fd != 0


@pytest.mark.parametrize("name", ["cnn_cert_bn", "cnn_cert_deep", "resnet", "small_cnn"])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("training", [False, True])
def test_live_bounds_enclose_samples_and_pgd(name, method, training):
    net, shape = _make(name, seed=3)
    bm = BoundedModel(net, input_shape=shape)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(6, *shape, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    C = margin_spec(y, 10)
    ball = LpBall(x, 0.05, clip=(0, 1))
    stats = None
    target = net
    if training:
        net.train()
        with BatchStats(net) as stats:
            net(x)
        target = frozen_stats_copy(net, stats)
        net.eval()
        net.train()
    res = bm.bounds(ball, method, spec=C, live=True, batch_stats=stats)
    lo, up = res.lower.detach(), res.upper.detach()
    with torch.no_grad():
        pts = ball.sample(200, generator=gen)                    # [200, B, *shape]
        out = target(pts.reshape(-1, *shape)).reshape(200, 6, 10)
        vals = torch.einsum("nbk,bsk->nbs", out, C)
    tol = 1e-5
    assert (vals >= lo - tol).all() and (vals <= up + tol).all()
    high = pgd(lambda z: target(z), ball, C, steps=30, restarts=2, seed=0).value
    low = -pgd(lambda z: target(z), ball, -C, steps=30, restarts=2, seed=0).value
    assert (high <= up + tol).all() and (low >= lo - tol).all()


def test_training_mode_batchnorm_needs_batch_stats():
    net, shape = _make("cnn_cert_bn")
    bm = BoundedModel(net, input_shape=shape)
    net.train()
    with pytest.raises(VerifierError, match="training mode"):
        bm.bounds(LpBall(torch.rand(2, *shape), 0.01), "ibp", live=True)


def test_live_rejects_methods_without_autograd():
    net, shape = _make("mlp")
    bm = BoundedModel(net, input_shape=shape)
    with pytest.raises(VerifierError, match="ibp and crown-ibp"):
        bm.bounds(LpBall(torch.rand(2, *shape), 0.01), "alpha-crown", live=True)


def test_parameters_the_graph_does_not_read_are_reported():
    net = nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(200, 3))
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    with pytest.raises(VerifierError, match=r"not read by the bound graph.*0\.weight"):
        live_graph(bm.graph, net)
    g = live_graph(bm.graph, net, strict=False)  # the dense layer is live, the rest frozen
    assert g[g.output].params["weight"] is not None


def test_live_graph_leaves_the_traced_graph_unchanged():
    net, shape = _make("cnn_cert_bn")
    bm = BoundedModel(net, input_shape=shape)
    before = {n.name: dict(n.params) for n in bm.graph}
    g = live_graph(bm.graph, net)
    for n in bm.graph:  # the same objects in every node's params (nothing replaced in place)
        assert n.params.keys() == before[n.name].keys()
        assert all(n.params[k] is v for k, v in before[n.name].items()), n.name
    # the live copy holds the module's own tensors
    lin = [n for n in g if n.op == "linear"][-1]
    assert lin.params["weight"] is dict(net.named_parameters())[f"{len(net) - 1}.weight"]
    assert any(n.params.get("w") is not None and n.params["w"].requires_grad for n in g)


@pytest.mark.parametrize("name", ["mlp", "cnn_cert_bn"])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_live_bounds_under_weight_perturbations(name, method):
    """Sets centered at the live parameters: the frozen bounds' numbers, gradients to the
    module, and sampled models (random parameters in the set, inputs in the ball) inside."""
    from verifier.weights import WeightPerturbation
    net, shape = _make(name, seed=5)
    bm = BoundedModel(net, input_shape=shape)
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(4, *shape, generator=gen)
    C = margin_spec(torch.tensor([2, 4, 6, 8]), 10)
    ball = LpBall(x, 0.02, clip=(0, 1))
    w = WeightPerturbation("*", 0.02, relative=True)
    frozen = bm.bounds(ball, method, spec=C, weights=w)
    live = bm.bounds(ball, method, spec=C, weights=w, live=True)
    torch.testing.assert_close(live.lower, frozen.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.upper, frozen.upper, rtol=1e-5, atol=1e-5)
    live.lower.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0
    params = bm.parameters()
    lo, up = live.lower.detach(), live.upper.detach()
    for _ in range(30):
        pt = {k: v * (1 + 0.02 * (2 * torch.rand(v.shape, generator=gen) - 1)) for k, v in params.items()}
        xs = ball.sample(1, generator=gen)[0]
        m2 = copy.deepcopy(net).eval()       # the torch module itself, with those parameters
        with torch.no_grad():
            for k, v in pt.items():
                dict(m2.named_parameters())[k].copy_(v)
            vals = torch.einsum("bk,bsk->bs", m2(xs), C)
        assert (vals >= lo - 1e-5).all() and (vals <= up + 1e-5).all()
