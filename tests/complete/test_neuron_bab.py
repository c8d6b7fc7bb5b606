"""Neuron-split branch and bound on non-ReLU nonlinearities (interval splits, ``relu_bab``):
the split multipliers with their constant term hold on the split set, every subdomain's bounds
hold on the points that satisfy its splits (sigmoid, tanh, and a mix with ReLU; float32 and
float64), unsat verdicts agree with a Lipschitz-certified grid minimum, counterexamples
replay."""
import math
import time

import numpy as np
import pytest
from types import SimpleNamespace
import torch
import torch.nn as nn

from helpers import check_domains_sound
from verifier import BoundedModel, Interval
from verifier.bounds.alpha import alpha_crown_bounds
from verifier.complete import verify
from verifier.complete.relu_bab import (LOWER_SPLIT, UPPER_SPLIT, ReluPrepared,
                                        expand_relu_domains, relu_split_bab)
from verifier.graph.nodes import Node
from verifier.ops import RULES
from verifier.ops.activation import split_multipliers
from verifier.perturbation import Box
from verifier.spec.vnnlib import read_vnnlib

F_REF = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
         "gelu": torch.nn.functional.gelu}


def _split_set(k, seed, dtype):
    """``k`` neurons: intervals [l, u], and split constraints z >= s1 (sign +1 groups) and
    z <= s2 (sign -1) on random neurons, some on both sides: -> l, u, groups, and the
    per-neuron interval [a, b] the constraints leave."""
    g = torch.Generator().manual_seed(seed)
    mid = 2 * torch.randn(k, generator=g, dtype=torch.float64)
    w = 0.1 + 4 * torch.rand(k, generator=g, dtype=torch.float64)
    l, u = mid - w / 2, mid + w / 2
    s1 = l + (u - l) * torch.rand(k, generator=g, dtype=torch.float64) * 0.5
    s2 = u - (u - l) * torch.rand(k, generator=g, dtype=torch.float64) * 0.5
    c = torch.randint(0, 4, (k,), generator=g)          # 0 none, 1 lower, 2 upper, 3 both
    ge, le = (c == 1) | (c == 3), (c == 2) | (c == 3)
    a = torch.where(ge, s1, l)
    b = torch.where(le, s2, u)
    sign_ge = ge.to(torch.int8)
    sign_le = -le.to(torch.int8)
    return (l.to(dtype), u.to(dtype), [(sign_ge, s1.to(dtype)), (sign_le, s2.to(dtype))], a, b)


