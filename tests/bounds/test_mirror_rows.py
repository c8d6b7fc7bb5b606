"""CROWN bounds only half of a softmax's pairwise differences (``BoundRule.mirror``): ``y_ji =
-y_ij`` exactly, so the other half's bounds are the negations. The pairs cover every off-diagonal
element once; the values really are negations at random points (float32 and float64, bit for
bit); the intermediate bounds equal those of the full pass (up to rounding) and the model stays
sound by sampling and PGD."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, margin_spec
from verifier.graph.nodes import Node
from verifier.ops import RULES


@pytest.mark.parametrize("in_shape,dim", [((5,), 0), ((3, 4), 1), ((4, 3), 0), ((2, 3, 4, 2), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partners_are_exact_negations_and_cover_every_pair(in_shape, dim, dtype):
    shape = in_shape[:dim + 1] + (in_shape[dim],) + in_shape[dim + 1:]
    node = Node("d", "pairdiff", ["x"], shape, {"dim": dim, "in_shape": in_shape})
    rule = RULES["pairdiff"]
    own, partner = rule.mirror(node)
    n = in_shape[dim]
    total = math.prod(shape)
    # every off-diagonal element exactly once, the diagonal never
    idx = torch.arange(total).view(shape)
    diag = idx.diagonal(dim1=dim, dim2=dim + 1).flatten()
    seen = torch.cat([own, partner, diag]).sort().values
    assert torch.equal(seen, torch.arange(total))
    assert own.numel() == partner.numel() == total // n * (n - 1) // 2
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e6):
        x = (torch.randn(3, *in_shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        y = rule.point(node, [x]).flatten(1)
        assert torch.equal(y[:, partner], -y[:, own])          # bit for bit


class SoftmaxAttention(nn.Module):
    """One head of softmax attention with a residual and a read-out."""

    def __init__(self, d=6, out=3):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(4 * d, out)

    def forward(self, x):                                        # [B, 4, d]
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2, dim=-1)
        return self.o((x + a @ self.v(x)).flatten(1))


def _model(dtype):
    torch.manual_seed(0)
    return BoundedModel(SoftmaxAttention(), input_shape=(4, 6), dtype=dtype)


def test_crown_bounds_equal_the_full_pass(monkeypatch):
    bm = _model(torch.float64)
    assert any(n.op == "pairdiff" for n in bm.graph)
    ball = linf(torch.randn(2, 4, 6, dtype=torch.float64), 0.05)
    C = margin_spec([0, 1], 3, dtype=torch.float64)
    half = bm.bounds(ball, "crown", spec=C)
    monkeypatch.setattr(type(RULES["pairdiff"]), "mirror", lambda self, node: None)
    full = bm.bounds(ball, "crown", spec=C)
    for name, iv in full.nodes.items():
        assert torch.allclose(half[name].lower, iv.lower, rtol=1e-9, atol=1e-9), name
        assert torch.allclose(half[name].upper, iv.upper, rtol=1e-9, atol=1e-9), name
    assert torch.allclose(half.lower, full.lower, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_attention_is_sound(dtype):
    bm = _model(dtype)
    x = torch.randn(2, 4, 6)
    rep = check_sound(bm, linf(x, 0.1), spec=margin_spec([0, 2], 3), pgd_steps=10, restarts=1,
                      methods=("crown",))
    diff = next(n.name for n in bm.graph if n.op == "pairdiff")
    iv = rep.results["crown"][diff]
    # the mirrored half is the negation of the bounded half
    own, partner = RULES["pairdiff"].mirror(bm.graph[diff])
    assert torch.equal(iv.lower.flatten(1)[:, partner], -iv.upper.flatten(1)[:, own])
