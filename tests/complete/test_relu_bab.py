"""ReLU-split branch and bound: every subdomain's bounds hold on the points that satisfy its
splits, beta multipliers only tighten, unsat only where an exact MILP agrees, counterexamples
are real."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import check_domains_sound
from verifier import BoundedModel
from verifier.complete import verify
from verifier.complete.relu_bab import ReluPrepared, relu_split_bab

N_IN = 20


def _net(seed, hidden=(16, 16), n_in=N_IN, act=nn.ReLU):
    torch.manual_seed(seed)
    layers, w = [], n_in
    for h in hidden:
        layers += [nn.Linear(w, h), act()]
        w = h
    layers.append(nn.Linear(w, 1))
    return nn.Sequential(*layers)


def _box(n_in=N_IN, r=0.5):
    return -r * torch.ones(n_in), r * torch.ones(n_in)


def _pre_activations(net, x):
    """The inputs of every ReLU of a Sequential, in order, and the output."""
    pre = []
    for m in net:
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            pre.append(x)
        x = m(x)
    return pre, x


def _random_splits(P, net, n, seed):
    """``n`` domains, each splitting a random share (up to all) of the neurons that the root
    leaves unstable, with the signs of a random point's activation pattern (so no domain is
    empty; the many-split ones are nearly linear regions, where bounds are close to exact and
    an unsound term would show)."""
    g = torch.Generator().manual_seed(seed)
    lo, up, sg = P.root_domain()
    lo = {k: v.repeat(n, 1) for k, v in lo.items()}
    up = {k: v.repeat(n, 1) for k, v in up.items()}
    sg = {k: v.repeat(n, 1) for k, v in sg.items()}
    x = P.lower + torch.rand(n, *P.lower.shape, generator=g) * (P.upper - P.lower)
    with torch.no_grad():
        pre, _ = _pre_activations(net, x)
    for z, r in zip(pre, P.relus):
        p = P.pre[r]
        unstable = (P.root[p].lower < 0) & (P.root[p].upper > 0)          # [1, width]
        share = torch.rand(n, 1, generator=g)
        chosen = unstable & (torch.rand(z.shape, generator=g) < share)
        sg[r] = torch.where(chosen, torch.where(z >= 0, 1, -1), 0).to(torch.int8)
    return lo, up, sg


def _matching(pre, sg, relus):
    """[n_domains, n_points]: the points whose activation pattern satisfies each domain's splits."""
    ok = None
    for z, r in zip(pre, relus):
        s = sg[r].float()                                       # [n, width]
        # sign·z >= 0 wherever split
        good = ((s.unsqueeze(1) * z.unsqueeze(0)) >= 0) | (s.unsqueeze(1) == 0)
        good = good.all(2)
        ok = good if ok is None else ok & good
    return ok


def _pgd_points(net, x0, lo, hi, steps=30):
    """Iterates of signed-gradient descent on the output from x0 (all kept)."""
    pts = [x0]
    x = x0.clone()
    step = (hi - lo) * 0.05
    for _ in range(steps):
        x.requires_grad_(True)
        y = net(x).sum()
        grad, = torch.autograd.grad(y, x)
        x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), hi), lo)
        pts.append(x)
    return torch.cat(pts)


def _split_problem(seed, n=24, act=nn.ReLU):
    """A 3-layer MLP on a 6-dim box, its problem (bound y itself, d = 0) and ``n`` random
    domains (``_random_splits``)."""
    net = _net(seed, hidden=(12, 12, 12), n_in=6, act=act)
    bm = BoundedModel(net, input_shape=(6,))
    lo, hi = _box(6, r=1.0)
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([0.0])])
    return net, P, lo, hi, n, _random_splits(P, net, n, seed)