@pytest.mark.parametrize("op", ["sigmoid", "tanh", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optimized", [False, True], ids=["crown", "alpha"])
def test_split_multipliers_hold_on_the_split_set(op, dtype, optimized):
    """``A_l·z + b_l <= A·f(z) <= A_u·z + b_u`` at points satisfying the splits, for random
    A, beta >= 0 and (``optimized``) random relaxation parameters; with the constant term
    dropped (the point taken as 0) the bound fails somewhere, so the term is checked."""
    k, S = 40, 6
    l, u, cons, a, b = _split_set(k, seed=3, dtype=dtype)
    node = Node(name="act", op=op, inputs=["x"], shape=(k,), params={})
    rule = RULES[op]
    g = torch.Generator().manual_seed(4)
    A = torch.randn(1, S, k, generator=g, dtype=torch.float64).to(dtype)
    betas = [torch.rand(1, S, k, generator=g, dtype=torch.float64).to(dtype) * 2 for _ in cons]
    groups = [(sg.unsqueeze(0), bt, bt, pt.unsqueeze(0)) for (sg, pt), bt in zip(cons, betas)]
    box = Interval(l.unsqueeze(0), u.unsqueeze(0))
    alpha = None
    if optimized:
        got = rule.alpha_init(node, [box], 1, S, dtype)
        if got is None:
            pytest.skip(f"{op} has no free parameters here")
        init, lo_a, hi_a = got
        r = torch.rand(init.shape, generator=g, dtype=torch.float64).to(dtype)
        alpha = (lo_a + r * (hi_a - lo_a),) * 2
    (parts, b_l, b_u) = rule.backward(node, A, A.clone(), [box], alpha=alpha, beta=groups)
    (A_l, A_u), = parts
    t = torch.rand(2000, k, generator=g, dtype=torch.float64)
    Z = torch.cat([a.unsqueeze(0), b.unsqueeze(0), a + t * (b - a)])         # [n, k]
    FZ = F_REF[op](Z)
    Ad = A[0].double()
    val = FZ @ Ad.t()
    low = Z @ A_l[0].double().t() + b_l[0].double()
    up = Z @ A_u[0].double().t() + b_u[0].double()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    scale = tol * (1 + (Z.abs().sum(1, keepdim=True) + 10) * 10)
    assert bool(((low - val) <= scale).all()), float((low - val).max())
    assert bool(((val - up) <= scale).all()), float((val - up).max())
    # without the constant term large multipliers give a wrong bound somewhere
    no_point = [(sg, 100 * bt, 100 * bt) for sg, bt, _, _ in groups]
    (parts, b_l0, _), = [rule.backward(node, A, A.clone(), [box], alpha=alpha, beta=no_point)]
    (A_l0, _), = parts
    low0 = Z @ A_l0[0].double().t() + b_l0[0].double()
    assert bool(((low0 - val) > 1e-3).any())


def test_split_multipliers_accept_one_group_and_a_list():
    """A single ``(sign, beta, beta)`` group (ReLU's) and a list of pointed groups add up."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 5, generator=g)
    sign = torch.tensor([[1, -1, 0, 1, 0], [0, 0, 1, -1, 1]], dtype=torch.int8)
    beta = torch.rand(2, 3, 5, generator=g)
    pt = torch.randn(2, 5, generator=g)
    A_l, A_u, c_l, c_u = split_multipliers(A.clone(), A.clone(), (sign, beta, beta))
    assert torch.allclose(A_l, A - sign.unsqueeze(1) * beta) and c_l == 0.0 and c_u == 0.0
    A_l2, A_u2, c_l2, c_u2 = split_multipliers(A.clone(), A.clone(),
                                               [(sign, beta, beta, pt), (sign, beta, beta, pt)])
    assert torch.allclose(A_l2, A - 2 * sign.unsqueeze(1) * beta)
    assert torch.allclose(c_l2, 2 * (beta * (sign * pt).unsqueeze(1)).sum(2))
    assert torch.allclose(c_u2, -c_l2)


# --- per-domain soundness on small MLPs --------------------------------------------------
ACT = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def _mlp(acts, seed, n_in=4, width=12, scale=1.5):
    torch.manual_seed(seed)
    layers, w = [], n_in
    for a in acts:
        layers += [nn.Linear(w, width), ACT[a]()]
        w = width
    layers.append(nn.Linear(w, 1))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net


def _pre_activations(net, x):
    """The input of every activation of a Sequential, in order, and the output."""
    pre = []
    for m in net:
        if not isinstance(m, nn.Linear):
            pre.append(x)
        x = m(x)
    return pre, x


def _random_domains(P, net, n, seed):
    """``n`` domains around random points: for random neurons of each split node, one or two
    interval splits (a random point of the current interval; the half holding the point's
    pre-activation is kept) or a ReLU split with the point's sign; no domain is empty."""
    g = torch.Generator().manual_seed(seed)
    lo, up, sg = P.root_domain()
    lo = {k: v.repeat(n, 1) for k, v in lo.items()}
    up = {k: v.repeat(n, 1) for k, v in up.items()}
    sg = {k: v.repeat(n, 1) for k, v in sg.items()}
    x = P.lower + torch.rand(n, *P.lower.shape, generator=g, dtype=P.lower.dtype) * (P.upper - P.lower)
    with torch.no_grad():
        pre, _ = _pre_activations(net, x)
    for z, r in zip(pre, P.relus):
        p = P.pre[r]
        share = torch.rand(n, 1, generator=g, dtype=z.dtype)
        if P.at_zero[r]:
            unstable = (lo[p] < 0) & (up[p] > 0)
            chosen = unstable & (torch.rand(z.shape, generator=g, dtype=z.dtype) < share)
            sg[r] = torch.where(chosen, torch.where(z >= 0, 1, -1), 0).to(torch.int8)
            continue
        for _ in range(2):
            chosen = torch.rand(z.shape, generator=g, dtype=z.dtype) < share
            s = lo[p] + (up[p] - lo[p]) * torch.rand(z.shape, generator=g, dtype=z.dtype)
            above = z >= s
            lo[p] = torch.where(chosen & above, s, lo[p])
            up[p] = torch.where(chosen & ~above, s, up[p])
            bits = torch.where(above, LOWER_SPLIT, UPPER_SPLIT).to(torch.int8)
            sg[r] = torch.where(chosen, sg[r] | bits, sg[r])
    return lo, up, sg


def _matching(pre, lo, up, sg, P, tol):
    """[n_domains, n_points]: the points whose pre-activations satisfy each domain's splits."""
    ok = None
    for z, r in zip(pre, P.relus):
        p = P.pre[r]
        zz = z.unsqueeze(0)
        if P.at_zero[r]:
            s = sg[r].to(z.dtype).unsqueeze(1)
            good = ((s * zz) >= 0) | (s == 0)
        else:   # split neurons: inside the domain's interval (unsplit ones are inside anyway)
            split = (sg[r] != 0).unsqueeze(1)
            good = ~split | ((zz >= lo[p].unsqueeze(1) - tol) & (zz <= up[p].unsqueeze(1) + tol))
        good = good.all(2)
        ok = good if ok is None else ok & good
    return ok


def _pgd_points(net, x0, lo, hi, steps=40):
    pts, x = [x0], x0.clone()
    step = (hi - lo) * 0.03
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(net(x).sum(), x)
        x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), hi), lo)
        pts.append(x)
    return torch.cat(pts)


