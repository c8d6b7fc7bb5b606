"""Fully fixed ReLU-split domains are decided by a linear program: a closed domain holds no
counterexample (sampled points and PGD inside it), a candidate is a real one, and the verdicts
of branch and bound with the LP agree with an exact MILP (scipy HiGHS) on small nets."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.complete import relu_bab
from verifier.complete.linear_region import LinearRegions, piecewise_linear
from verifier.complete.relu_bab import ReluPrepared, relu_split_bab

from complete.test_relu_bab import _milp_min, _net, _pre_activations

N_IN = 4


def _patterns(net, lo, hi, n, seed):
    """Activation patterns of random points of the box (non-empty regions) and of random
    sign vectors (often empty ones)."""
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(n, N_IN, generator=g) * (hi - lo)
    with torch.no_grad():
        pre, _ = _pre_activations(net, x)
    real = [(z >= 0) for z in pre]
    rand = [torch.rand(z.shape, generator=g) < 0.5 for z in pre]
    return [torch.cat([a, b]) for a, b in zip(real, rand)]


def test_piecewise_linear_graphs_only():
    assert piecewise_linear(BoundedModel(_net(0, (6,), N_IN), input_shape=(N_IN,)).graph)
    tanh = nn.Sequential(nn.Linear(N_IN, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    bm = BoundedModel(tanh, input_shape=(N_IN,))
    assert not piecewise_linear(bm.graph)
    P = ReluPrepared(bm, -torch.ones(N_IN), torch.ones(N_IN), [torch.ones(1, 1)], [torch.zeros(1)])
    assert P.exact is None


@pytest.mark.parametrize("seed", range(3))
def test_affine_forms_are_the_network_on_its_region(seed):
    net = _net(seed, (8, 8), N_IN)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
    P = ReluPrepared(bm, lo, hi, [torch.ones(1, 1)], [torch.zeros(1)])
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(16, N_IN, generator=g) * (hi - lo)
    with torch.no_grad():
        pre, y = _pre_activations(net, x.double() if False else x)
    active = {r: (z >= 0) for r, z in zip(P.relus, pre)}
    forms = P.exact.affine_forms(active)
    dx = (x.double() - P.exact.centre).numpy()
    a, b = forms[bm.graph.output]
    np.testing.assert_allclose(np.einsum("mnv,mv->mn", a, dx) + b, y.double().numpy(), atol=1e-5)
    for r, z in zip(P.relus, pre):
        a, b = forms[P.pre[r]]
        np.testing.assert_allclose(np.einsum("mnv,mv->mn", a, dx) + b, z.double().numpy(), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_decide_never_closes_a_region_that_holds_a_counterexample(seed):
    net = _net(seed, (6, 6), N_IN)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
    g = torch.Generator().manual_seed(100 + seed)
    x = lo + torch.rand(20000, N_IN, generator=g) * (hi - lo)
    with torch.no_grad():
        pre, y = _pre_activations(net, x)
    d = float(y.quantile(0.05))                  # y <= d: a few regions hold counterexamples
    P = ReluPrepared(bm, lo, hi, [torch.ones(1, 1)], [torch.tensor([d])])
    pats = _patterns(net, lo, hi, 24, seed)
    m = pats[0].shape[0]
    sg = {r: torch.where(p, 1, -1).to(torch.int8) for r, p in zip(P.relus, pats)}
    rlo = {P.pre[r]: torch.full((m, p.shape[1]), -10.0) for r, p in zip(P.relus, pats)}
    rup = {P.pre[r]: torch.full((m, p.shape[1]), 10.0) for r, p in zip(P.relus, pats)}
    margin = torch.full((m, 1), -1.0)
    closed = torch.zeros(m, dtype=torch.bool)
    for i in range(m):       # one domain at a time: a candidate must not hide the others
        one = lambda t: {k: v[i:i + 1] for k, v in t.items()}
        c, cand = P.exact.decide(one(rlo), one(rup), one(sg), margin[i:i + 1])
        closed[i] = c[0]
        if cand is not None:
            xc, k = cand
            assert bool((xc >= lo).all() and (xc <= hi).all())
            with torch.no_grad():
                assert float(net(xc.unsqueeze(0))) <= d
    # a sampled point in the region of a closed domain never violates y <= d
    sampled = torch.stack([(z >= 0) for z in pre], 0) if False else torch.cat([(z >= 0) for z in pre], 1)
    pat = torch.cat(pats, 1)
    for i in closed.nonzero().flatten().tolist():
        inside = (sampled == pat[i]).all(1)
        assert not bool((y[inside, 0] <= d).any())
    assert closed.any() and not closed.all()


def _spy(monkeypatch):
    calls = {"domains": 0, "closed": 0}
    orig = LinearRegions.decide

    def decide(self, lo, up, sg, margin, deadline=None):
        closed, c = orig(self, lo, up, sg, margin, deadline)
        calls["domains"] += margin.shape[0]
        calls["closed"] += int(closed.sum())
        return closed, c
    monkeypatch.setattr(LinearRegions, "decide", decide)
    return calls


def test_bab_with_linear_programs_agrees_with_milp(monkeypatch):
    calls = _spy(monkeypatch)
    for seed in (11, 12, 13):
        net = _net(seed, (8, 8), N_IN)
        bm = BoundedModel(net, input_shape=(N_IN,))
        lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
        m, x_star = _milp_min(net, lo, hi)
        for d, truth in ((m - 1e-3, "unsat"), (m + 1e-3, "sat")):
            r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                               deadline=time.perf_counter() + 20, batch=4)
            if truth == "unsat":
                assert r.status == "unsat", (seed, r)
            else:
                assert r.status == "candidate", (seed, r)
                with torch.no_grad():
                    assert float(net(r.x.reshape(1, -1))) <= d
    # the linear programs took part: they closed some of the domains
    assert calls["domains"] > 0 and calls["closed"] > 0


def test_no_linear_region_is_left_undecided(monkeypatch):
    """Without the LP, linear regions got 100+ more optimization steps and could stay open
    ("no unstable neuron left"); with it the run ends unsat or with a candidate."""
    calls = _spy(monkeypatch)
    for seed in range(3):
        net = _net(seed + 20, (6, 6), N_IN)
        bm = BoundedModel(net, input_shape=(N_IN,))
        lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
        m, _ = _milp_min(net, lo, hi)
        r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([m - 1e-5])],
                           deadline=time.perf_counter() + 20, batch=4)
        assert r.status == "unsat", r
    assert calls["domains"] > 0
