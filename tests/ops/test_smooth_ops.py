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


# --- alpha-CROWN: the optimized lines ---------------------------------------------------------
# the rules with the generic free slopes (erf is an SShaped rule, activation.py; PReLU and the
# rules with a domain, verifier.ops.domain, have their own parameters: tested in test_domain_ops)
SMOOTH = [(op, p) for op, p in CASES if op != "erf"] + [("gelu", {"approximate": "tanh"})]


def test_rules_with_their_own_alpha_keep_it():
    """PReLU and the domain rules keep their own parameters (one per neuron and bound
    direction, ``_lines``) and the full learning rate; the other smooth rules take the slopes."""
    from verifier.ops.smooth import SmoothElementwise
    own = {op for op, r in RULES.items() if isinstance(r, SmoothElementwise) and r._own_lines()}
    assert own == {"prelu", "pow", "sqrt", "rsqrt", "reciprocal", "log"}
    assert all(RULES[op].alpha_lr == 1.0 for op in own)
    assert all(not RULES[op]._own_lines() and RULES[op].alpha_lr < 1 for op, _ in SMOOTH)


@pytest.mark.parametrize("op,params", SMOOTH + [
    ("pow", {"exponent": 3.0}), ("pow", {"exponent": 2.0}), ("sqrt", {}), ("reciprocal", {}),
    ("log", {}), ("rsqrt", {}), ("pow", {"exponent": -2.0}), ("pow", {"exponent": 1.5})])
def test_extreme_takes_a_bool_per_element(op, params):
    """``_extreme`` with ``upper`` a bool tensor (and fewer bisection steps) is, element by
    element, the bound of the matching direction; for the domain rules, Periodic too."""
    rule = RULES[op]
    node = Node("a", op, ["x"], (600,), dict(params))
    l, u = (t.unsqueeze(0) for t in _intervals(torch.float64))
    if getattr(rule, "domain", lambda n: None)(node) is not None:   # inside it: x > 0
        l, u = l.abs() + 1e-3, u.abs() + 1e-3
        l, u = torch.minimum(l, u), torch.maximum(l, u)
    k = rule._chord(node, l, u)
    upper = torch.rand(l.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    for iters in (None, 20):
        got = rule._extreme(node, l, u, k, upper, iters)
        ref = torch.where(upper, rule._extreme(node, l, u, k, True, iters),
                          rule._extreme(node, l, u, k, False, iters))
        assert torch.equal(got, ref), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,params", SMOOTH)
def test_optimized_lines_hold_on_dense_grids_for_any_slope_position(op, params, dtype):
    """alpha-CROWN's lines (``optimized_lines``) at random slope positions in [0, 1], both ends,
    CROWN's start and positions just off the tabled slopes, each drawn above or below f: on a
    dense grid of each of the 600 intervals they must stay on their side of f (evaluated in the
    graph's dtype, as the line test above)."""
    rule = RULES[op]
    node = Node("a", op, ["x"], (600,), dict(params))
    l, u = _intervals(dtype)
    x = Interval(l.unsqueeze(0), u.unsqueeze(0))
    free = rule.slope_table(node, x)[0]
    assert bool(free.any()), f"{op}: no neuron has free slopes"
    g = torch.Generator().manual_seed(1)
    G = rule.slope_table(node, x)[1].shape[-1]
    init = rule.alpha_init(node, [x], 1, 1, dtype)[0]                 # [2, 1, 1, 600]
    off = (torch.randint(0, G - 1, (1, 2, 600), generator=g) + 0.5) / (G - 1)
    taus = torch.cat([torch.rand(1, 3, 600, generator=g, dtype=torch.float64),
                      torch.zeros(1, 1, 600, dtype=torch.float64), torch.ones(1, 1, 600, dtype=torch.float64),
                      off.double(), init[0].double(), init[1].double()], 1).to(dtype)   # [1, 9, 600]
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).unsqueeze(1)
    pts = torch.minimum(torch.maximum(l.double() + t * (u.double() - l.double()), l.double()),
                       u.double()).to(dtype)                         # [2001, 600], inside [l, u]
    y = rule.f(node, pts).double()
    for up in (False, True):
        upper = torch.full(taus.shape, up)
        upper[:, ::2] = not up   # both sides in one call
        k, b = rule.optimized_lines(node, x, taus, upper)
        assert k.dtype == dtype and b.dtype == dtype and k.shape == taus.shape
        for s in range(taus.shape[1]):
            line = k[0, s].double() * pts.double() + b[0, s].double()
            side = upper[0, s]
            assert bool((line[:, side] >= y[:, side]).all()), f"{op}: an upper line cut f (row {s})"
            assert bool((line[:, ~side] <= y[:, ~side]).all()), f"{op}: a lower line cut f (row {s})"


