"""The element-wise rules with a domain (``pow``, ``sqrt``, ``rsqrt``, ``reciprocal``, ``log``;
``verifier.ops.domain``): their lines and intervals hold on dense grids of many intervals
(very wide, very narrow, near the domain's edge, across 0 for integer powers, degenerate), in
float32 and float64, for CROWN's lines and for random alpha-CROWN tangent points; an interval
that leaves the domain raises ``DomainError`` naming the node; whole models are sound under
every method (``check_sound``); the mappings from torch.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_sound, linf
from verifier import BoundedModel, DomainError, UnsupportedOpsError
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES

# (op, params, domain): "R" all reals, "pos" x > 0, "nonneg" x >= 0, "nonzero" one side of 0
CASES = [("pow", {"exponent": 2.0}, "R"), ("pow", {"exponent": 3.0}, "R"),
         ("pow", {"exponent": 4.0}, "R"), ("pow", {"exponent": 5.0}, "R"),
         ("pow", {"exponent": 0.0}, "R"), ("pow", {"exponent": 1.0}, "R"),
         ("pow", {"exponent": -1.0}, "nonzero"), ("pow", {"exponent": -2.0}, "nonzero"),
         ("pow", {"exponent": -3.0}, "nonzero"), ("pow", {"exponent": 0.5}, "nonneg"),
         ("pow", {"exponent": 1.5}, "nonneg"), ("pow", {"exponent": 2.5}, "nonneg"),
         ("pow", {"exponent": 0.3}, "nonneg"), ("pow", {"exponent": -0.5}, "pos"),
         ("pow", {"exponent": -1.7}, "pos"), ("sqrt", {}, "nonneg"), ("rsqrt", {}, "pos"),
         ("reciprocal", {}, "nonzero"), ("log", {}, "pos")]

IDS = [f"{op}{p.get('exponent', '')}" for op, p, _ in CASES]


def _positive(g, n):
    """Intervals in (0, inf): log-uniform ends in [1e-6, 1e3], plus [1e-6, 1e3] itself, narrow
    ones near 1e-6, and degenerate ones."""
    a = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 9 - 6)
    b = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 9 - 6)
    l, u = torch.minimum(a, b), torch.maximum(a, b)
    near = torch.tensor([1e-6, 2e-6, 1e-5, 1e-3, 0.5, 1.0, 7.0, 1e3], dtype=torch.float64)
    l = torch.cat([l, torch.tensor([1e-6, 1e-6, 1e-3]), near, near, near])
    u = torch.cat([u, torch.tensor([1e3, 1.0, 1e3]), near * (1 + 1e-7), near * 1.5, near])
    return l, u


def _intervals(domain, dtype, n=400):
    g = torch.Generator().manual_seed(0)
    if domain == "R":
        c = torch.rand(n, generator=g, dtype=torch.float64) * 16 - 8
        w = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 10
        l, u = c - w / 2, c + w / 2
        # across 0 (lopsided, symmetric), at 0, very wide, degenerate
        l = torch.cat([l, torch.tensor([-1.0, -0.1, -3.0, 0.0, -1e-6, -50.0, 0.0, 0.3, -2.0])])
        u = torch.cat([u, torch.tensor([1.0, 2.0, 0.2, 1.0, 1e-6, 40.0, 0.0, 0.3, -2.0])])
    else:
        l, u = _positive(g, n)
        if domain == "nonneg":   # the domain's edge itself
            l = torch.cat([l, torch.zeros(5, dtype=torch.float64)])
            u = torch.cat([u, torch.tensor([0.0, 1e-12, 1e-6, 1.0, 1e3], dtype=torch.float64)])
        elif domain == "nonzero":   # both sides of 0
            l, u = torch.cat([l, -u]), torch.cat([u, -l])
    return l.to(dtype), u.to(dtype)


def _grid(l, u, dtype, n=1001):
    """Points of every ``[l_i, u_i]``: a linear grid, and a geometric one where the interval is
    one-signed (the curvature of 1/x, log... sits near the end closest to 0): [n', m]."""
    l64, u64 = l.double(), u.double()
    t = torch.linspace(0, 1, n, dtype=torch.float64).unsqueeze(1)
    lin = l64 + t * (u64 - l64)
    a, b = torch.minimum(l64.abs(), u64.abs()), torch.maximum(l64.abs(), u64.abs())
    one_sided = (l64 > 0) | (u64 < 0)
    sign = torch.where(u64 < 0, -1.0, 1.0).to(torch.float64)
    ratio = torch.where(one_sided, b / torch.where(one_sided, a, 1.0), 1.0)
    geo = sign * torch.where(one_sided, a, 1.0) * ratio ** t
    geo = torch.where(one_sided, geo, lin)
    x = torch.cat([lin, geo]).to(dtype)   # as the graph holds them
    return torch.minimum(torch.maximum(x, l), u)


def _check_lines(rule, node, l, u, kl, bl, ku, bu, dtype):
    x = _grid(l, u, dtype)
    y = rule.f(node, x).double()    # the function as torch computes it in the graph's dtype
    xd = x.double()
    assert bool(torch.isfinite(y).all())
    lo = kl.double() * xd + bl.double()
    up = ku.double() * xd + bu.double()
    bad_l, bad_u = lo > y, y > up
    assert not bool(bad_l.any()), f"a lower line cut f at {xd[bad_l][:3]} ({(lo - y).max()})"
    assert not bool(bad_u.any()), f"an upper line cut f at {xd[bad_u][:3]} ({(y - up).max()})"
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,params,domain", CASES, ids=IDS)
def test_lines_and_interval_hold_on_dense_grids(op, params, domain, dtype):
    rule = RULES[op]
    l, u = _intervals(domain, dtype)
    node = Node("a", op, ["x"], (l.numel(),), dict(params))
    L, U = l.unsqueeze(0), u.unsqueeze(0)
    kl, bl, ku, bu = rule.relax(node, L, U)
    for t in (kl, bl, ku, bu):
        assert t.dtype == dtype and bool(torch.isfinite(t).all())
    _, y = _check_lines(rule, node, L, U, kl, bl, ku, bu, dtype)
    iv = rule.interval(node, [Interval(L, U)])
    assert bool((iv.lower.double() <= y).all() and (y <= iv.upper.double()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,params,domain", CASES, ids=IDS)
def test_random_tangent_points_stay_sound(op, params, domain, dtype):
    """alpha-CROWN's lines: every tau in [0, 1] (the ends included) gives lines that hold."""
    rule = RULES[op]
    l, u = _intervals(domain, dtype)
    node = Node("a", op, ["x"], (l.numel(),), dict(params))
    x = Interval(l.unsqueeze(0), u.unsqueeze(0))
    got = rule.alpha_init(node, [x], 1, 3, dtype)
    if params.get("exponent") in (0.0, 1.0):
        assert got is None   # linear: no freedom
        return
    assert got is not None
    init, lo, hi = got
    assert init.shape == (1, 3, l.numel()) and lo == 0.0 and hi == 1.0
    assert bool(((init >= 0) & (init <= 1)).all())
    # the initial point reproduces CROWN's lines (up to the widening)
    kl0, bl0, ku0, bu0 = rule.relax(node, x.lower, x.upper)
    kl, bl, ku, bu = rule._lines(node, x, init)
    free = rule.tangent_ranges(node, x)[0]
    mid = (x.lower + x.upper) / 2
    for k, b, k0, b0 in ((kl, bl, kl0, bl0), (ku, bu, ku0, bu0)):
        v, v0 = (k[0, 0] * mid[0] + b[0, 0]).double(), (k0[0] * mid[0] + b0[0]).double()
        scale = 1 + v0.abs() + k0[0].double().abs() * torch.maximum(x.lower.abs(), x.upper.abs())[0]
        tol = (1e-4 if dtype == torch.float32 else 1e-9) * scale
        assert bool(((v - v0).abs() <= tol)[free[0] & (x.upper[0] - x.lower[0] > 1e-3)].all())
    g = torch.Generator().manual_seed(1)
    tau = torch.rand((1, 3, l.numel()), generator=g, dtype=torch.float64)
    tau[:, 0], tau[:, 1] = 0.0, 1.0
    kl, bl, ku, bu = rule._lines(node, x, tau.to(dtype))
    for s in range(3):
        _check_lines(rule, node, x.lower, x.upper, kl[:, s], bl[:, s], ku[:, s], bu[:, s], dtype)


@pytest.mark.parametrize("op,params,domain", CASES, ids=IDS)
def test_lines_are_tight_on_narrow_intervals(op, params, domain):
    """Not just sound: on [c - w, c + w] the two lines are within O(w^2) of each other."""
    rule = RULES[op]
    c = torch.linspace(0.5, 5, 40, dtype=torch.float64).unsqueeze(0)
    if domain == "R":
        c = torch.cat([c, -c], 1)
    node = Node("a", op, ["x"], tuple(c.shape[1:]), dict(params))
    w = 1e-3
    kl, bl, ku, bu = rule.relax(node, c - w, c + w)
    gap = (ku - kl) * c + (bu - bl)
    # f'' (w^2 / 2) bounds the chord's distance to f: 4x that, with a floor for rounding
    d2 = (rule.df(node, c + 1e-4) - rule.df(node, c - 1e-4)).abs() / 2e-4
    assert bool((gap <= 2 * d2 * w * w + 1e-9 * (1 + rule.f(node, c).abs())).all())


def test_square_of_a_straddling_interval_keeps_a_floor_of_zero():
    """x^2 and sqrt are >= 0 exactly: the interval's lower end is never below 0 (var + eps
    stays positive in a LayerNorm)."""
    for op, params in (("pow", {"exponent": 2.0}), ("pow", {"exponent": 4.0}), ("sqrt", {}),
                       ("rsqrt", {}), ("pow", {"exponent": -2.0})):
        node = Node("a", op, ["x"], (3,), params)
        l = torch.tensor([[-1.0, 0.0, 1e-3]]) if op == "pow" and params["exponent"] > 0 \
            else torch.tensor([[1e-6, 1e-3, 2.0]])
        iv = RULES[op].interval(node, [Interval(l, l + 1.0)])
        assert bool((iv.lower >= 0).all()), (op, iv.lower)


@pytest.mark.parametrize("op,params,l,u", [
    ("log", {}, 0.0, 1.0), ("log", {}, -1.0, 2.0), ("rsqrt", {}, -1e-3, 1.0),
    ("reciprocal", {}, -0.5, 0.5), ("reciprocal", {}, 0.0, 1.0), ("sqrt", {}, -1e-7, 1.0),
    ("pow", {"exponent": 0.5}, -2.0, -1.0), ("pow", {"exponent": -1.0}, -1.0, 0.0),
    ("pow", {"exponent": -0.5}, 0.0, 3.0), ("log", {}, float("nan"), 1.0)])
def test_a_bad_domain_raises_a_typed_error_naming_the_node(op, params, l, u):
    rule = RULES[op]
    node = Node("blk/norm", op, ["x"], (3,), dict(params))
    L = torch.tensor([[1.0, l, 2.0]])
    U = torch.tensor([[2.0, u, 3.0]])
    for ask in (lambda: rule.interval(node, [Interval(L, U)]), lambda: rule.relax(node, L, U),
                lambda: rule.alpha_init(node, [Interval(L, U)], 1, 1, L.dtype)):
        with pytest.raises(DomainError) as e:
            ask()
        msg = str(e.value)
        assert "'blk/norm'" in msg and op in msg and "1 of 3" in msg
        if not math.isnan(l):
            assert f"[{l:.6g}, {u:.6g}]" in msg
        assert e.value.node == "blk/norm"


def test_reciprocal_overflowing_float32_is_a_domain_error():
    node = Node("r", "reciprocal", ["x"], (1,), {})
    with pytest.raises(DomainError, match="overflow"):
        RULES["reciprocal"].interval(node, [Interval(torch.tensor([[1e-40]]), torch.tensor([[1.0]]))])


# --- whole models ------------------------------------------------------------------------------
class _Rsqrt(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.rsqrt(F.softplus(self.fc1(x)) + 0.1))


class _Ratio(nn.Module):
    """x / y of two positive branches, constant / y, and log."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        p = torch.exp(0.5 * self.a(x))
        q = F.softplus(self.b(x)) + 0.5
        return self.c(p / q + 2.0 / q + torch.log(p + q) - torch.div(self.a(x), q))


class _Powers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        pos = torch.sigmoid(h) + 0.2
        out = h ** 2 + 0.3 * torch.pow(h, 3) + pos.pow(-1) + torch.sqrt(pos) + pos ** 0.5
        return self.b(out + torch.square(h) + torch.reciprocal(pos) + pos ** -1.5 + pos ** 2.5)


@pytest.mark.parametrize("make,shape,eps", [(_Rsqrt, (4,), 0.4), (_Ratio, (4,), 0.3),
                                            (_Powers, (3,), 0.3)])
def test_models_are_sound_under_every_method(make, shape, eps):
    torch.manual_seed(0)
    bm = BoundedModel(make(), input_shape=shape, dtype=torch.float64)
    check_sound(bm, linf(torch.randn(3, *shape), eps),
                methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


def test_alpha_crown_tightens_a_convex_domain_op():
    """alpha-CROWN's tangent points are used: bounds at least as tight as CROWN's, strictly
    tighter somewhere on a model whose output is a sum of rsqrt and log terms."""
    torch.manual_seed(1)
    net = _Rsqrt()
    bm = BoundedModel(net, input_shape=(4,), dtype=torch.float64)
    p = linf(torch.randn(4, 4), 0.5)
    c = bm.bounds(p, method="crown")
    a = bm.bounds(p, method="alpha-crown")
    assert bool((a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all())
    assert float((a.upper - a.lower).sum()) < float((c.upper - c.lower).sum()) * 0.999


def test_alpha_crown_is_finite_at_the_domain_edge():
    """Inputs that start at 0 exactly (after a ReLU): sqrt, x^0.3, x^1.5 have an infinite f'
    or f'' there; the tangent points stay off it, so alpha-CROWN's gradients stay finite and
    its bounds are finite and no looser than CROWN's."""
    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            r = torch.relu(self.a(x))
            return self.b(torch.sqrt(r) + r ** 0.3 + r ** 1.5)

    torch.manual_seed(10)
    bm = BoundedModel(Edge(), input_shape=(3,), dtype=torch.float64)
    p = linf(torch.randn(3, 3), 0.5)
    c, a = bm.bounds(p, method="crown"), bm.bounds(p, method="alpha-crown")
    assert bool(torch.isfinite(a.lower).all() and torch.isfinite(a.upper).all())
    assert bool((a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all())
    check_sound(bm, p, methods=("ibp", "crown", "alpha-crown"))


def test_float32_model_is_sound():
    torch.manual_seed(2)
    check_sound(BoundedModel(_Ratio(), input_shape=(4,)), linf(torch.randn(3, 4), 0.2),
                methods=("ibp", "crown"))


def test_a_model_leaving_the_domain_names_the_node():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.log(self.fc(x) + 5.0)

    torch.manual_seed(3)
    bm = BoundedModel(Bad(), input_shape=(3,))
    x = torch.zeros(1, 3)
    bm.bounds(linf(x, 0.01), method="crown")       # inside the domain: fine
    for method in ("ibp", "crown", "alpha-crown"):
        with pytest.raises(DomainError, match=r"node 'log' \(log\)"):
            bm.bounds(linf(x, 100.0), method=method)


# --- mappings ----------------------------------------------------------------------------------
def test_torch_forms_map_to_the_rules():
    class Forms(nn.Module):
        def forward(self, x):
            h = x + 3.0
            return (h ** 2 + torch.pow(h, 3) + h.pow(0.5) + torch.square(h) + h.square()
                    + torch.sqrt(h) + h.sqrt() + torch.rsqrt(h) + h.rsqrt() + torch.reciprocal(h)
                    + h.reciprocal() + torch.log(h) + h.log() + h / (h + 1) + 1.0 / h
                    + torch.div(2.0, h) + h.__pow__(-2))

    bm = BoundedModel(Forms(), input_shape=(2,), dtype=torch.float64)
    ops = [n.op for n in bm.graph]
    assert ops.count("pow") == 6 and ops.count("sqrt") == 2 and ops.count("rsqrt") == 2
    assert ops.count("reciprocal") == 2 + 3 and ops.count("log") == 2 and ops.count("mul") == 1
    exps = sorted(n.params["exponent"] for n in bm.graph if n.op == "pow")
    assert exps == [-2.0, 0.5, 2.0, 2.0, 2.0, 3.0]
    x = torch.rand(5, 2, dtype=torch.float64)
    assert torch.allclose(bm.graph_forward(x), Forms()(x))
    check_sound(bm, linf(torch.rand(2, 2), 0.5), methods=("ibp", "crown"))


def test_a_perturbed_exponent_is_reported():
    class P(nn.Module):
        def forward(self, x):
            return x ** x + 2.0 ** x + torch.pow(x, torch.ones(2))

    with pytest.raises(UnsupportedOpsError) as e:
        BoundedModel(P(), input_shape=(2,))
    msg = str(e.value)
    assert msg.count("perturbed exponent") == 2 and "exponent tensor of shape [2]" in msg


# --- PReLU and GELU's tanh form ----------------------------------------------------------------
PRELU_SLOPES = [-0.5, 0.0, 0.25, 1.0, 1.5, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,params", [
    ("prelu", {"weight": torch.tensor(PRELU_SLOPES).repeat_interleave(70)}),
    ("prelu", {"weight": torch.tensor([0.2])}),
    ("gelu", {"approximate": "tanh"})], ids=["prelu_channels", "prelu_one", "gelu_tanh"])
def test_prelu_and_gelu_tanh_lines_hold_with_random_alpha(op, params, dtype):
    rule = RULES[op]
    g = torch.Generator().manual_seed(0)
    c = torch.rand(420, generator=g, dtype=torch.float64) * 16 - 8
    w = torch.rand(420, generator=g, dtype=torch.float64) ** 3 * 10
    c[::7], w[::11] = 0.0, 0.0   # across 0 symmetrically, and degenerate
    l, u = (c - w / 2).to(dtype).unsqueeze(0), (c + w / 2).to(dtype).unsqueeze(0)
    params = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    node = Node("a", op, ["x"], (420,), params)
    kl, bl, ku, bu = rule.relax(node, l, u)
    _, y = _check_lines(rule, node, l, u, kl, bl, ku, bu, dtype)
    iv = rule.interval(node, [Interval(l, u)])
    assert bool((iv.lower.double() <= y).all() and (y <= iv.upper.double()).all())
    if op == "gelu":
        # the tanh form is not the erf form: the same intervals, other values
        assert not torch.allclose(rule.f(node, l), RULES["gelu"].f(Node("b", "gelu", [], (420,), {}), l))
        return
    x = Interval(l, u)
    init, lo, hi = rule.alpha_init(node, [x], 1, 3, dtype)
    assert init.shape == (1, 3, 420) and (lo, hi) == (0.0, 1.0)
    tau = torch.rand((1, 3, 420), generator=g, dtype=torch.float64).to(dtype)
    tau[:, 0], tau[:, 1] = 0.0, 1.0
    kl, bl, ku, bu = rule._lines(node, x, tau)
    for s in range(3):
        _check_lines(rule, node, l, u, kl[:, s], bl[:, s], ku[:, s], bu[:, s], dtype)


def test_prelu_crown_lines_are_relus_where_the_slope_is_zero():
    """With a = 0 on [-1, 3], CROWN's lines are ReLU's (an independent reference): the chord
    0.75 (x + 1) above, x below (u > -l)."""
    node = Node("a", "prelu", ["x"], (1,), {"weight": torch.tensor([0.0], dtype=torch.float64)})
    kl, bl, ku, bu = RULES["prelu"].relax(node, torch.tensor([[-1.0]], dtype=torch.float64),
                                          torch.tensor([[3.0]], dtype=torch.float64))
    assert torch.allclose(torch.cat([kl, bl, ku, bu]).flatten(),
                          torch.tensor([1.0, 0.0, 0.75, 0.75], dtype=torch.float64), atol=1e-12)


class _PreluGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.p1 = nn.PReLU(3)
        self.fc1, self.fc2 = nn.Linear(3 * 5 * 5, 8), nn.Linear(8, 3)
        self.p2 = nn.PReLU()
        with torch.no_grad():
            self.p1.weight.copy_(torch.tensor([-0.3, 0.4, 2.0]))

    def forward(self, x):
        h = self.p1(self.c1(x)).flatten(1)
        h = F.gelu(self.fc1(h), approximate="tanh")
        return self.fc2(self.p2(h) + F.prelu(h, torch.tensor([1.7])))


def test_prelu_and_gelu_tanh_model_is_sound_under_every_method():
    torch.manual_seed(4)
    bm = BoundedModel(_PreluGelu(), input_shape=(1, 5, 5), dtype=torch.float64)
    ops = [n.op for n in bm.graph]
    assert ops.count("prelu") == 3
    assert [n.params for n in bm.graph if n.op == "gelu"] == [{"approximate": "tanh"}]
    check_sound(bm, linf(torch.rand(2, 1, 5, 5), 0.3),
                methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


def test_prelu_reads_its_live_slope():
    """Certified training reads the module's live slope (param_names), with its gradient."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    bm = BoundedModel(net, input_shape=(3,))
    node = next(n for n in bm.graph if n.op == "prelu")
    assert node.params["param_names"] == {"weight": ("1.weight", None)}
    params, used = RULES["prelu"].live_params(node, dict(net.named_parameters()),
                                              dict(net.named_modules()), None)
    assert used == {"1.weight"} and params["weight"] is not node.params["weight"]
    assert params["weight"].requires_grad
    with pytest.raises(Exception) as e:
        RULES["prelu"].lifted(node, "1.weight")
    assert "weight perturbation" in str(e.value)


def test_gelu_tanh_written_out_is_fused_and_sound():
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) by hand, with x * x * x and with pow."""
    class Hand(nn.Module):
        def __init__(self, cube):
            super().__init__()
            self.fc1, self.fc2, self.cube = nn.Linear(4, 6), nn.Linear(6, 2), cube

        def forward(self, x):
            h = self.fc1(x)
            h3 = h * (h * h) if self.cube else torch.pow(h, 3)
            g = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h3)))
            return self.fc2(g)

    for cube in (True, False):
        torch.manual_seed(6)
        net = Hand(cube)
        bm = BoundedModel(net, input_shape=(4,), dtype=torch.float64)
        ops = [n.op for n in bm.graph]
        assert "gelu" in ops and "tanh" not in ops and "pow" not in ops and "mul" not in ops, ops
        x = torch.randn(5, 4, dtype=torch.float64)
        ref = net.fc2(F.gelu(net.fc1(x.float()), approximate="tanh")).double()
        assert torch.allclose(bm.graph_forward(x), ref, atol=1e-5)
        check_sound(bm, linf(torch.randn(2, 4), 0.5), methods=("ibp", "crown", "alpha-crown"),
                    check_nodes=False)


def test_a_square_written_as_a_product_is_one_pow_node():
    class Sq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            return h * h

    torch.manual_seed(7)
    bm = BoundedModel(Sq(), input_shape=(3,), dtype=torch.float64)
    assert [n.op for n in bm.graph][-1] == "pow"
    x = torch.randn(2, 3)
    r = bm.bounds(linf(x, 1.0), method="crown")
    assert bool((r.lower >= 0).all())   # McCormick on two copies would go below 0
    check_sound(bm, linf(x, 1.0), methods=("ibp", "crown"))


# --- ONNX --------------------------------------------------------------------------------------
class _OnnxAll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.p1, self.p2 = nn.PReLU(6), nn.PReLU()
        self.out = nn.Linear(6, 3)
        with torch.no_grad():
            self.p1.weight.copy_(torch.linspace(-0.5, 2.0, 6))

    def forward(self, x):
        h = self.a(x)
        pos = F.softplus(self.b(x)) + 0.5
        y = (h ** 2 + torch.pow(h, 3) + torch.sqrt(pos) + pos ** 0.5 + torch.reciprocal(pos)
             + torch.log(pos) + h / pos + 2.0 / pos + pos ** -1.5)
        y = self.p1(y) + self.p2(h) + F.gelu(h, approximate="tanh")
        return self.out(y)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnx
    torch.manual_seed(8)
    net = _OnnxAll().eval()
    path = tmp_path_factory.mktemp("onnx") / "domain.onnx"
    torch.onnx.export(net, torch.zeros(1, 4), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Pow", "Sqrt", "Reciprocal", "Log", "Div", "PRelu", "Tanh"} <= ops, ops
    return path


def test_onnx_round_trip_matches_onnxruntime(exported):
    import numpy as np
    import onnxruntime as ort
    from verifier.model_io import load_model
    bm = load_model(str(exported))
    ops = [n.op for n in bm.graph]
    assert {"pow", "sqrt", "reciprocal", "log", "mul", "prelu", "gelu"} <= set(ops), ops
    assert "tanh" not in ops    # GELU's tanh form, fused
    x = torch.randn(7, 4)
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x.numpy().astype(np.float32)})[0]
    np.testing.assert_allclose(bm(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_onnx_bounds_are_sound(exported):
    from verifier.model_io import load_model
    bm = load_model(str(exported), dtype=torch.float64)
    check_sound(bm, linf(torch.randn(2, 4), 0.2), methods=("ibp", "crown", "alpha-crown"),
                check_nodes=False)


def test_cli_reports_a_domain_error_in_one_line(tmp_path, capsys):
    import numpy as np
    from verifier.cli import main

    class LogNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.log(self.fc(x) + 3.0)

    torch.manual_seed(9)
    path = tmp_path / "log.onnx"
    torch.onnx.export(LogNet().eval(), torch.zeros(1, 4), str(path), dynamo=False, opset_version=17)
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    threads = torch.get_num_threads()
    try:
        code = main(["bounds", str(path), "--input", str(tmp_path / "x.npy"), "--eps", "50",
                     "--method", "ibp"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: node ") and "(log)" in err and "x > 0" in err
    assert "Traceback" not in err
