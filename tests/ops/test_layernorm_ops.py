"""LayerNorm's rules (``verifier.ops.layernorm``): the variance over dims and the normalized
product. Their intervals and lines hold at sampled points and vertices of random boxes (narrow,
wide, straddling 0, degenerate), in float32 and float64; the variance's lower bound is the
least variance over the box (checked against a brute-force minimum on small groups); the
normalized product's interval is within sqrt(n) however wide the box. The variance's bound from
CROWN's bounds of one direction of the centred input (``linear_refine``) never exceeds the least
variance over a box it is given exactly, and on a token model whose LayerNorm input varies
along a common direction (box least variance 0) it is strictly positive, below every sampled and
PGD-minimized variance, and tightens the output bounds (float32 and float64)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, margin_spec
from verifier.attack import pgd

from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES


def _boxes(B, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, *shape, generator=g, dtype=torch.float64) * 2
    w = torch.rand(B, *shape, generator=g, dtype=torch.float64) ** 2 * torch.tensor(
        [0.0, 0.01, 0.3, 3.0, 30.0], dtype=torch.float64).repeat(B // 5 + 1)[:B].view(B, *[1] * len(shape))
    return (c - w).to(dtype), (c + w).to(dtype)


def _points(l, u, n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, *l.shape, generator=g, dtype=torch.float64)
    t[: n // 4] = t[: n // 4].round()  # vertices
    return l.double() + t * (u.double() - l.double())


CASES = [((6,), (0,)), ((4, 5), (1,)), ((3, 4), (0, 1)), ((2, 3, 4), (1, 2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dims", CASES)
@pytest.mark.parametrize("keepdim", [True, False])
def test_variance_interval_and_lines_hold(shape, dims, keepdim, dtype):
    out = tuple(1 if i in dims else s for i, s in enumerate(shape)) if keepdim else \
        tuple(s for i, s in enumerate(shape) if i not in dims)
    node = Node("v", "variance", ["x"], out, {"dims": dims, "keepdim": keepdim, "in_shape": shape})
    rule = RULES["variance"]
    B = 10
    l, u = _boxes(B, shape, dtype, 0)
    x = Interval(l, u)
    iv = rule.interval(node, [x])
    pts = _points(l, u, 400, 1)
    tdims = tuple(d + 2 for d in dims)
    val = pts.var(dim=tdims, unbiased=False, keepdim=keepdim)
    assert bool((iv.lower.double() <= val).all()) and bool((val <= iv.upper.double()).all())
    g = torch.Generator().manual_seed(2)
    S = 3
    A = torch.randn(B, S, *out, generator=g, dtype=torch.float64).to(dtype)
    [(Al, Au)], bl, bu = rule.backward(node, A, A, [x])
    def dot(a, t):
        p = a.double().unsqueeze(0) * t.unsqueeze(2)
        return p.reshape(*p.shape[:3], -1).sum(-1)

    lin_l = dot(Al, pts) + bl.double()
    lin_u = dot(Au, pts) + bu.double()
    f = dot(A, val)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = 1 + f.abs()
    assert bool((lin_l <= f + tol * scale).all())
    assert bool((f <= lin_u + tol * scale).all())


def test_variance_lower_bound_is_the_least_variance_over_the_box():
    """Groups of 3: the least variance over the box by brute force on a fine grid (an upper
    estimate of the minimum); our bound is below it and within the grid's resolution."""
    node = Node("v", "variance", ["x"], (1,), {"dims": (0,), "keepdim": True, "in_shape": (3,)})
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        c = torch.randn(1, 3, generator=g, dtype=torch.float64)
        w = torch.rand(1, 3, generator=g, dtype=torch.float64)
        l, u = c - w, c + w
        lo = float(RULES["variance"].interval(node, [Interval(l, u)]).lower)
        axes = [torch.linspace(float(l[0, i]), float(u[0, i]), 61, dtype=torch.float64) for i in range(3)]
        grid = torch.cartesian_prod(*axes)
        best = float(grid.var(-1, unbiased=False).min())
        step = float((u - l).max()) / 60
        assert lo <= best + 1e-12
        assert lo >= best - 3 * step * math.sqrt(best + step) - 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dims", [((6,), (0,)), ((4, 5), (1,)), ((3, 4), (0, 1))])
def test_normalized_product_interval_holds_and_is_capped(shape, dims, dtype):
    kept = tuple(1 if i in dims else s for i, s in enumerate(shape))
    eps = 1e-5
    node = Node("y", "normalize", ["c", "r"], shape, {"dims": dims, "eps": eps,
                                                     "in_shapes": (shape, kept)})
    rule = RULES["normalize"]
    B = 10
    l, u = _boxes(B, shape, dtype, 4)
    pts = _points(l, u, 400, 5)
    tdims = tuple(d + 2 for d in dims)
    r = torch.rsqrt((pts ** 2).mean(tdims, keepdim=True) + eps)
    y = pts * r
    # r's own interval as the graph would give it (from the box of c)
    r_lo, r_hi = r.min(0).values, r.max(0).values
    c_iv, r_iv = Interval(l, u), Interval(r_lo.to(dtype) * 0.99, r_hi.to(dtype) * 1.01)
    iv = rule.interval(node, [c_iv, r_iv])
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert bool((iv.lower.double() <= y + tol).all()) and bool((y <= iv.upper.double() + tol).all())
    n = math.prod(shape[d] for d in dims)
    assert float(iv.upper.max()) <= math.sqrt(n) * (1 + 1e-4)
    assert float(iv.lower.min()) >= -math.sqrt(n) * (1 + 1e-4)
    # with r unknown beyond [0, 1/sqrt(eps)], the cap still holds
    wide = rule.interval(node, [c_iv, Interval(torch.zeros_like(r_iv.lower), torch.full_like(r_iv.upper, eps ** -0.5))])
    assert bool((wide.lower.double() <= y + tol).all()) and bool((y <= wide.upper.double() + tol).all())
    assert float(wide.upper.max()) <= math.sqrt(n) * (1 + 1e-4)