def _domain_points(net, P, sg, lo, hi, g):
    """Random and PGD points of the box: (split nodes' inputs, output, ``[n, points]`` which
    points satisfy each domain's splits)."""
    x = lo + torch.rand(40_000, lo.shape[0], generator=g) * (hi - lo)
    x = torch.cat([x, _pgd_points(net, x[:300], lo, hi)])
    with torch.no_grad():
        pre, y = _pre_activations(net, x)
    return pre, y, _matching(pre, sg, P.relus)


@pytest.mark.parametrize("seed", range(4))
def test_every_subdomain_bound_holds_on_its_points(seed):
    net, P, lo, hi, n, (d_lo, d_up, sg) = _split_problem(seed)
    res = P.bound(d_lo, d_up, sg, first_split=0, iterations=15)
    pre, y, match = _domain_points(net, P, sg, lo, hi, torch.Generator().manual_seed(seed))
    assert check_domains_sound(P, res, match, pre, y) >= n // 2


def test_beta_only_tightens_and_sometimes_does():
    gains = []
    for seed in range(3):
        net = _net(seed, hidden=(16, 16))
        bm = BoundedModel(net, input_shape=(N_IN,))
        lo, hi = _box()
        P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([0.0])])
        d_lo, d_up, sg = _random_splits(P, net, 16, seed + 10)
        # fixed slopes, so that beta is the only difference; no refinement of later layers, so
        # that the splits act only through beta and the clamped bounds
        kw = dict(first_split=len(P.relus), iterations=30, optimize_alpha=False)
        with_beta = P.bound(d_lo, d_up, sg, optimize_beta=True, **kw)["margin"]
        without = P.bound(d_lo, d_up, sg, optimize_beta=False, **kw)["margin"]
        finite = torch.isfinite(with_beta) & torch.isfinite(without)
        assert bool((with_beta[finite] >= without[finite] - 1e-5).all())
        gains.append(float((with_beta[finite] - without[finite]).max()))
    assert max(gains) > 1e-3, gains