@pytest.mark.parametrize("op,params", SMOOTH)
def test_optimized_lines_start_at_crowns_and_match_the_exact_intercept_at_tabled_slopes(op, params):
    """At ``alpha_init``'s positions the lines are CROWN's (``relax``'s); at a tabled slope the
    intercept is ``_extreme``'s for that slope (no interpolation loss); between two tabled
    slopes it is never tighter than the exact one (the interpolation only loosens)."""
    rule = RULES[op]
    node = Node("a", op, ["x"], (600,), dict(params))
    l, u = _intervals(torch.float64)
    x = Interval(l.unsqueeze(0), u.unsqueeze(0))
    free, ks, _ = rule.slope_table(node, x)
    G = ks.shape[-1]
    kl, bl, ku, bu = rule.relax(node, x.lower, x.upper)
    init = rule.alpha_init(node, [x], 1, 1, torch.float64)[0]
    lo = rule.optimized_lines(node, x, init[0], torch.zeros(1, 1, 600, dtype=torch.bool))
    hi = rule.optimized_lines(node, x, init[1], torch.ones(1, 1, 600, dtype=torch.bool))
    for (k, b), (k0, b0) in ((lo, (kl, bl)), (hi, (ku, bu))):
        assert torch.allclose(k[0, 0], k0[0], rtol=1e-9, atol=1e-12)
        # relax bisects 50 times, the table 30 (a kink leaves the bracket's width / 2^30)
        assert torch.allclose(b[0, 0], b0[0], rtol=1e-7, atol=1e-7)
    g = torch.Generator().manual_seed(2)
    j = torch.randint(0, G, (1, 1, 600), generator=g)
    for up in (False, True):
        upper = torch.full((1, 2, 600), up)
        taus = torch.cat([j / (G - 1), (j.clamp(max=G - 2) + 0.37) / (G - 1)], 1).double()
        k, b = rule.optimized_lines(node, x, taus, upper)
        k_ex, b_ex = rule._line(node, x.lower.double().unsqueeze(1), x.upper.double().unsqueeze(1),
                                k.double(), up, torch.float64)
        f = free.unsqueeze(1).expand_as(k)
        scale = 1e-7 * (1 + b_ex.abs() + k.abs() * torch.maximum(l.abs(), u.abs()))
        at_grid = (b - b_ex).abs()[:, 0][f[:, 0]]
        assert bool((at_grid <= scale[:, 0][f[:, 0]]).all()), f"{op}: a tabled slope lost tightness"
        looser = (b - b_ex) if up else (b_ex - b)
        assert bool((looser[f] >= -scale[f]).all()), f"{op}: an interpolated line is tighter than exact"


def _smooth_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 12),
                         nn.Softplus(), nn.Linear(12, 12), nn.ELU(1.5), nn.Linear(12, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_crown_on_smooth_nets_is_sound_never_looser_and_tighter(dtype):
    """GELU / SiLU / Softplus / ELU: alpha-CROWN's output and intermediate bounds contain every
    sampled and PGD value, are inside CROWN's and tighter on average (CROWN's chord lines are a
    start, not the optimum)."""
    from verifier import margin_spec
    bm = BoundedModel(_smooth_net(5), input_shape=(6,), dtype=dtype)
    ball = linf(torch.rand(2, 6), 0.4)
    rep = check_sound(bm, ball, spec=margin_spec([0, 2], 4, dtype=dtype),
                      methods=("crown", "alpha-crown"), node_neurons=8)
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (a.lower >= c.lower - tol).all() and (a.upper <= c.upper + tol).all()
    assert float((a.lower - c.lower).mean()) > 1e-3
    tighter = 0
    for name, iv in a.nodes.items():
        ref = c.nodes[name]
        assert (iv.lower >= ref.lower - tol).all() and (iv.upper <= ref.upper + tol).all(), name
        tighter += int(((iv.lower > ref.lower + 1e-4) | (iv.upper < ref.upper - 1e-4)).sum())
    assert tighter > 10, "the intermediate bounds were not tightened"