def _exact_linear(x: Interval):
    """``bound_linear`` for a node that is a leaf box: the exact range of ``C·x``."""
    def bound(i, C):
        Cd = C.double()
        lo = (Cd.clamp(min=0) * x.lower.double().unsqueeze(1) + Cd.clamp(max=0) * x.upper.double().unsqueeze(1))
        up = (Cd.clamp(min=0) * x.upper.double().unsqueeze(1) + Cd.clamp(max=0) * x.lower.double().unsqueeze(1))
        return lo.flatten(2).sum(-1).to(C.dtype), up.flatten(2).sum(-1).to(C.dtype)
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dims", CASES)
def test_variance_refinement_is_below_the_least_variance_over_the_box(shape, dims, dtype):
    node = Node("v", "variance", ["x"], tuple(1 if i in dims else s for i, s in enumerate(shape)),
                {"dims": dims, "keepdim": True, "in_shape": shape})
    rule = RULES["variance"]
    l, u = _boxes(10, shape, dtype, 6)
    x = Interval(l, u)
    ref = rule.interval(node, [x]).lower.double()      # the least variance over the box
    got = rule.linear_refine(node, [x], _exact_linear(x))
    assert got.lower.shape == ref.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert bool((got.lower.double() <= ref * (1 + tol) + tol).all())
    pts = _points(l, u, 400, 7)
    val = pts.var(dim=tuple(d + 2 for d in dims), unbiased=False, keepdim=True)
    assert bool((got.lower.double() <= val + tol).all())
    assert bool((got.lower > 0).any())   # narrow boxes far from constant: a positive bound


class _Tokens(nn.Module):
    """Tokens -> GELU -> a linear map whose outputs share one large common input (so each
    token's box holds a constant vector: the box's least variance is 0) -> LayerNorm -> mean
    over tokens -> head."""

    def __init__(self, d=8):
        super().__init__()
        self.fc, self.ln, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)
        with torch.no_grad():
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, 0] = 5.0                     # x_0 moves every feature together
            self.fc.bias.copy_(torch.linspace(-0.6, 0.6, d))

    def forward(self, x):                                  # [B, 4, d]
        h = self.fc(nn.functional.gelu(x))
        return self.head(self.ln(h).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_refinement_keeps_a_token_layernorm_away_from_zero(dtype, monkeypatch):
    torch.manual_seed(0)
    net = _Tokens().eval()
    bm = BoundedModel(net, input_shape=(4, 8), dtype=dtype)
    var = next(n.name for n in bm.graph if n.op == "variance")
    x = torch.randn(2, 4, 8) * 0.3
    ball = linf(x, 0.4)
    C = margin_spec([0, 1], 3, dtype=dtype)
    rep = check_sound(bm, ball, spec=C, methods=("ibp", "crown", "alpha-crown"))
    ibp, crown = rep.results["ibp"][var].lower, rep.results["crown"][var].lower
    assert bool((ibp <= 0.005).all())       # the box (nearly) holds a constant token
    assert float(crown.min()) > 0.1                      # the true least is about 0.15
    # every variance at sampled points and PGD minima lies above the bound
    x64 = x.double()
    g = torch.Generator().manual_seed(1)
    pts = (x64 + 0.4 * (2 * torch.rand(500, *x.shape, generator=g, dtype=torch.float64) - 1))
    pts[:100] = x64 + 0.4 * torch.sign(pts[:100] - x64)
    f = lambda z: net.double().fc(nn.functional.gelu(z)).var(-1, unbiased=False)  # noqa: E731
    atk = pgd(f, linf(x64, 0.4), -torch.eye(4, dtype=torch.float64), steps=30, restarts=2)
    with torch.no_grad():
        vals = torch.cat([f(pts.flatten(0, 1)).view(500, 2, 4),
                          f(atk.x.transpose(0, 1).flatten(0, 1)).view(4, 2, 4)])
    net.float()
    lb = crown.double().view(2, 4)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert bool((vals >= lb - tol).all()), float((lb - vals).max())
    # and it tightens the output: with the plain rule the bounds are looser
    monkeypatch.setattr(type(RULES["variance"]), "linear_refine", lambda self, *a: None)
    plain = bm.bounds(ball, "crown", spec=C)
    assert float((crown - plain[var].lower).min()) > 0.05
    assert float((rep.results["crown"].lower - plain.lower).mean()) > 0