@pytest.mark.parametrize("acts", [("sigmoid",) * 3, ("tanh",) * 3, ("sigmoid", "relu", "tanh"),
                                  ("gelu", "tanh", "gelu")],
                         ids=["sigmoid", "tanh", "mix", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_interval_split_domain_bound_holds_on_its_points(acts, dtype):
    net = _mlp(acts, seed=len(acts[1]))
    bm = BoundedModel(net, input_shape=(4,), dtype=dtype)
    net = net.to(dtype)
    lo, hi = -torch.ones(4, dtype=dtype), torch.ones(4, dtype=dtype)
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([0.0])])
    assert len(P.relus) == 3 and sum(P.at_zero.values()) == acts.count("relu")
    n = 24
    d_lo, d_up, sg = _random_domains(P, net, n, seed=1)
    res = P.bound(d_lo, d_up, sg, first_split=0, iterations=15)
    g = torch.Generator().manual_seed(2)
    x = lo + torch.rand(30_000, 4, generator=g, dtype=dtype) * (hi - lo)
    x = torch.cat([x, _pgd_points(net, x[:400], lo, hi)])
    with torch.no_grad():
        pre, y = _pre_activations(net, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    match = _matching(pre, d_lo, d_up, sg, P, 0.0)
    assert check_domains_sound(P, res, match, pre, y, tol) >= n // 2
    lower = res["margin"][:, 0]
    # the splits tighten: on average the domains' bounds beat the root's
    root = P.bound(*P.root_domain(), first_split=len(P.relus), iterations=15)["margin"][0, 0]
    assert float(lower[torch.isfinite(lower)].mean()) > float(root)


def test_branch_picks_interval_neurons_and_children_cover_the_parent():
    """On a sigmoid MLP every domain has a neuron to split; the two children of a split
    interval are [s, u] and [l, s] with l < s < u, marked from below and from above."""
    net = _mlp(("sigmoid", "sigmoid"), seed=0)
    bm = BoundedModel(net, input_shape=(4,))
    lo, hi = -torch.ones(4), torch.ones(4)
    P = ReluPrepared(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([-10.0])])
    l0, u0, sg = P.root_domain()
    res = P.bound(l0, u0, sg, first_split=len(P.relus), iterations=5)
    which, local = P.branch(res, sg)
    assert int(which) >= 0
    seen = []
    real = P.bound

    def spy(c_lo, c_up, c_sg, *a, **kw):
        seen.append(({k: v.clone() for k, v in c_lo.items()},
                     {k: v.clone() for k, v in c_up.items()}, {k: v.clone() for k, v in c_sg.items()}))
        return real(c_lo, c_up, c_sg, *a, **kw)

    P.bound = spy
    cur = {"lo": res["lo"], "up": res["up"], "sg": sg, "alpha": res["alpha"],
           "margin": res["margin"], "which": which, "local": local,
           "depth": torch.zeros(1, dtype=torch.long)}
    expand_relu_domains(P, cur, 1, time.perf_counter() + 30, math.inf)
    c_lo, c_up, c_sg = seen[0]
    r = P.relus[int(which)]
    p, j = P.pre[r], int(local)
    l, u = float(res["lo"][p][0, j]), float(res["up"][p][0, j])
    s = float(c_lo[p][0, j])
    assert l < s < u
    assert float(c_up[p][0, j]) == u and float(c_lo[p][1, j]) == l and float(c_up[p][1, j]) == s
    assert int(c_sg[r][0, j]) == LOWER_SPLIT and int(c_sg[r][1, j]) == UPPER_SPLIT
    # nothing else changed
    for q in c_lo:
        other = torch.ones_like(c_lo[q], dtype=torch.bool)
        if q == p:
            other[:, j] = False
        assert torch.equal(c_lo[q][other], res["lo"][q].repeat(2, 1)[other])
        assert torch.equal(c_up[q][other], res["up"][q].repeat(2, 1)[other])


