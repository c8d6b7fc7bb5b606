"""Element-wise rules whose lines overflow the dtype: exp over an interval reaching past
float32's range has no finite upper line. The rule gives flat lines at its interval's ends (the
upper one +inf), and CROWN's backward counts 0 * inf as 0: bounds are never NaN, and stay sound
(a softmax over wildly loose logits bounds its probabilities by [0, 1])."""
from __future__ import annotations

import torch
import torch.nn as nn

from verifier import BoundedModel, LpBall
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES


def test_exp_lines_past_float32_range_are_flat_and_backward_has_no_nan():
    rule = RULES["exp"]
    node = Node("e", "exp", ["x"], (3,), {})
    l = torch.tensor([[0.0, -1.0, 1.0]])
    u = torch.tensor([[100.0, 1.0, 200.0]])
    kl, bl, ku, bu = rule.relax(node, l, u)
    assert float(ku[0, 0]) == 0 and float(bu[0, 0]) == float("inf")
    assert bool(torch.isfinite(kl).all() and torch.isfinite(bl).all())
    # the lower line stays below exp on the interval
    xs = torch.linspace(0, 1, 101).unsqueeze(1) * (u - l).double() + l.double()
    assert bool((kl.double() * xs + bl.double() <= torch.exp(xs) + 1e-6).all())
    A = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]])
    [(Al, Au)], b_l, b_u = rule.backward(node, A, A, [Interval(l, u)])
    for t in (Al, Au, b_l):
        assert not bool(torch.isnan(t).any())
    assert not bool(torch.isnan(b_u).any())
    assert float(b_u[0, 0]) == float("inf") and torch.isfinite(b_u[0, 1])


def test_softmax_over_huge_logits_gives_probabilities_not_nan():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Softmax(-1))
    with torch.no_grad():
        net[0].weight.mul_(500)
    bm = BoundedModel(net, input_shape=(4,))
    x = torch.randn(2, 4)
    for method in ("ibp", "crown", "alpha-crown"):
        res = bm.bounds(LpBall(x, 0.5), method)
        assert not bool(torch.isnan(res.lower).any() or torch.isnan(res.upper).any())
        p = net(x)
        assert bool((res.lower <= p + 1e-6).all() and (p <= res.upper + 1e-6).all())
        assert float(res.lower.min()) >= -1e-4 and float(res.upper.max()) <= 1 + 1e-4
