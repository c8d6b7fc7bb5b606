"""The interval of softmax-weighted sums (``verifier.ops.bilinear.simplex_interval``): attention's
``weights @ values`` where each row of weights is a probability vector. It contains every value
at sampled feasible points, and it is exact: a brute-force search over the vertices of the
feasible weights reaches it."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel
from verifier.bound_types import Interval
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
