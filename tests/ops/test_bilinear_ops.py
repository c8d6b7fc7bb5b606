"""Products of two perturbed tensors: the ``einsum`` rule (matmul / bmm / einsum, attention's
``Q K^T`` and ``scores V``) and the element-wise ``mul``, with their McCormick planes.

Rule level: the linear bounds hold at sampled points (corners and uniform points of each
operand's box, independently) of random boxes of every kind (sign-straddling, one-signed,
degenerate, very wide), for CROWN's planes and for plane mixes anywhere in [0, 1]; they are
exact where one operand is fixed (z is then linear); a mix of 1 moves the plane to the other
corner; the interval contains every sampled value and equals the term-by-term range computed
here by brute force. Models: check_sound (sampling + PGD) on attention toys, bmm, einsum,
broadcast and self products, element-wise products, with every method including alpha-CROWN,
which is never looser than CROWN and strictly tighter on purely bilinear models. The mapping
(torch and ONNX, against onnxruntime) and its reports.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, Box, LpBall, UnsupportedOpsError, margin_spec
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES
import verifier.ops.bilinear as bilinear

# (equation, x shape, y shape) per sample
EQUATIONS = [
    ("hij,hkj->hik", (2, 3, 4), (2, 5, 4)),   # Q K^T per head
    ("hik,hkj->hij", (2, 3, 5), (2, 5, 4)),   # scores V
    ("ij,jk->ik", (3, 4), (4, 2)),
    ("aij,ajk->aik", (1, 3, 4), (2, 4, 2)),   # a broadcast batch dim
    ("ij,k->ik", (3, 4), (5,)),               # j only in X (summed), k only in Y
    ("ij,jk->ki", (3, 2), (2, 4)),            # an output order other than the operands'
]
KINDS = ["straddle", "positive", "negative", "mixed", "degenerate_x", "degenerate_both", "wide",
         "centred"]


def _box(shape, B, kind, gen, dtype, degenerate=False):
    c = torch.randn((B, *shape), generator=gen, dtype=torch.float64)
    r = torch.rand((B, *shape), generator=gen, dtype=torch.float64)
    if kind == "positive":
        c = c.abs() + r + 0.1
    elif kind == "negative":
        c = -(c.abs() + r + 0.1)
    elif kind == "wide":
        c, r = c * 1e3, r * 1e3
    elif kind == "centred":
        c = torch.zeros_like(c)
    elif kind == "mixed":  # each element its own kind: straddling, one-signed or a point
        pick = torch.randint(0, 4, c.shape, generator=gen)
        c = torch.where(pick == 1, c.abs() + r, torch.where(pick == 2, -c.abs() - r, c))
        r = torch.where(pick == 3, torch.zeros_like(r), r)
    if degenerate:
        r = torch.zeros_like(r)
    return Interval((c - r).to(dtype), (c + r).to(dtype))


def _boxes(kind, sx, sy, B, gen, dtype):
    x = _box(sx, B, kind, gen, dtype, degenerate=kind in ("degenerate_x", "degenerate_both"))
    y = _box(sy, B, kind, gen, dtype, degenerate=kind == "degenerate_both")
    return x, y


def _sample(iv: Interval, n: int, gen) -> torch.Tensor:
    """``n`` points of the box: half random corners, half uniform: ``[n, B, *shape]``."""
    lo, up = iv.lower.double(), iv.upper.double()
    u = torch.rand((n, *lo.shape), generator=gen, dtype=torch.float64)
    u[: n // 2] = (u[: n // 2] < 0.5).double()
    return (lo + u * (up - lo)).clamp(lo, up)


def _einsum_node(eq, sx, sy, B):
    ins, out = eq.split("->")
    xs, ys = ins.split(",")
    z = torch.einsum(f"Z{xs},Z{ys}->Z{out}", torch.zeros(B, *sx), torch.zeros(B, *sy))
    return Node("z", "einsum", ["x", "y"], tuple(z.shape[1:]), {"equation": eq, "in_shapes": (sx, sy)})


def _reference(eq, X, Y):
    """z at sampled points in float64, with torch.einsum directly: ``[n, B, *out]``."""
    ins, out = eq.split("->")
    xs, ys = ins.split(",")
    return torch.einsum(f"NZ{xs},NZ{ys}->NZ{out}", X, Y)


def _linear(parts, b, X, Y, which):
    """``A_x·X + A_y·Y + bias`` at the points: ``[n, B, S]``."""
    ax, ay = parts[0][which], parts[1][which]
    val = torch.as_tensor(b, dtype=torch.float64)
    for a, P in ((ax, X), (ay, Y)):
        val = val + (a.double().unsqueeze(0) * P.unsqueeze(2)).flatten(3).sum(-1)
    return val


def _spec_values(A, Z):
    return (A.double().unsqueeze(0) * Z.unsqueeze(2)).flatten(3).sum(-1)


def _tol(A, iv, dtype):
    """A bound on the rounding of ``A·z`` in the graph's dtype: [B, S]."""
    mag = (A.double().abs() * torch.maximum(iv.lower.abs(), iv.upper.abs()).double().unsqueeze(1))
    rel = 1e-10 if dtype == torch.float64 else 2e-5
    return rel * (1 + mag.flatten(2).sum(-1) * 10)


