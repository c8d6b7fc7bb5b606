"""Input-split branch and bound: no domain is closed wrongly, counterexamples are real, the
wall-clock budget is kept."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.complete.input_bab import input_split_bab


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def _true_min(net, lo, hi, n=200_000):
    """Dense sampling (plus corners) of y0 - y1 over the box: an upper estimate of the minimum."""
    g = torch.Generator().manual_seed(0)
    x = lo + torch.rand(n, 3, generator=g) * (hi - lo)
    corners = torch.tensor(np.array(np.meshgrid(*[[0, 1]] * 3)).reshape(3, -1).T, dtype=torch.float32)
    x = torch.cat([x, lo + corners * (hi - lo)])
    with torch.no_grad():
        y = net(x)
    return float((y[:, 0] - y[:, 1]).min())


@pytest.mark.parametrize("seed", range(6))
def test_unsat_only_when_no_sampled_point_violates(seed):
    net = _net(seed)
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    m = _true_min(net, lo, hi)
    C = torch.tensor([[1.0, -1.0]])          # violated iff y0 - y1 <= d
    for d in (m - 0.05, m + 0.05):
        r = input_split_bab(bm, lo, hi, [C], [torch.tensor([d])], deadline=time.perf_counter() + 30)
        if d >= m:  # a sampled point violates: never unsat
            assert r.status != "unsat"
            if r.status == "candidate":
                y = net(r.x.reshape(1, 3)).detach()
                assert float(y[0, 0] - y[0, 1]) <= d + 1e-5
                assert bool(((r.x >= lo) & (r.x <= hi)).all())
        else:
            assert r.status in ("unsat", "timeout")


def test_budget_is_kept():
    net = _net(0)
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    m = _true_min(net, lo, hi)
    t0 = time.perf_counter()
    # just below the minimum: provable, but many splits; a 0.5 s budget must stop it
    r = input_split_bab(bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([m - 1e-6])],
                        deadline=time.perf_counter() + 0.5, batch=4)
    assert time.perf_counter() - t0 < 2.0
    assert r.status in ("timeout", "unsat", "candidate")
    if r.status == "candidate":  # the attack may beat dense sampling: then it must be real
        y = net(r.x.reshape(1, 3)).detach()
        assert float(y[0, 0] - y[0, 1]) <= m - 1e-6


def test_split_follows_the_bound_coefficients():
    """The split goes to the input with the largest |A_i|·width_i of the row closest to
    refuting the most open conjunction; without coefficients, to the widest input."""
    from verifier.complete.input_bab import _branch_dims
    A = torch.tensor([[[0.1, 5.0, 1.0], [3.0, 0.0, 0.0]],      # domain 0: rows 0, 1
                      [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])     # domain 1: the bound sees nothing
    margin = torch.tensor([[-0.1, -2.0], [-1.0, -1.0]])        # row 0 is closest to > 0
    per_k = margin.max(1, keepdim=True).values                 # one conjunction
    owner = torch.tensor([0, 0])
    lo = torch.zeros(2, 3)
    hi = torch.tensor([[1.0, 0.1, 1.0], [0.5, 2.0, 1.0]])
    scale = torch.ones(3)
    dims = _branch_dims(A, torch.tensor([True, True]), margin, per_k, owner, lo, hi, scale)
    assert dims.tolist() == [2, 1]   # 1.0·1 > 5·0.1 > 0.1·1; domain 1: the widest
    assert _branch_dims(None, torch.tensor([True, True]), margin, per_k, owner, lo, hi,
                        scale).tolist() == [0, 1]


def test_coefficient_branching_skips_an_input_the_output_barely_sees(monkeypatch):
    """Input 0 hardly matters (its weights are scaled by 0.01): widest-first splits it as often
    as the others, the coefficient rule almost never."""
    import verifier.complete.input_bab as ib
    net = _net(3)
    with torch.no_grad():
        net[0].weight[:, 0] *= 0.01
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    d = _true_min(net, lo, hi) - 0.05
    args = (bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([d])])
    smart = input_split_bab(*args, deadline=time.perf_counter() + 60)
    orig = ib._branch_dims
    monkeypatch.setattr(ib, "_branch_dims", lambda A, *a: orig(None, *a))
    widest = input_split_bab(*args, deadline=time.perf_counter() + 60)
    assert smart.status == widest.status == "unsat"
    assert smart.domains < widest.domains


@pytest.mark.parametrize("seed", range(3))
def test_every_subdomain_bound_and_inherited_bound_holds_at_sampled_points(seed, monkeypatch):
    """Each batch of domains is bounded with its parents' intermediate bounds as a prior (and
    per-domain refinement of the neurons still unstable). For every domain bounded, points
    sampled inside it (with its corners) must respect both the spec rows' lower bounds and every
    intermediate node's interval that its children inherit."""
    import verifier.complete.input_bab as ib
    from verifier.bounds.forward import evaluate
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                        nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    bm = BoundedModel(net, input_shape=(5,))
    lo, hi = -torch.ones(5), torch.ones(5)
    records = []
    orig = ib.crown

    def recording(graph, leaves, C, **kw):
        out = orig(graph, leaves, C, **kw)
        leaf = leaves[bm.input]
        records.append((leaf.lower.clone(), leaf.upper.clone(), C.clone(), out.lower.clone(),
                        {k: (v.lower.clone(), v.upper.clone()) for k, v in out.nodes.items()},
                        kw.get("prior") is not None))
        return out

    monkeypatch.setattr(ib, "crown", recording)
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])   # y0 is not the largest
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(20000, 5, generator=g) * (hi - lo)
    with torch.no_grad():
        m = float((net(x) @ C.t()).max(1).values.min())
    # just below the sampled minimum of the best row: provable only after many splits
    r = input_split_bab(bm, lo, hi, [C], [torch.tensor([m - 0.1, m - 0.1])],
                        deadline=time.perf_counter() + 8, batch=64)
    assert r.status in ("unsat", "timeout")
    assert sum(p for *_, p in records) >= 3          # children were bounded from a prior
    corners = torch.tensor(np.array(np.meshgrid(*[[0, 1]] * 5)).reshape(5, -1).T,
                           dtype=torch.float32)
    checked = 0
    for blo, bhi, Cb, low, nodes, _ in records[::max(1, len(records) // 12)]:
        for i in range(0, blo.shape[0], max(1, blo.shape[0] // 8)):
            u = torch.cat([torch.rand(300, 5, generator=g), corners])
            pts = blo[i] + u * (bhi[i] - blo[i])
            with torch.no_grad():
                y, vals = evaluate(bm.graph, {bm.input: pts})
            val = y.reshape(len(pts), -1) @ Cb[i].t()
            assert bool((val >= low[i] - 1e-4).all()), "a spec lower bound exceeds a sampled value"
            for k, (nl, nu) in nodes.items():
                v = vals[k].reshape(len(pts), -1)
                assert bool((v >= nl[i].reshape(-1) - 1e-4).all()), f"node {k} lower bound"
                assert bool((v <= nu[i].reshape(-1) + 1e-4).all()), f"node {k} upper bound"
            checked += 1
    assert checked >= 10


def test_corner_of_the_linear_bound_is_tried_as_a_counterexample():
    """y = w·x on [-1, 1]^3 with y <= d only within 1e-3 of the corner -sign(w): the centre
    fails, the attack has not run yet in round 1, and the corner that minimizes the bound's
    linear function is that point."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [0, 0, 0], [0, 0, 0], [0, 0, 0]]))
        net[0].bias.copy_(torch.tensor([10.0, 0, 0, 0]))       # the ReLU stays active
        net[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        net[2].bias.zero_()
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    d = 10.0 - 3.5 + 1e-3
    r = input_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                        deadline=time.perf_counter() + 10)
    assert r.status == "candidate" and r.rounds == 1
    assert r.x.flatten().tolist() == [-1.0, 1.0, -1.0]
    assert float(net(r.x.reshape(1, 3))) <= d


@pytest.mark.parametrize("seed", range(4))
def test_clipped_boxes_keep_every_counterexample(seed):
    """``_clip_boxes`` shrinks each box to where its conjunctions' linear lower bounds allow a
    counterexample. Over random sub-boxes of a ReLU net with two conjunctions, every point that
    satisfies a conjunction, from dense sampling (with the corners) and from a PGD attack on
    each box, must lie inside the clipped box, and a box called closed must hold none; the
    clipping must also cut some volume (else the test would check nothing)."""
    from verifier.bounds.crown import crown
    from verifier import Box
    from verifier.complete.input_bab import _clip_boxes
    from verifier.complete.spec_attack import spec_attack
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    bm = BoundedModel(net, input_shape=(4,))
    g = torch.Generator().manual_seed(seed)
    n = 24
    c = torch.rand(n, 4, generator=g) * 2 - 1
    w = torch.rand(n, 4, generator=g) * 0.2 + 0.02
    lo, hi = c - w, c + w
    Cs = [torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]),    # y0 is the largest
          torch.tensor([[0.0, 0.0, 1.0]])]                       # y2 is small
    with torch.no_grad():
        ys = net(lo.unsqueeze(1) + torch.rand(n, 4000, 4, generator=g) * (hi - lo).unsqueeze(1))
    # thresholds near the sampled values: many boxes hold counterexamples, many are open
    ds = [torch.stack([(ys @ C.t()).amax(-1).quantile(0.05)] * C.shape[0]) for C in Cs]
    C_all, d_all = torch.cat(Cs), torch.cat(ds)
    owner = torch.tensor([0, 0, 1])
    with torch.no_grad():
        res = crown(bm.graph, {bm.input: Box(lo, hi)}, C_all.expand(n, -1, -1), box_rows=False,
                    clipped_pass=False, relax_lines=False, keep=(bm.input,))
    margin = res.lower - d_all
    per_k = torch.stack([margin[:, owner == k].max(1).values for k in range(2)], 1)
    cl, ch, closed = _clip_boxes(res.A[bm.input], res.linear_lower - d_all, per_k > 0, owner, 2, lo, hi)
    assert bool((cl >= lo).all() and (ch <= hi).all())
    corners = torch.tensor(np.array(np.meshgrid(*[[0, 1]] * 4)).reshape(4, -1).T,
                           dtype=torch.float32)
    found = 0
    for i in range(n):
        u = torch.cat([torch.rand(20000, 4, generator=g), corners])
        pts = torch.minimum(lo[i] + u * (hi[i] - lo[i]), hi[i])   # lo + (hi - lo) may round past hi
        for k in range(2):
            x, kk, v = spec_attack(net, lo[i], hi[i], [Cs[k]], [ds[k]], steps=30, restarts=4,
                                   seed=seed * 100 + i, deadline=time.perf_counter() + 10)
            if v <= 0:
                pts = torch.cat([pts, x.reshape(1, 4)])
        with torch.no_grad():
            viol = net(pts) @ C_all.t() - d_all
        holds = torch.stack([(viol[:, owner == k] <= 0).all(1) for k in range(2)], 1).any(1)
        bad = pts[holds]
        found += len(bad)
        if closed[i]:
            assert len(bad) == 0, f"box {i} closed by clipping holds a counterexample"
        else:
            assert bool((bad >= cl[i]).all() and (bad <= ch[i]).all()), \
                f"box {i}: a counterexample lies outside the clipped box"
    assert found > 0
    shrunk = (ch - cl).prod(1) < 0.9 * (hi - lo).prod(1)
    assert int((shrunk | closed).sum()) >= 2


def test_clipping_closes_acas_like_problems_in_fewer_domains(monkeypatch):
    """With clipping on, branch and bound reaches the same verdicts in fewer domains."""
    import verifier.complete.input_bab as ib
    for seed in (0, 1):
        net = _net(seed)
        bm = BoundedModel(net, input_shape=(3,))
        lo, hi = -torch.ones(3), torch.ones(3)
        d = _true_min(net, lo, hi) - 0.02
        args = (bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([d])])
        on = input_split_bab(*args, deadline=time.perf_counter() + 60)
        with monkeypatch.context() as mp:
            mp.setattr(ib, "_clip_boxes", lambda A, lin, ref, owner, K, lo, hi:
                       (lo, hi, torch.zeros(lo.shape[0], dtype=torch.bool)))
            off = input_split_bab(*args, deadline=time.perf_counter() + 60)
        assert on.status == off.status == "unsat"
        assert on.domains < off.domains