# --- verdicts on small sigmoid / tanh MLPs -------------------------------------------------
def _two_input_net(act, seed):
    return _mlp((act, act), seed=seed, n_in=2, width=20, scale=2.0)


def _certified_min(net, act, n=801):
    """A rigorous lower bound on the net's minimum over [-1, 1]^2 that owes nothing to our
    bounds: the minimum over a grid of spacing h, minus L·h/sqrt(2), with L the product of the
    layers' spectral norms and the activations' slope bounds (1/4 for sigmoid, 1 for tanh).
    -> (that bound, the grid's best point, its value)."""
    net = net.double()
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    X = torch.cartesian_prod(t, t)
    with torch.no_grad():
        y = net(X)[:, 0]
    L = 1.0
    for m in net:
        if isinstance(m, nn.Linear):
            L *= float(torch.linalg.matrix_norm(m.weight, 2))
        else:
            L *= 0.25 if act == "sigmoid" else 1.0
    h = 2 / (n - 1)
    i = int(y.argmin())
    net.float()
    return float(y[i]) - L * h / math.sqrt(2) * (1 + 1e-6), X[i], float(y[i])


def _vnnlib(path, d):
    lines = [f"(declare-const X_{i} Real)" for i in range(2)] + ["(declare-const Y_0 Real)"]
    for i in range(2):
        lines += [f"(assert (>= X_{i} -1.0))", f"(assert (<= X_{i} 1.0))"]
    lines.append(f"(assert (<= Y_0 {d!r}))")
    path.write_text("\n".join(lines) + "\n")
    return read_vnnlib(path)


@pytest.mark.parametrize("act,seed", [("sigmoid", 1), ("tanh", 1)])
def test_neuron_bab_proves_what_alpha_crown_cannot(tmp_path, act, seed):
    net = _two_input_net(act, seed)
    bm = BoundedModel(net, input_shape=(2,))
    box = Box(-torch.ones(1, 2), torch.ones(1, 2))
    with torch.no_grad():
        alpha, _, _ = alpha_crown_bounds(bm.graph, bm._leaves(box), torch.ones(1, 1, 1))
    cert, _, _ = _certified_min(net, act)
    assert cert > float(alpha) + 1e-3, "alpha-CROWN is not loose here: no test"
    d = float(alpha) + 0.3 * (cert - float(alpha))      # y <= d has no solution: cert > d
    spec = _vnnlib(tmp_path / "p.vnnlib", d)
    without = verify(bm, spec, timeout=30, max_split_inputs=0, bab=False)
    assert without.status == "unknown", without
    v = verify(bm, spec, timeout=30, max_split_inputs=0)
    assert v.status == "unsat", v
    assert v.method == "bab-neuron" and "beta-CROWN" in v.reason and v.details["domains"] > 1


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_neuron_bab_counterexample_replays(tmp_path, act):
    net = _two_input_net(act, 1)
    bm = BoundedModel(net, input_shape=(2,))
    _, x_best, y_best = _certified_min(net, act)
    d = y_best + 0.01                       # the grid's best point violates y <= d
    r = relu_split_bab(bm, -torch.ones(2), torch.ones(2), [torch.tensor([[1.0]])],
                       [torch.tensor([d])], deadline=time.perf_counter() + 30)
    assert r.status == "candidate"
    with torch.no_grad():
        assert float(net(r.x.reshape(1, -1))) <= d
    v = verify(bm, _vnnlib(tmp_path / "p.vnnlib", d), timeout=30, attack=False,
               max_split_inputs=0)
    assert v.status == "sat" and v.method == "bab-neuron", v
    x = torch.tensor(v.counterexample.x, dtype=torch.float32).reshape(1, -1)
    with torch.no_grad():
        assert float(net(x)) <= d
    assert np.all(np.abs(v.counterexample.x) <= 1.0)


def test_split_strategy_words_neuron_splits_for_smooth_models():
    from verifier.complete.verify import NEURON_SPLITS, RELU_SPLITS, _split_strategy
    smooth = BoundedModel(_mlp(("sigmoid", "tanh"), 0, n_in=20), input_shape=(20,))
    relu = BoundedModel(_mlp(("relu", "relu"), 0, n_in=20), input_shape=(20,))
    spec = SimpleNamespace(n_inputs=20, regions=[SimpleNamespace(lower=np.zeros(20), upper=np.ones(20))])
    assert _split_strategy(smooth, spec, True, 16) is NEURON_SPLITS
    assert _split_strategy(relu, spec, True, 16) is RELU_SPLITS