def _milp_min(net, lo, hi):
    """The exact minimum of the (scalar) output of a ReLU Sequential over the box: a big-M MILP
    (scipy's HiGHS) with pre-activation bounds from interval arithmetic in float64."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    lins = [m for m in net if isinstance(m, nn.Linear)]
    Ws = [m.weight.detach().double().numpy() for m in lins]
    bs = [m.bias.detach().double().numpy() for m in lins]
    n_in = Ws[0].shape[1]
    # variable layout: x, then per hidden layer (z, h, delta)
    idx, nv = {}, n_in
    l, u = lo.double().numpy(), hi.double().numpy()
    box_lo, box_hi = list(l), list(u)
    rows, rlo, rhi = [], [], []
    integ = [0] * n_in
    prev = np.arange(n_in)
    for W, b in zip(Ws[:-1], bs[:-1]):
        k = W.shape[0]
        zl = W.clip(min=0) @ l + W.clip(max=0) @ u + b
        zu = W.clip(min=0) @ u + W.clip(max=0) @ l + b
        z, h, dl = np.arange(nv, nv + k), np.arange(nv + k, nv + 2 * k), np.arange(nv + 2 * k, nv + 3 * k)
        nv += 3 * k
        box_lo += list(zl) + [0.0] * k + [0.0] * k
        box_hi += list(zu) + list(np.maximum(zu, 0)) + [1.0] * k
        integ += [0] * (2 * k) + [1] * k
        for i in range(k):
            rows.append({z[i]: 1.0, **{int(p): -W[i, j] for j, p in enumerate(prev)}})
            rlo.append(b[i]); rhi.append(b[i])                          # z = W prev + b
            rows.append({h[i]: 1.0, z[i]: -1.0}); rlo.append(0.0); rhi.append(np.inf)   # h >= z
            # h <= z - zl (1 - delta)
            rows.append({h[i]: 1.0, z[i]: -1.0, dl[i]: -zl[i]}); rlo.append(-np.inf); rhi.append(-zl[i])
            # h <= zu delta
            rows.append({h[i]: 1.0, dl[i]: -max(zu[i], 0.0)}); rlo.append(-np.inf); rhi.append(0.0)
        l, u = np.maximum(zl, 0), np.maximum(zu, 0)
        prev = h
    A = np.zeros((len(rows), nv))
    for r, row in enumerate(rows):
        for j, v in row.items():
            A[r, j] += v
    c = np.zeros(nv)
    c[prev] = Ws[-1][0]
    res = milp(c, constraints=LinearConstraint(A, rlo, rhi), integrality=np.array(integ),
               bounds=Bounds(box_lo, box_hi), options={"mip_rel_gap": 1e-9})
    assert res.success
    return float(res.fun + bs[-1][0]), res.x[:n_in]


def _vnnlib(lo, hi, d):
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lo))] + ["(declare-const Y_0 Real)"]
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        lines += [f"(assert (>= X_{i} {a!r}))", f"(assert (<= X_{i} {b!r}))"]
    lines.append(f"(assert (<= Y_0 {d!r}))")
    return "\n".join(lines) + "\n"


def _hard_instance():
    """A net whose exact minimum alpha-CROWN cannot reach, and that minimum (MILP)."""
    net = _net(0)
    lo, hi = _box()
    m, x_star = _milp_min(net, lo, hi)
    with torch.no_grad():  # the MILP's minimizer reaches its value on the network itself
        assert abs(float(net(torch.tensor(x_star, dtype=torch.float32))) - m) < 1e-4
    return net, lo, hi, m


def test_relu_bab_proves_what_alpha_crown_cannot(tmp_path):
    from verifier.spec.vnnlib import read_vnnlib
    net, lo, hi, m = _hard_instance()
    bm = BoundedModel(net, input_shape=(N_IN,))
    d = m - 0.02                        # y <= d is impossible: the exact minimum is m
    p = tmp_path / "p.vnnlib"
    p.write_text(_vnnlib(lo, hi, d))
    spec = read_vnnlib(p)
    without = verify(bm, spec, timeout=30, bab=False)
    assert without.status == "unknown", without
    seen = []
    v = verify(bm, spec, timeout=30, progress=lambda *a: seen.append(a))
    assert v.status == "unsat", v
    assert v.method == "bab-relu" and "beta-CROWN" in v.reason
    assert seen and all(len(a) == 3 for a in seen)


def test_relu_bab_counterexample_replays(tmp_path):
    from verifier.spec.vnnlib import read_vnnlib
    net, lo, hi, m = _hard_instance()
    bm = BoundedModel(net, input_shape=(N_IN,))
    d = m + 0.01                        # the MILP's minimizer violates y <= d
    r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                       deadline=time.perf_counter() + 30)
    assert r.status == "candidate"
    with torch.no_grad():
        assert float(net(r.x.reshape(1, -1))) <= d
    assert bool(((r.x >= lo) & (r.x <= hi)).all())
    p = tmp_path / "p.vnnlib"
    p.write_text(_vnnlib(lo, hi, d))
    v = verify(bm, read_vnnlib(p), timeout=30, attack=False)   # no up-front attack: BaB finds it
    assert v.status == "sat", v
    cex = v.counterexample
    with torch.no_grad():
        y = float(net(torch.tensor(cex.x, dtype=torch.float32).reshape(1, -1)))
    assert y <= d and np.all(cex.x >= lo.numpy()) and np.all(cex.x <= hi.numpy())


@pytest.mark.parametrize("seed,branching",
                         [(s, "babsr") for s in range(3)] + [(0, "fsb")]
                         + [pytest.param(s, "fsb", marks=pytest.mark.slow) for s in (1, 2)])
def test_unsat_agrees_with_milp(seed, branching):
    net = _net(seed + 1)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = _box()
    m, _ = _milp_min(net, lo, hi)
    for d, truth in ((m - 0.03, "unsat"), (m + 0.03, "sat")):
        r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                           deadline=time.perf_counter() + 20, branching=branching)
        if truth == "sat":
            assert r.status != "unsat"
        else:
            assert r.status in ("unsat", "timeout")
            assert r.status == "unsat"   # small enough to finish


def test_budget_is_kept():
    net = _net(3, hidden=(32, 32, 32))
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = _box(r=1.0)
    x = lo + torch.rand(500, N_IN, generator=torch.Generator().manual_seed(0)) * (hi - lo)
    x = _pgd_points(net, x, lo, hi, steps=50)
    with torch.no_grad():
        m = float(net(x).min())
    t0 = time.perf_counter()
    # just below the minimum found by PGD: many splits either way; a 1 s budget must stop it
    d = m - 1e-3
    r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                       deadline=time.perf_counter() + 1.0, batch=8)
    assert time.perf_counter() - t0 < 3.0
    assert r.status in ("timeout", "unsat", "candidate")
    if r.status == "candidate":
        with torch.no_grad():
            assert float(net(r.x.reshape(1, -1))) <= d


def test_domain_limit_gives_unknown():
    net, lo, hi, m = _hard_instance()
    bm = BoundedModel(net, input_shape=(N_IN,))
    r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([m - 1e-4])],
                       deadline=time.perf_counter() + 20, batch=2, max_domains=3)
    assert r.status == "unknown" and "domain limit" in r.reason


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.2)], ids=["relu", "leaky"])
@pytest.mark.parametrize("seed,iterations", [(0, 0), (1, 3), (2, 10)])
def test_warm_started_bounds_hold_on_their_points(seed, iterations, act):
    """Any start (alpha anywhere, even outside its range: clamped; beta >= 0 of any size, even
    on unsplit neurons: ignored there) gives sound bounds after any number of steps, for ReLU
    and LeakyReLU splits alike."""
    net, P, lo, hi, n, (d_lo, d_up, sg) = _split_problem(seed, act=act)
    g = torch.Generator().manual_seed(seed + 100)
    alpha = {r: torch.rand(n, 1, 12, generator=g) * 3 - 1 for r in P.relus}
    beta = {r: torch.rand(n, 1, 12, generator=g) * 10 for r in P.relus}
    res = P.bound(d_lo, d_up, sg, first_split=0, iterations=iterations,
                  alpha_start=alpha, beta_start=beta)
    pre, y, match = _domain_points(net, P, sg, lo, hi, g)
    assert check_domains_sound(P, res, match, pre, y) >= n // 2


def test_kept_parameters_give_the_kept_bound():
    """The alpha and beta returned are those of each row's best bound: bounding again from them
    with no step reproduces the margin (what the children's warm start relies on)."""
    net = _net(3, hidden=(16, 16))
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = _box()
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0], [-1.0]])], [torch.tensor([0.0, 0.0])])
    d_lo, d_up, sg = _random_splits(P, net, 12, 7)
    kw = dict(first_split=len(P.relus))
    res = P.bound(d_lo, d_up, sg, iterations=12, lr_alpha=0.5, lr_beta=0.5, **kw)
    assert res["alpha"] and res["beta"]
    again = P.bound(res["lo"], res["up"], sg, iterations=0, alpha_start=res["alpha"],
                    beta_start=res["beta"], **kw)
    cold = P.bound(res["lo"], res["up"], sg, iterations=0, **kw)
    fin = torch.isfinite(res["margin"])
    assert torch.allclose(again["margin"][fin], res["margin"][fin], atol=1e-4)
    assert float((res["margin"][fin] - cold["margin"][fin]).max()) > 1e-3


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["relu", "leaky"])
def test_new_split_beta_keeps_the_parents_bound(act):
    """``_new_split_beta``: started from its parent's kept alpha and beta, with the new split's
    beta chosen so, each child's bound (no step taken) is at least its parent's on every row
    whose coefficient on the split neuron's output is positive (the rows it is derived for);
    a LeakyReLU's lower piece has its own slope (the rule's ``piece_slopes``)."""
    from verifier.complete.relu_bab import _new_split_beta, _split_coefficients
    net = _net(4, hidden=(16, 16), act=act)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = _box()
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0], [-1.0]])], [torch.tensor([0.0, 0.0])])
    d_lo, d_up, sg = _random_splits(P, net, 8, 3)
    kw = dict(first_split=len(P.relus))
    par = P.bound(d_lo, d_up, sg, iterations=15, lr_alpha=0.3, lr_beta=0.3, **kw)
    which, local = P.branch(par, sg)
    ok = which >= 0
    a = _split_coefficients(P, par, which, local)
    n = which.shape[0]
    rep = lambda t: t.repeat(2, *[1] * (t.dim() - 1))
    c_sg = {r: rep(v).clone() for r, v in sg.items()}
    sign = torch.cat([torch.ones(n, dtype=torch.int8), -torch.ones(n, dtype=torch.int8)])
    w2, l2 = which.repeat(2), local.repeat(2)
    for i, r in enumerate(P.relus):
        rows = (w2 == i).nonzero().flatten()
        c_sg[r].view(2 * n, -1)[rows, l2[rows]] = sign[rows]
    warm_a = {r: rep(v) for r, v in par["alpha"].items()}
    warm_b = {r: rep(v) for r, v in par["beta"].items()}
    c_lo, c_up = {p: rep(v) for p, v in par["lo"].items()}, {p: rep(v) for p, v in par["up"].items()}
    _new_split_beta(P, warm_a, warm_b, a.repeat(2, 1), c_lo, c_up, w2, l2, sign)
    child = P.bound(c_lo, c_up, c_sg, iterations=0, alpha_start=warm_a, beta_start=warm_b, **kw)
    zero = P.bound(c_lo, c_up, c_sg, iterations=0, alpha_start=warm_a,
                   beta_start={r: rep(v) for r, v in par["beta"].items()}, **kw)
    mask = (a.repeat(2, 1) > 1e-3) & ok.repeat(2).unsqueeze(1) & torch.isfinite(child["margin"])
    assert int(mask.sum()) >= 4
    parent = par["margin"].repeat(2, 1)
    assert bool((child["margin"][mask] >= parent[mask] - 1e-4).all())
    # and the new split's beta at 0 instead loses some of it (the test can fail)
    assert bool((zero["margin"][mask] < parent[mask] - 1e-3).any())