def _alphas(a0, gen):
    """CROWN's start, then random mixes in [0, 1] with many entries at the two ends."""
    yield None
    yield (a0, a0)
    for _ in range(2):
        u = torch.rand((2, *a0.shape), generator=gen, dtype=torch.float64)
        u = torch.where(u < 0.25, 0.0, torch.where(u > 0.75, 1.0, u)).to(a0.dtype)
        yield (u[0], u[1])


def _check_rule(rule, node, x, y, X, Y, Z, dtype, gen, S=4):
    B = x.lower.shape[0]
    iv = rule.interval(node, [x, y])
    tol_iv = (1e-10 if dtype == torch.float64 else 2e-5) * (1 + Z.abs())
    assert bool((Z >= iv.lower.double() - tol_iv).all()), "a value below the interval"
    assert bool((Z <= iv.upper.double() + tol_iv).all()), "a value above the interval"
    A_l = torch.randn((B, S, *node.shape), generator=gen, dtype=torch.float64).to(dtype)
    A_u = torch.randn((B, S, *node.shape), generator=gen, dtype=torch.float64).to(dtype)
    init = rule.alpha_init(node, [x, y], B, S, dtype)
    if init is None:  # no freedom: one operand is a point everywhere
        assert bool((x.lower == x.upper).all() or (y.lower == y.upper).all())
        a0 = torch.zeros((2, B, S, *node.shape), dtype=dtype)
    else:
        a0, low, high = init
        assert (low, high) == (0.0, 1.0) and tuple(a0.shape) == (2, B, S, *node.shape)
    crown = None
    for alpha in _alphas(a0, gen):
        parts, bl, bu = rule.backward(node, A_l, A_u, [x, y], alpha=alpha)
        lo, up = _linear(parts, bl, X, Y, 0), _linear(parts, bu, X, Y, 1)
        vl, vu = _spec_values(A_l, Z), _spec_values(A_u, Z)
        assert bool((lo <= vl + _tol(A_l, iv, dtype)).all()), f"lower bound cut by {(lo - vl).max()}"
        assert bool((up >= vu - _tol(A_u, iv, dtype)).all()), f"upper bound cut by {(vu - up).max()}"
        if crown is None:
            crown = (parts, bl, bu)
        elif alpha[0] is a0:  # alpha's start gives CROWN's lines
            for (p0, p1) in zip(crown[0], parts):
                for t0, t1 in zip(p0, p1):
                    assert torch.allclose(t0, t1, rtol=1e-5, atol=1e-5)
            assert torch.allclose(crown[1], bl, rtol=1e-5, atol=1e-4)
        if bool((y.lower == y.upper).all()):  # z is linear in x: the planes are exact
            assert torch.allclose(lo, vl, rtol=1e-4, atol=1e-3 if dtype == torch.float32 else 1e-8)
            assert torch.allclose(up, vu, rtol=1e-4, atol=1e-3 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eq,sx,sy", EQUATIONS)
def test_einsum_lines_and_interval_hold_at_sampled_points(eq, sx, sy, kind, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{eq} {kind}".encode()))
    B = 2
    rule = RULES["einsum"]
    node = _einsum_node(eq, sx, sy, B)
    x, y = _boxes(kind, sx, sy, B, gen, dtype)
    X, Y = _sample(x, 96, gen), _sample(y, 96, gen)
    Z = _reference(eq, X, Y)
    _check_rule(rule, node, x, y, X, Y, Z, dtype, gen)
    monkeypatch.setattr(bilinear, "EXACT_TERMS", 0)   # the interval without forming the terms
    _check_rule(rule, node, x, y, X, Y, Z, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sx,sy", [((3, 4), (3, 4)), ((3, 4), (1, 4)), ((2, 1, 4), (3, 1))])
def test_mul_lines_and_interval_hold_at_sampled_points(sx, sy, kind, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{sx} {sy} {kind}".encode()))
    B = 2
    out = torch.broadcast_shapes(sx, sy)
    node = Node("z", "mul", ["x", "y"], tuple(out), {"in_shapes": (sx, sy)})
    x, y = _boxes(kind, sx, sy, B, gen, dtype)
    X, Y = _sample(x, 96, gen), _sample(y, 96, gen)
    def aligned(P, shape):
        return P.view(*P.shape[:2], *[1] * (len(out) - len(shape)), *shape)
    _check_rule(RULES["mul"], node, x, y, X, Y, aligned(X, sx) * aligned(Y, sy), dtype, gen)


def _one_term_case(op):
    """Each output element one product x·y, over boxes of positive width: -> (node, x, y,
    corner values of the operands as functions of (x corner, y corner))."""
    lx = torch.tensor([[[-1.0], [0.5], [-2.0]]], dtype=torch.float64)     # [1, 3, 1]
    ux = torch.tensor([[[2.0], [1.5], [-0.5]]], dtype=torch.float64)
    ly = torch.tensor([[[-3.0, 0.2]]], dtype=torch.float64)               # [1, 1, 2]
    uy = torch.tensor([[[1.0, 4.0]]], dtype=torch.float64)
    if op == "einsum":
        node = Node("z", "einsum", ["x", "y"], (3, 2), {"equation": "ij,jk->ik",
                                                          "in_shapes": ((3, 1), (1, 2))})
        x, y = Interval(lx, ux), Interval(ly, uy)
    else:
        node = Node("z", "mul", ["x", "y"], (3, 2), {"in_shapes": ((3, 1), (1, 2))})
        x, y = Interval(lx, ux), Interval(ly[0].unsqueeze(0), uy[0].unsqueeze(0))
    return node, x, y


@pytest.mark.parametrize("op", ["einsum", "mul"])
def test_the_mix_moves_each_plane_to_the_other_corner(op):
    """With one product per output element and one-hot rows of A: the lower plane with mix 0
    is exact at (lx, ly) and below by (ux - lx)(uy - ly) at (ux, uy); with mix 1 the reverse.
    The upper plane with mix 0 is exact at (lx, uy), with mix 1 at (ux, ly)."""
    node, x, y = _one_term_case(op)
    rule = RULES[op]
    A = torch.eye(6, dtype=torch.float64).view(1, 6, 3, 2)
    gap = ((x.upper - x.lower) * (y.upper - y.lower)).reshape(1, 6)

    def bound(m_lower, m_upper, cx, cy, upper):
        mix = torch.stack([torch.full((1, 6, 3, 2), m_lower), torch.full((1, 6, 3, 2), m_upper)])
        mix = mix.to(torch.float64)
        parts, bl, bu = rule.backward(node, A, A, [x, y], alpha=(mix, mix))
        k = 1 if upper else 0
        X, Y = cx.unsqueeze(0), cy.unsqueeze(0)
        return _linear(parts, bu if upper else bl, X, Y, k)[0]

    def prod(cx, cy):
        return (cx * cy).reshape(1, 6)

    lx, ux, ly, uy = x.lower, x.upper, y.lower, y.upper
    assert torch.allclose(bound(0.0, 0.0, lx, ly, False), prod(lx, ly))
    assert torch.allclose(bound(0.0, 0.0, ux, uy, False), prod(ux, uy) - gap)
    assert torch.allclose(bound(1.0, 0.0, ux, uy, False), prod(ux, uy))
    assert torch.allclose(bound(1.0, 0.0, lx, ly, False), prod(lx, ly) - gap)
    assert torch.allclose(bound(0.0, 0.0, lx, uy, True), prod(lx, uy))
    assert torch.allclose(bound(0.0, 0.0, ux, ly, True), prod(ux, ly) + gap)
    assert torch.allclose(bound(0.0, 1.0, ux, ly, True), prod(ux, ly))
    assert torch.allclose(bound(0.0, 1.0, lx, uy, True), prod(lx, uy) + gap)
    # halfway: half the gap at both corners
    assert torch.allclose(bound(0.5, 0.0, ux, uy, False), prod(ux, uy) - gap / 2)


@pytest.mark.parametrize("kind", KINDS)
def test_einsum_interval_is_the_term_by_term_range(kind, monkeypatch):
    """Q K^T: each term's range from its four corners, summed (brute force here); without
    forming the terms, a superset that is never looser than centre-radius arithmetic and
    exact where both operands keep one sign."""
    gen = torch.Generator().manual_seed(7)
    eq, sx, sy = EQUATIONS[0]
    x, y = _boxes(kind, sx, sy, 2, gen, torch.float64)
    node = _einsum_node(eq, sx, sy, 2)
    lx, ux = x.lower[:, :, :, None, :], x.upper[:, :, :, None, :]     # [B, h, i, 1, j]
    ly, uy = y.lower[:, :, None, :, :], y.upper[:, :, None, :, :]     # [B, h, 1, k, j]
    corners = torch.stack([lx * ly, lx * uy, ux * ly, ux * uy])
    exact = Interval(corners.min(0).values.sum(-1), corners.max(0).values.sum(-1))
    got = RULES["einsum"].interval(node, [x, y])
    assert torch.allclose(got.lower, exact.lower) and torch.allclose(got.upper, exact.upper)
    monkeypatch.setattr(bilinear, "EXACT_TERMS", 0)
    fact = RULES["einsum"].interval(node, [x, y])
    assert bool((fact.lower <= exact.lower + 1e-9).all() and (fact.upper >= exact.upper - 1e-9).all())
    cx, rx, cy, ry = x.center, x.radius, y.center, y.radius
    e = lambda a, b: torch.einsum("bhij,bhkj->bhik", a, b)  # noqa: E731
    mid, rad = e(cx, cy), e(cx.abs(), ry) + e(rx, cy.abs()) + e(rx, ry)
    assert bool((fact.lower >= mid - rad - 1e-9).all() and (fact.upper <= mid + rad + 1e-9).all())
    if kind in ("positive", "negative", "degenerate_x", "degenerate_both"):
        assert torch.allclose(fact.lower, exact.lower) and torch.allclose(fact.upper, exact.upper)


def test_backward_never_forms_the_terms_of_all_spec_rows(monkeypatch):
    """Every einsum the rule runs in backward returns at most one spec row's worth of an
    operand or of the output per row: no [S, i, j, k] tensor."""
    eq, sx, sy = "hij,hkj->hik", (2, 4, 8), (2, 4, 8)
    B, S = 1, 64
    node = _einsum_node(eq, sx, sy, B)
    gen = torch.Generator().manual_seed(0)
    x, y = _boxes("straddle", sx, sy, B, gen, torch.float64)
    A = torch.randn((B, S, *node.shape), generator=gen, dtype=torch.float64)
    sizes = []
    real = torch.einsum

    def spy(*args):
        out = real(*args)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "einsum", spy)
    rule = RULES["einsum"]
    a0 = rule.alpha_init(node, [x, y], B, S, torch.float64)[0]
    rule.backward(node, A, A, [x, y], alpha=(a0, a0))
    widest = B * S * max(math.prod(sx), math.prod(sy), math.prod(node.shape))
    assert sizes and max(sizes) <= widest, (max(sizes), widest)


# --- whole models -----------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with ReLU in place of softmax, then a dense read-out."""

    def __init__(self, n=4, d=6, heads=2, out=3):
        super().__init__()
        self.h, self.scale = heads, 1 / math.sqrt(d // heads)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(n * d, out)

    def forward(self, x):                                        # [B, n, d]
        B, n, d = x.shape
        q = self.q(x).view(B, n, self.h, d // self.h).transpose(1, 2)   # [B, h, n, dh]
        k = self.k(x).view(B, n, self.h, d // self.h).transpose(1, 2)
        v = self.v(x).view(B, n, self.h, d // self.h).transpose(1, 2)
        scores = torch.relu(q @ k.transpose(-1, -2) * self.scale)
        o = torch.matmul(scores, v).transpose(1, 2).reshape(B, n, d)
        return self.o(o.flatten(1))


class Bmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(16, 3)

    def forward(self, x):                                        # [B, 4, 5]
        s = torch.bmm(self.a(x), self.b(x).transpose(1, 2))      # [B, 4, 4]
        return self.o(torch.tanh(s).flatten(1))


class Einsums(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(16, 3)

    def forward(self, x):                                        # [B, 4, 5]
        qa, kb = self.a(x), self.b(x)
        s = torch.einsum("bij,bkj->bik", qa, kb)
        t = torch.einsum("...ij,...kj", [kb, torch.relu(qa)])     # implicit output: ...ik
        u = torch.einsum("bij,bk->bik", qa, kb[:, 0])[:, :, :4]  # j only in qa, summed
        return self.o((s + t - u).flatten(1))


class Broadcast(nn.Module):
    """[B, 1, n, d] @ [B, h, d, n] (batch dims broadcast), x @ x^T of one node, Tensor.matmul."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(3, 3), nn.Linear(3, 6), nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):                                        # [B, 4, 3]
        q = self.a(x).unsqueeze(1)                               # [B, 1, 4, 3]
        k = self.b(x).view(x.shape[0], 4, 2, 3).permute(0, 2, 3, 1)   # [B, 2, 3, 4]
        s = q @ k                                                # [B, 2, 4, 4]
        g = q.matmul(q.transpose(-1, -2))                        # [B, 1, 4, 4], one node twice
        return self.o((s - g).flatten(1))


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.o(self.a(x) * torch.relu(self.b(x)))


MODELS = {
    "attention": (Attention, (4, 6), 0.05),
    "bmm": (Bmm, (4, 5), 0.05),
    "einsum": (Einsums, (4, 5), 0.05),
    "broadcast": (Broadcast, (4, 3), 0.1),
    "products": (Products, (5,), 0.2),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_are_sound_with_every_method(name):
    make, shape, eps = MODELS[name]
    torch.manual_seed(0)
    bm = BoundedModel(make(), input_shape=shape, dtype=torch.float64)
    assert name == "products" or any(n.op == "einsum" for n in bm.graph)
    x = torch.randn(2, *shape)
    n_out = bm.output_shape[0]
    for spec in (None, margin_spec([0, 1], n_out, dtype=torch.float64)):
        rep = check_sound(bm, linf(x, eps), spec=spec, pgd_steps=10, restarts=1,
                          methods=("ibp", "crown", "crown-ibp", "alpha-crown"))
        a, c = rep.results["alpha-crown"], rep.results["crown"]
        assert bool((a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all())


def test_attention_float32_and_l2_are_sound():
    torch.manual_seed(1)
    bm = BoundedModel(Attention(), input_shape=(4, 6))
    x = torch.randn(2, 4, 6)
    check_sound(bm, linf(x, 0.05), methods=("crown", "alpha-crown"), pgd_steps=10, restarts=1)
    check_sound(bm, LpBall(x, 0.2, 2), methods=("crown", "crown-ibp"), pgd_steps=10, restarts=1)


class Scores(nn.Module):
    """Only products of perturbed tensors (and linear maps): every alpha is a plane mix."""

    def __init__(self, elementwise=False):
        super().__init__()
        self.elementwise = elementwise
        self.q, self.k, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(24 if elementwise else 16, 3)

    def forward(self, x):                                        # [B, 4, 6]
        s = self.q(x) * self.k(x) if self.elementwise else self.q(x) @ self.k(x).transpose(-1, -2)
        return self.o(s.flatten(1))


@pytest.mark.parametrize("elementwise", [False, True])
def test_alpha_crown_mixes_the_planes_and_tightens_a_bilinear_model(elementwise):
    torch.manual_seed(0)
    bm = BoundedModel(Scores(elementwise), input_shape=(4, 6), dtype=torch.float64)
    ball = linf(torch.randn(2, 4, 6), 0.1)
    C = margin_spec([0, 2], 3, dtype=torch.float64)
    rep = check_sound(bm, ball, spec=C, methods=("crown", "alpha-crown"), pgd_steps=10, restarts=1)
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    assert bool((a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all())
    assert float((a.lower - c.lower).max()) > 1e-3   # the only free parameters are the mixes


def test_attention_alpha_crown_uses_the_plane_mixes(monkeypatch):
    """With ReLUs too: alpha-CROWN is tighter with the einsum's mixes than with ReLU slopes alone."""
    torch.manual_seed(0)
    bm = BoundedModel(Attention(), input_shape=(4, 6), dtype=torch.float64)
    ball = linf(torch.randn(2, 4, 6), 0.1)
    C = margin_spec([0, 1], 3, dtype=torch.float64)
    full = bm.bounds(ball, "alpha-crown", spec=C)
    monkeypatch.setattr(RULES["einsum"], "alpha_init", lambda *a, **k: None)
    relu_only = bm.bounds(ball, "alpha-crown", spec=C)
    assert float((full.lower - relu_only.lower).max()) > 1e-3


# --- mapping ------------------------------------------------------------------------------------
def test_every_spelling_maps_to_einsum_with_the_same_values():
    class Spellings(nn.Module):
        def forward(self, x):                                    # [B, 3, 4]
            t = x.transpose(1, 2)
            parts = [torch.matmul(x, t), x @ t, x.matmul(t), torch.bmm(x, t), x.bmm(t),
                     torch.einsum("bij,bkj->bik", x, x), torch.einsum("bij,bkj->bik", [x, x])]
            return torch.cat([p.flatten(1) for p in parts], 1)

    bm = BoundedModel(Spellings(), input_shape=(3, 4), dtype=torch.float64)
    assert sum(n.op == "einsum" for n in bm.graph) == 7
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.allclose(bm.graph_forward(x), Spellings()(x))


@pytest.mark.parametrize("fn,what", [
    (lambda x, y: torch.matmul(x[:, 0], y), "1-D operand"),
    (lambda x, y: torch.matmul(x, y.unsqueeze(1)), "different ranks"),
    (lambda x, y: torch.einsum("bij,jk->bik", x, torch.ones(4, 2)), "constant"),
    (lambda x, y: torch.einsum("bij,cjk->bcik", x, y), "batch dimension"),
    (lambda x, y: torch.einsum("bii,bij->bij", x[:, :, :3], x), "repeats an index"),
])
def test_unsupported_products_are_reported(fn, what):
    class M(nn.Module):
        def forward(self, x):                                    # [B, 3, 4]
            return fn(x, x.transpose(1, 2)[:, :, :3] * 2.0)

    with pytest.raises(UnsupportedOpsError, match=what):
        BoundedModel(M(), input_shape=(3, 4))


def test_onnx_attention_matches_onnxruntime_and_is_sound(tmp_path):
    from verifier.model_io import load_model
    torch.manual_seed(0)
    net = Attention().eval()
    path = tmp_path / "attention.onnx"
    torch.onnx.export(net, torch.zeros(1, 4, 6), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    bm = load_model(str(path), dtype=torch.float64)
    assert sum(n.op == "einsum" for n in bm.graph) == 2
    x = torch.randn(3, 4, 6)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
    got = bm.graph_forward(x.double()).numpy()
    assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()
    check_sound(bm, Box(x - 0.05, x + 0.05), methods=("ibp", "crown", "crown-ibp", "alpha-crown"),
                pgd_steps=10, restarts=1)
