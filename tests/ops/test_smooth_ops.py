"""The smooth element-wise rules (GELU, SiLU, Softplus, ELU, exp, abs, erf, hardtanh / ReLU6 /
clamp, hardsigmoid, hardswish; ``verifier.ops.smooth``): their lines
hold on dense grids of many intervals (narrow, wide, one-sided, across every breakpoint,
degenerate), their intervals contain every value, and whole models bounded with every method
contain sampled and PGD points (``check_sound``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES

CASES = [("silu", {}), ("gelu", {}), ("softplus", {"beta": 1.0, "threshold": 20.0}),
         ("softplus", {"beta": 3.0, "threshold": 5.0}), ("elu", {"alpha": 1.0}),
         ("elu", {"alpha": 0.3}), ("elu", {"alpha": 2.5}), ("exp", {}), ("abs", {}), ("erf", {}),
         ("hardtanh", {"min_val": -1.0, "max_val": 1.0}), ("hardtanh", {"min_val": 0.0, "max_val": 6.0}),
         ("hardtanh", {"min_val": 0.2, "max_val": float("inf")}),
         ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("hardsigmoid", {"alpha": 0.2, "beta": 0.5}),
         ("hardswish", {}), ("sin", {}), ("cos", {})]


def _intervals(dtype):
    """600 intervals: random centres and widths over [-8, 8], plus ones around each breakpoint
    and degenerate ones."""
    g = torch.Generator().manual_seed(0)
    c = torch.rand(500, generator=g, dtype=torch.float64) * 16 - 8
    w = torch.rand(500, generator=g, dtype=torch.float64) ** 3 * 10
    l, u = c - w / 2, c + w / 2
    extra_c = torch.tensor([-2.3994, 2.3994, -1.4142, 1.4142, 0.0, -3.0, 3.0, 1.0, -1.0, 6.0] * 9,
                           dtype=torch.float64)
    extra_w = torch.rand(90, generator=g, dtype=torch.float64) * 1.5
    l = torch.cat([l, extra_c - extra_w / 2, torch.tensor([0.3] * 10, dtype=torch.float64)])
    u = torch.cat([u, extra_c + extra_w / 2, torch.tensor([0.3] * 10, dtype=torch.float64)])
    return l.to(dtype), u.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,params", CASES)
def test_lines_and_interval_hold_on_dense_grids(op, params, dtype):
    rule = RULES[op]
    node = Node("a", op, ["x"], (600,), dict(params))
    l, u = _intervals(dtype)
    kl, bl, ku, bu = rule.relax(node, l.unsqueeze(0), u.unsqueeze(0))
    iv = rule.interval(node, [Interval(l.unsqueeze(0), u.unsqueeze(0))])
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).unsqueeze(1)
    x = torch.minimum(torch.maximum(l.double() + t * (u.double() - l.double()), l.double()),
                      u.double())                                   # [2001, 600], inside [l, u]
    y = rule.f(node, x.to(dtype)).double()                          # the function in the graph's dtype
    lo_line = kl.double() * x.to(dtype).double() + bl.double()
    up_line = ku.double() * x.to(dtype).double() + bu.double()
    # erf is an SShaped rule (as sigmoid and tanh): its lines touch f at tangent points, up to
    # rounding (about 1.4e-7 in float32); the smooth rules carry a slack and must hold exactly
    tol = (1e-12 if dtype == torch.float64 else 1e-6) * (1 + y.abs()) if op == "erf" else 0.0
    assert bool((lo_line <= y + tol).all()), f"{op}: a lower line cut f"
    assert bool((y <= up_line + tol).all()), f"{op}: an upper line cut f"
    assert bool((iv.lower.double() <= y + tol).all() and (y <= iv.upper.double() + tol).all())


@pytest.mark.parametrize("op,params", CASES)
def test_lines_are_tight_on_narrow_intervals(op, params):
    """Not just sound: on a narrow interval the two lines are within O(width^2) of f."""
    rule = RULES[op]
    node = Node("a", op, ["x"], (50,), dict(params))
    c = torch.linspace(-5, 5, 50, dtype=torch.float64).unsqueeze(0)
    kl, bl, ku, bu = rule.relax(node, c - 1e-2, c + 1e-2)
    gap = (ku - kl) * c + (bu - bl)
    extra = rule._gap(node) if op == "softplus" else 0.0   # torch's threshold switch
    # a kink costs O(width) where the interval holds it: only piecewise-smooth points there
    kinks = torch.tensor(getattr(rule, "breakpoints", lambda n: ())(node) if op != "erf" else ())
    near = (c - kinks.view(-1, 1, 1)).abs().amin(0) < 2e-2 if kinks.numel() else torch.zeros_like(c, dtype=torch.bool)
    limit = torch.where(near, 3e-2, 1e-3 + 2 * extra)
    if op == "exp":
        limit = limit * torch.exp(c)   # curvature grows with the function
    assert bool((gap <= limit).all()), float((gap - limit).max())


def test_silu_and_gelu_models_are_sound_under_every_method():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    check_sound(BoundedModel(net, input_shape=(6,), dtype=torch.float64),
                linf(torch.randn(3, 6), 0.6), methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


def test_softplus_and_elu_cnn_is_sound():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ELU(alpha=1.5), nn.Conv2d(3, 2, 3, stride=2),
                        nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    check_sound(BoundedModel(net, input_shape=(1, 7, 7), dtype=torch.float64),
                linf(torch.rand(2, 1, 7, 7), 0.3), methods=("ibp", "crown", "crown-ibp"))


def test_clamp_and_hard_activations_cnn_is_sound():
    torch.manual_seed(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 2, 3, stride=2)
            self.fc, self.act = nn.Linear(2 * 3 * 3, 3), nn.Hardswish()

        def forward(self, x):
            h = torch.clamp(self.c1(x), -0.3, 0.8) + torch.erf(self.c1(x)).abs()
            h = self.act(self.c2(h)) + torch.exp(0.2 * self.c2(h))
            return self.fc(nn.functional.relu6(4 * h).flatten(1))

    check_sound(BoundedModel(Net(), input_shape=(1, 7, 7), dtype=torch.float64),
                linf(torch.rand(2, 1, 7, 7), 0.3), methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


@pytest.mark.parametrize("op", ["sin", "cos"])
def test_periodic_rules_hold_past_their_turn_limit(op):
    """A range with more turns than MAX_TURNS: the constant-bound fallback, still sound."""
    rule = RULES[op]
    node = Node("a", op, ["x"], (4,), {})
    l = torch.tensor([[-300.0, -1.0, 0.5, 250.0]], dtype=torch.float64)
    u = torch.tensor([[-290.0, 2.0, 0.6, 260.0]], dtype=torch.float64)
    kl, bl, ku, bu = rule.relax(node, l, u)
    iv = rule.interval(node, [Interval(l, u)])
    x = l + torch.linspace(0, 1, 20001, dtype=torch.float64).unsqueeze(1) * (u - l)
    y = rule.f(node, x)
    assert bool((kl * x + bl <= y).all() and (y <= ku * x + bu).all())
    assert bool((iv.lower <= y).all() and (y <= iv.upper).all())


def test_a_siren_is_sound():
    class Siren(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(2, 16), nn.Linear(16, 16), nn.Linear(16, 1)

        def forward(self, x):
            return self.l3(torch.sin(self.l2(torch.sin(30 * self.l1(x)))))

    torch.manual_seed(3)
    check_sound(BoundedModel(Siren(), input_shape=(2,), dtype=torch.float64),
                linf(torch.rand(3, 2) * 2 - 1, 0.02), methods=("ibp", "crown", "crown-ibp"))


def test_unsupported_attributes_are_reported():
    from verifier import UnsupportedOpsError
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x) + nn.functional.elu(x, -1.0).sum()
            return torch.clamp(h, 1.0, 0.5) + torch.clamp(h, min=x.mean())

    with pytest.raises(UnsupportedOpsError) as e:
        BoundedModel(Net(), input_shape=(3,))
    text = str(e.value)
    assert "alpha -1.0" in text and "min 1.0 >= max 0.5" in text