def test_nan_start_is_a_cold_start():
    """A domain whose kept start is NaN (``_stored`` after a stalled split) starts from CROWN's
    slopes and beta 0, exactly as without a start; the other domains keep theirs."""
    net = _net(5, hidden=(16, 16))
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = _box()
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([0.0])])
    d_lo, d_up, sg = _random_splits(P, net, 6, 11)
    kw = dict(first_split=len(P.relus), iterations=0)
    par = P.bound(d_lo, d_up, sg, first_split=len(P.relus), iterations=10, lr_beta=0.5)
    nan_a = {r: v.clone() for r, v in par["alpha"].items()}
    nan_b = {r: v.clone() for r, v in par["beta"].items()}
    for v in (*nan_a.values(), *nan_b.values()):
        v[:3] = torch.nan
    mixed = P.bound(par["lo"], par["up"], sg, alpha_start=nan_a, beta_start=nan_b, **kw)
    cold = P.bound(par["lo"], par["up"], sg, **kw)
    warm = P.bound(par["lo"], par["up"], sg, alpha_start=par["alpha"], beta_start=par["beta"], **kw)
    assert torch.allclose(mixed["margin"][:3], cold["margin"][:3])
    assert torch.allclose(mixed["margin"][3:], warm["margin"][3:])
    assert not torch.allclose(cold["margin"], warm["margin"])
