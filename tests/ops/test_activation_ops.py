"""Soundness of the activation rules (verifier/ops/activation.py): ReLU, LeakyReLU, Sigmoid, Tanh.

1. Rule level: for pre-activation intervals that straddle 0 widely and narrowly, lie wholly on
   either side, are very narrow or degenerate, ``backward`` must give linear functions with
   ``A_l·x + b_l <= A·f(x) <= A_u·x + b_u`` at every point of a dense grid of each interval, and
   ``interval`` must contain f on it.
2. Model level: ``f(x) - k x`` for many slopes k (a linear bound that cut f anywhere inside the
   interval shows up for k equal to its slope), and a dense net, with every method.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from helpers import check_all_specs, check_sound, linf
from verifier import BoundedModel, Box, Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES

F_REF = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

FIXED = [
    (-5.0, 4.0), (-3.0, 0.5), (-0.5, 3.0), (-10.0, 10.0), (-20.0, 1.0), (-1.0, 20.0),   # wide
    (-1e-3, 2e-3), (-2e-3, 1e-3), (-1e-6, 1e-6), (-1e-8, 3e-8), (-0.1, 0.05),            # narrow
    (0.5, 3.0), (0.0, 2.0), (2.0, 2.0001), (10.0, 30.0), (1e-9, 1.0),                     # >= 0
    (-4.0, -1.0), (-2.0, 0.0), (-30.0, -10.0), (-3.0001, -3.0), (-1.0, -1e-9),            # <= 0
    (1.5, 1.5), (0.0, 0.0), (-0.7, -0.7), (0.3, 0.3 + 1e-7), (-2.0 - 1e-7, -2.0),        # tiny
    (-0.2, 8.0), (-8.0, 0.2), (-2.5, 2.4), (-1.2, 1.3),                                  # tangent
]


def intervals(n_random=120, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mid = 3 * torch.randn(n_random, generator=g, dtype=torch.float64)
    width = 10 ** (torch.rand(n_random, generator=g, dtype=torch.float64) * 9 - 8)   # 1e-8 .. 10
    lo = torch.cat([torch.tensor([a for a, _ in FIXED], dtype=torch.float64), mid - width / 2])
    hi = torch.cat([torch.tensor([b for _, b in FIXED], dtype=torch.float64), mid + width / 2])
    return lo.to(dtype), hi.to(dtype)


def grid(lo, hi, n=1001):
    """[n + 2, k]: n evenly spaced points of each interval, with both endpoints exactly."""
    t = torch.linspace(0, 1, n, dtype=torch.float64).unsqueeze(1)
    g = lo.double() + t * (hi.double() - lo.double())
    return torch.cat([lo.double().unsqueeze(0), g, hi.double().unsqueeze(0)]).clamp(lo.double(), hi.double())


ACTS = [("relu", {}), ("leaky_relu", {"negative_slope": 0.01}), ("leaky_relu", {"negative_slope": 0.3}),
        ("leaky_relu", {"negative_slope": 1.0}), ("leaky_relu", {"negative_slope": 0.0}),
        ("sigmoid", {}), ("tanh", {})]


def f_ref(op, params, x):
    if op == "leaky_relu":
        return torch.where(x >= 0, x, x * params["negative_slope"])
    return F_REF[op](x)


@pytest.mark.parametrize("op,params", ACTS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rule_relaxation_contains_f_on_dense_grid(op, params, dtype):
    lo, hi = intervals(dtype=dtype)
    k = lo.shape[0]
    node = Node(name="act", op=op, inputs=["x"], shape=(k,), params=dict(params))
    rule = RULES[op]
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)
    dense = torch.randn((6, k), generator=g, dtype=torch.float64).to(dtype)
    A = torch.cat([torch.diag(s), -torch.diag(s), dense]).unsqueeze(0)        # [1, 2k + 6, k]
    box = Interval(lo.unsqueeze(0), hi.unsqueeze(0))
    (parts, b_l, b_u) = rule.backward(node, A, A, [box])
    (A_l, A_u), = parts
    X = grid(lo, hi)                                                          # [n, k]
    FX = f_ref(op, params, X)
    Ad = A[0].double()
    val = FX @ Ad.t()                                                          # [n, S]
    low = X @ A_l[0].double().t() + b_l[0].double()
    up = X @ A_u[0].double().t() + b_u[0].double()
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-5, 1e-5)
    scale = atol + rtol * (X.abs() @ Ad.abs().t() + FX.abs() @ Ad.abs().t())
    assert bool(((low - val) <= scale).all()), \
        f"lower line above f by {(low - val - scale).max().item():.3g}"
    assert bool(((val - up) <= scale).all()), f"upper line below f by {(val - up - scale).max().item():.3g}"
    # IBP
    iv = rule.interval(node, [box])
    tol = atol + rtol * FX.abs()
    assert bool((FX >= iv.lower.double() - tol).all()) and bool((FX <= iv.upper.double() + tol).all())
    # the relaxation of a stable ReLU-like neuron is exact
    if op in ("relu", "leaky_relu"):
        stable = (lo >= 0) | (hi <= 0)
        diag_l = torch.diagonal(A_l[0, :k])
        slope = torch.where(lo >= 0, 1.0, params.get("negative_slope", 0.0)).to(dtype)
        assert torch.allclose(diag_l[stable], (s * slope)[stable])


@pytest.mark.parametrize("op", sorted(RULES))
def test_piece_slopes_are_the_functions_slopes(op):
    """A rule that names the slopes of its split halves (``piece_slopes``) is linear with those
    slopes on each side of 0 (branch and bound's new-split start and the triangle LP rely on
    it); only ``splittable`` rules name them."""
    rule = RULES[op]
    for params in ([p for o, p in ACTS if o == op] or [{}]):
        node = Node(name="act", op=op, inputs=["x"], shape=(7,), params=dict(params))
        got = rule.piece_slopes(node)
        if got is None:
            continue
        assert rule.splittable, op
        s0, s1 = got
        x = torch.tensor([-5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0], dtype=torch.float64)
        y = rule.point(node, [x])
        assert torch.allclose(y, torch.where(x < 0, s0 * x, s1 * x)), (op, params)


def test_sigmoid_tanh_relaxation_is_not_trivially_loose():
    """On a wide straddling interval the lines must be informative: slopes > 0 and the gap at 0
    well below the range of f (guards against a 'sound but useless' regression)."""
    for op in ("sigmoid", "tanh"):
        node = Node(name="a", op=op, inputs=["x"], shape=(1,), params={})
        A = torch.ones(1, 1, 1, dtype=torch.float64)
        box = Interval(torch.tensor([[-2.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64))
        (parts, b_l, b_u) = RULES[op].backward(node, A, A, [box])
        (A_l, A_u), = parts
        assert A_l.item() > 0 and A_u.item() > 0
        f = F_REF[op]
        rng = (f(torch.tensor(2.0)) - f(torch.tensor(-2.0))).item()
        assert (b_u - b_l).item() < 0.5 * rng


class ActMinusLine(nn.Module):
    """y = act(x) - k ⊙ x (a residual Sub of two perturbed tensors)."""

    def __init__(self, act, k):
        super().__init__()
        self.act = act
        self.register_buffer("k", k)

    def forward(self, x):
        return self.act(x) - self.k * x


MODULES = {
    "relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
}
SLOPES = [0.0, 0.05, -0.05, 0.25, 0.5, 1.0, -1.0, 2.0]


@pytest.mark.parametrize("act", list(MODULES))
def test_act_minus_line_sound_over_boxes(act):
    lo, hi = intervals(n_random=20, seed=2)
    k = lo.shape[0]
    ks = torch.tensor(SLOPES, dtype=torch.float64).repeat_interleave(k)
    lo, hi = lo.repeat(len(SLOPES)), hi.repeat(len(SLOPES))
    bm = BoundedModel(ActMinusLine(MODULES[act](), ks), input_shape=(lo.shape[0],), dtype=torch.float64)
    box = Box(lo.unsqueeze(0), hi.unsqueeze(0))
    check_sound(bm, box, n_random=256, n_extreme=64, pgd_steps=20, restarts=2, node_neurons=20)


@pytest.mark.parametrize("act", list(MODULES))
@pytest.mark.parametrize("eps", [0.01, 0.3, 3.0])
def test_dense_net_sound(act, eps):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(5, 8), MODULES[act](), nn.Linear(8, 8), MODULES[act](),
                        nn.Linear(8, 4))
    bm = BoundedModel(net, input_shape=(5,), dtype=torch.float64)
    x = torch.randn(2, 5)
    check_all_specs(bm, linf(x, eps), pgd_steps=15, restarts=2)


def test_functional_activations_and_float32():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.sigmoid(self.l1(x))
            h = torch.tanh(self.l2(h)) + nn.functional.leaky_relu(self.l2(h), 0.1)
            return self.l3(torch.relu(h)) + self.l3(h).relu()

    torch.manual_seed(8)
    for dtype in (torch.float64, torch.float32):
        bm = BoundedModel(Net(), input_shape=(4,), dtype=dtype)
        check_all_specs(bm, linf(torch.randn(3, 4), 0.5), pgd_steps=10)


def test_bounds_contain_f_at_interval_ends_for_very_narrow_boxes():
    """Boxes of width 0 and 1e-9: all methods give bounds within tolerance of the point value."""
    x = torch.tensor([[-3.0, -0.5, 0.0, 0.4, 2.0, 7.0]], dtype=torch.float64)
    for act in MODULES:
        bm = BoundedModel(MODULES[act](), input_shape=(6,), dtype=torch.float64)
        for w in (0.0, 1e-9):
            r = check_sound(bm, Box(x - w, x + w), n_random=16, n_extreme=8, pgd_steps=3)
            for res in r.results.values():
                assert (res.upper - res.lower).max().item() <= 1e-6


def test_relaxation_is_shared_and_follows_in_place_changes():
    """``relaxation`` computes ``relax`` once per input interval, and again after the interval's
    tensors change in place (never a stale relaxation)."""
    rule, node = RULES["relu"], Node("r", "relu", ["x"], (3,), {})
    x = Interval(torch.tensor([[-1.0, 0.5, -2.0]]), torch.tensor([[1.0, 2.0, -1.0]]))
    first = rule.relaxation(node, x)
    assert rule.relaxation(node, x) is first
    x.lower.add_(2.0)                                   # every neuron now active
    kl, bl, ku, bu = rule.relaxation(node, x)
    assert kl.tolist() == [[1.0, 1.0, 1.0]] and ku.tolist() == [[1.0, 1.0, 1.0]]
    assert bu.abs().max() == 0
