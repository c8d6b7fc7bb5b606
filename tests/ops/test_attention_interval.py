"""Softmax-weighted sums: attention's ``weights @ values`` where each row of weights is a
probability vector. The interval (``verifier.ops.bilinear.simplex_interval``) contains every value
at sampled feasible points, and it is exact: a brute-force search over the vertices of the
feasible weights reaches it. The lines (McCormick's, shifted by ``simplex_shift`` through
``sum_j a_j = 1``) hold at sampled points whose weights sum to 1, in float32 and float64, and
tighten CROWN's bounds of a softmax-attention model (sound by sampling and PGD)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel
from verifier import margin_spec
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES
import verifier.ops.bilinear as bilinear
from verifier.ops.bilinear import simplex_interval


def _case(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 2, -1)
    wa = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.2
    la, ua = (a - wa).clamp(min=0), (a + wa).clamp(max=1)
    v = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    wv = torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * 0.5
    return (la.to(dtype), ua.to(dtype)), ((v - wv).to(dtype), (v + wv).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_contains_every_feasible_point(seed, dtype):
    (la, ua), (lv, uv) = _case(seed, dtype)
    iv = simplex_interval(Interval(la, ua), Interval(lv, uv))
    g = torch.Generator().manual_seed(100 + seed)
    n = 4000
    # weights: Dirichlet samples kept where they lie in the box (plus the box's centre rescaled)
    a = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((n, 2, 3))
    ok = ((a >= la.double()) & (a <= ua.double())).all(-1)
    v = lv.double() + torch.rand(n, *lv.shape, generator=g, dtype=torch.float64) * (uv - lv).double()
    out = a @ v                                                   # [n, 2, 3, 5]
    inside = ok.unsqueeze(-1).expand_as(out)
    assert int(ok.sum()) > 50
    assert bool(((out >= iv.lower.double() - 1e-6) | ~inside).all())
    assert bool(((out <= iv.upper.double() + 1e-6) | ~inside).all())


def _vertices(la, ua):
    """The vertices of {la <= a <= ua, sum a = 1} (4 weights): all but one weight at an end."""
    out = []
    for free in range(4):
        for ends in itertools.product((0, 1), repeat=3):
            a = [0.0] * 4
            idx = [j for j in range(4) if j != free]
            for j, e in zip(idx, ends):
                a[j] = float(ua[j] if e else la[j])
            a[free] = 1 - sum(a[j] for j in idx)
            if la[free] - 1e-12 <= a[free] <= ua[free] + 1e-12:
                out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def test_is_exact():
    (la, ua), (lv, uv) = _case(7, torch.float64)
    iv = simplex_interval(Interval(la, ua), Interval(lv, uv))
    for b, i, k in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        V = _vertices(la[b, i], ua[b, i])
        hi = float((V @ uv[b, :, k]).max())
        lo = float((V @ lv[b, :, k]).min())
        assert abs(float(iv.upper[b, i, k]) - hi) < 1e-9
        assert abs(float(iv.lower[b, i, k]) - lo) < 1e-9


def test_inconsistent_weight_bounds_give_no_information():
    la = torch.full((1, 1, 3), 0.5, dtype=torch.float64)      # sum of lower bounds > 1
    ua = torch.ones(1, 1, 3, dtype=torch.float64)
    v = Interval(torch.zeros(1, 3, 2, dtype=torch.float64), torch.ones(1, 3, 2, dtype=torch.float64))
    iv = simplex_interval(Interval(la, ua), v)
    assert bool(torch.isinf(iv.lower).all() and torch.isinf(iv.upper).all())


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):                                   # [B, 5, 4]
        w = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2, dim=-1)
        return (w @ self.v(x)).flatten(1)


def test_attention_is_marked_and_sound():
    torch.manual_seed(0)
    bm = BoundedModel(_Attention(), input_shape=(5, 4))
    marked = [n for n in bm.graph if n.op == "einsum" and n.params.get("simplex")]
    assert len(marked) == 1
    x = torch.randn(2, 5, 4)
    check_sound(bm, linf(x, 0.3), methods=("ibp", "crown", "alpha-crown"))


def _weights_and_box(seed, n, dtype):
    """``n`` feasible weight tensors ``[n, B, h, i, j]`` (softmax rows) and the box around them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64) * 2
    noise = torch.randn(n, 2, 2, 3, 5, generator=g, dtype=torch.float64) * 0.3
    a = torch.softmax(base + noise, -1)
    a[: n // 8] = torch.softmax(base + 0.6 * noise[: n // 8].sign(), -1)   # far points
    return a, Interval(a.min(0).values.to(dtype), a.max(0).values.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_shifted_lines_hold_where_the_weights_sum_to_one(seed, dtype):
    n = 2000
    a, x = _weights_and_box(seed, n, dtype)
    g = torch.Generator().manual_seed(50 + seed)
    c = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) * 3     # values far from 0
    r = torch.rand(2, 2, 5, 4, generator=g, dtype=torch.float64) * 0.5
    y = Interval((c - r).to(dtype), (c + r).to(dtype))
    t = torch.rand(n, *c.shape, generator=g, dtype=torch.float64)
    t[: n // 2] = t[: n // 2].round()
    v = (c - r) + t * 2 * r
    node = Node("z", "einsum", ["a", "v"], (2, 3, 4),
                {"equation": "hij,hjk->hik", "in_shapes": ((2, 3, 5), (2, 5, 4)), "simplex": True})
    rule = RULES["einsum"]
    z = a @ v                                                       # [n, B, 2, 3, 4]
    S = 6
    A = torch.randn(2, S, 2, 3, 4, generator=g, dtype=torch.float64)
    A[:, :2] = A[:, :2].abs()            # rows of one sign: every line of a is used
    A[:, 2:4] = -A[:, 2:4].abs()
    A = A.to(dtype)

    def lin(parts, b, k):
        val = torch.as_tensor(b, dtype=torch.float64)
        for P, pts in zip(parts, (a, v)):
            val = val + (P[k].double().unsqueeze(0) * pts.unsqueeze(2)).flatten(3).sum(-1)
        return val

    spec = (A.double().unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1)    # [n, B, S]
    tol = (1e-10 if dtype == torch.float64 else 3e-5) * (1 + spec.abs().amax(0))
    for alpha in (None, "random"):
        al = None
        if alpha:
            u = torch.rand(2, 2, 2, S, 2, 3, 4, generator=g, dtype=torch.float64).to(dtype)
            al = (u[0], u[1])
        parts, bl, bu = rule.backward(node, A, A, [x, y], alpha=al)
        assert bool((lin(parts, bl, 0) <= spec + tol).all())
        assert bool((lin(parts, bu, 1) >= spec - tol).all())
    # the shift moved the lines: the plain McCormick lines differ
    plain = dict(node.params, simplex=False)
    p2, bl2, _ = rule.backward(Node("z", "einsum", ["a", "v"], (2, 3, 4), plain), A, A, [x, y])
    assert not torch.allclose(p2[0][0], parts[0][0])


def test_the_shift_tightens_crown_on_softmax_attention(monkeypatch):
    """Values far from 0 (a large bias): the coefficients of the weights are nearly equal across
    a row, and the shift removes most of them before the softmax's relaxation."""
    torch.manual_seed(0)
    net = _Attention()
    with torch.no_grad():
        net.v.bias.add_(torch.tensor([4.0, -3.0, 5.0]))
    for dtype in (torch.float32, torch.float64):
        bm = BoundedModel(net, input_shape=(5, 4), dtype=dtype)
        x = torch.randn(2, 5, 4)
        C = margin_spec([0, 1], 15, dtype=dtype)
        rep = check_sound(bm, linf(x, 0.1), spec=C, methods=("crown", "alpha-crown"))
        shifted = rep.results["crown"]
        with monkeypatch.context() as m:
            m.setattr(bilinear, "simplex_shift", lambda A, a: (A, A.new_zeros(A.shape[:2])))
            plain = bm.bounds(linf(x, 0.1), "crown", spec=C)
        gain = (shifted.lower - plain.lower).mean() + (plain.upper - shifted.upper).mean()
        assert float(gain) > 0.1 * float((plain.upper - plain.lower).mean()), float(gain)
