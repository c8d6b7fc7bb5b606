"""Soundness of the element-wise rules (verifier/ops/elementwise.py): ``affine`` (Mul/Div by
constants, Add/Sub of constants on either side, Neg, input normalization ``(x - mean) / std``,
BatchNorm1d/2d in eval with non-trivial running statistics), ``add`` (Add/Sub of two perturbed
tensors: residual blocks, ``x + x``, ``x - x``, broadcasting) and ``mul`` (product of two perturbed
tensors, McCormick), with IBP, CROWN and CROWN-IBP and every kind of spec."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_all_specs, check_sound, exact_affine_bounds, linf, specs_for
from verifier import BoundedModel, Box, Interval, LpBall
from verifier.graph.nodes import Node
from verifier.ops import RULES


class ConstArith(nn.Module):
    """Every way a constant meets a perturbed tensor: the result is affine in x."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("c", torch.randn(shape))
        self.register_buffer("d", torch.rand(shape) + 0.5)

    def forward(self, x):
        h = x * self.c + 2.0            # Mul by a tensor, Add a scalar
        h = 3.0 - h                     # rsub
        h = h / self.d - self.c         # Div by a tensor, Sub a tensor
        h = -h * 0.5                    # Neg, Mul by a scalar
        h = self.c - h / 4.0            # constant minus perturbed, Div by a scalar
        h = torch.mul(h, self.d) + torch.add(self.c, h)
        return torch.sub(h, 1.0)


class Normalize(nn.Module):
    """(x - mean) / std per channel, then a conv and a ReLU."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1))
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv((x - self.mean) / self.std)).flatten(1))


def _bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    return bn.eval()


class Residual(nn.Module):
    """x + relu(bn(conv(relu(bn(conv(x)))))) then a projection: two perturbed branches."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.b1, self.b2 = _bn(nn.BatchNorm2d(2), 1), _bn(nn.BatchNorm2d(2), 2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))
        h = torch.relu(x + h)
        h = h - 0.5 * torch.relu(-h + x)       # Sub of two perturbed tensors
        return self.fc(h.flatten(1))


class SelfArith(nn.Module):
    """x + x, x - x (identically 0), x * x, and broadcasting between perturbed tensors."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):                      # x: [B, 3, 4]
        h = self.l(x)
        s = h[:, :1]                          # [B, 1, 4]: broadcasts on dim 1
        return (x + x) - (h - h) + h * h + s * x + (h + s) - torch.relu(s) * h


class Products(nn.Module):
    """Products of two perturbed tensors between layers (McCormick), with broadcasting."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
        self.c = nn.Linear(6, 1)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        p = torch.tanh(self.a(x)) * torch.relu(self.b(x))     # [B, 6] * [B, 6]
        q = p * self.c(p)                                       # [B, 6] * [B, 1]
        return self.out(torch.mul(q, x[:, :1]) + q)


BN = {
    "bn1d_vector": (lambda: _bn(nn.BatchNorm1d(5), 3), (5,)),
    "bn1d_sequence": (lambda: _bn(nn.BatchNorm1d(3), 4), (3, 4)),
    "bn2d": (lambda: _bn(nn.BatchNorm2d(3), 5), (3, 3, 3)),
    "bn2d_no_affine": (lambda: _bn(nn.BatchNorm2d(2, affine=False), 6), (2, 3, 2)),
}


@pytest.mark.parametrize("name", ["const_arith"] + list(BN))
def test_affine_ops_sound_and_exact(name):
    torch.manual_seed(0)
    if name == "const_arith":
        net, shape = ConstArith((2, 3)), (2, 3)
    else:
        factory, shape = BN[name]
        net = factory()
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    x = torch.randn(2, *shape)
    for pert in (linf(x, 0.4), LpBall(x, 0.5, 1)):
        reports = {}
        for spec_name, C in specs_for(bm, 2):
            reports[spec_name] = check_sound(bm, pert, spec=C, pgd_steps=10, restarts=1)
            lo, up = exact_affine_bounds(bm, pert, C)
            methods = ("ibp", "crown", "crown-ibp") if pert.norm == float("inf") else ("crown", "crown-ibp")
            for m in methods:
                r = reports[spec_name].results[m]
                torch.testing.assert_close(r.lower.double(), lo, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(r.upper.double(), up, atol=1e-8, rtol=1e-8)


def test_batchnorm_between_layers_sound():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), _bn(nn.BatchNorm1d(6), 7), nn.ReLU(), nn.Linear(6, 6),
                        _bn(nn.BatchNorm1d(6), 8), nn.Sigmoid(), nn.Linear(6, 3))
    bm = BoundedModel(net, input_shape=(4,), dtype=torch.float64)
    check_all_specs(bm, linf(torch.randn(3, 4), 0.5))


def test_input_normalization_sound():
    torch.manual_seed(2)
    bm = BoundedModel(Normalize(), input_shape=(3, 5, 5), dtype=torch.float64)
    x = torch.rand(2, 3, 5, 5)
    check_all_specs(bm, LpBall(x, 2 / 255 * 4, "inf", clip=(0, 1)))


def test_residual_block_sound():
    torch.manual_seed(3)
    bm = BoundedModel(Residual(), input_shape=(2, 4, 4), dtype=torch.float64)
    check_all_specs(bm, linf(torch.randn(2, 2, 4, 4), 0.3))


def test_self_arithmetic_sound():
    torch.manual_seed(4)
    bm = BoundedModel(SelfArith(), input_shape=(3, 4), dtype=torch.float64)
    rep = check_all_specs(bm, linf(torch.randn(2, 3, 4), 0.2), pgd_steps=15)
    # x - x is exactly 0: the graph keeps both inputs, so the CROWN bound of (h - h) is exact
    for r in rep["none"].results.values():
        assert torch.isfinite(r.lower).all()


def test_products_of_perturbed_tensors_sound():
    torch.manual_seed(5)
    bm = BoundedModel(Products(), input_shape=(5,), dtype=torch.float64)
    x = torch.randn(3, 5)
    for eps in (0.05, 0.5):
        check_all_specs(bm, linf(x, eps), pgd_steps=20, restarts=2)


def test_difference_of_a_tensor_with_itself_is_exact():
    """h - h = 0 and h + h = 2h: CROWN must see both edges (duplicated inputs), IBP may not."""
    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            h = self.l(x)
            return torch.cat([h - h, (h + h) - 2 * h], 1)

    torch.manual_seed(6)
    bm = BoundedModel(D(), input_shape=(3,), dtype=torch.float64)
    pert = linf(torch.randn(2, 3), 0.7)
    rep = check_sound(bm, pert)
    for m in ("crown", "crown-ibp"):
        r = rep.results[m]
        assert r.lower.abs().max().item() < 1e-9 and r.upper.abs().max().item() < 1e-9


# --- McCormick at the rule level ----------------------------------------------------------------
CASES = [((-1.0, 2.0), (-3.0, 0.5)), ((0.5, 2.0), (1.0, 3.0)), ((-2.0, -1.0), (-1.0, 4.0)),
         ((-1e-6, 1e-6), (-5.0, 5.0)), ((2.0, 2.0), (-1.0, 1.0)), ((-3.0, -0.5), (-2.0, -1.0)),
         ((0.0, 0.0), (0.0, 0.0)), ((-4.0, 4.0), (-4.0, 4.0)), ((1.0, 1.0 + 1e-8), (3.0, 3.0))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mccormick_planes_bound_product_on_grid(dtype):
    g = torch.Generator().manual_seed(0)
    k_rand = 40
    lx = torch.cat([torch.tensor([c[0][0] for c in CASES]), torch.randn(k_rand, generator=g) * 2])
    ux = torch.cat([torch.tensor([c[0][1] for c in CASES]), lx[len(CASES):] + torch.rand(k_rand, generator=g) * 3])
    ly = torch.cat([torch.tensor([c[1][0] for c in CASES]), torch.randn(k_rand, generator=g) * 2])
    uy = torch.cat([torch.tensor([c[1][1] for c in CASES]), ly[len(CASES):] + torch.rand(k_rand, generator=g) * 3])
    lx, ux, ly, uy = (t.double().to(dtype) for t in (lx, ux, ly, uy))
    k = lx.shape[0]
    node = Node(name="m", op="mul", inputs=["x", "y"], shape=(k,), params={"in_shapes": ((k,), (k,))})
    s = torch.rand(k, generator=g, dtype=torch.float64).to(dtype) + 0.1
    A = torch.cat([torch.diag(s), -torch.diag(s)]).unsqueeze(0)
    X, Y = Interval(lx.unsqueeze(0), ux.unsqueeze(0)), Interval(ly.unsqueeze(0), uy.unsqueeze(0))
    parts, b_l, b_u = RULES["mul"].backward(node, A, A, [X, Y])
    (axl, axu), (ayl, ayu) = parts
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    gx = lx.double() + t.view(-1, 1, 1) * (ux - lx).double()       # [41, 1, k]
    gy = ly.double() + t.view(1, -1, 1) * (uy - ly).double()       # [1, 41, k]
    gx, gy = torch.broadcast_tensors(gx, gy)
    gx, gy = gx.reshape(-1, k), gy.reshape(-1, k)
    val = (gx * gy) @ A[0].double().t()
    low = gx @ axl[0].double().t() + gy @ ayl[0].double().t() + b_l[0].double()
    up = gx @ axu[0].double().t() + gy @ ayu[0].double().t() + b_u[0].double()
    tol = (1e-9 if dtype == torch.float64 else 1e-5) * (1 + val.abs())
    assert bool((low <= val + tol).all()), (low - val).max()
    assert bool((up >= val - tol).all()), (val - up).max()
    iv = RULES["mul"].interval(node, [X, Y])
    prod = (gx * gy)
    assert bool((prod >= iv.lower.double() - tol[:, :k]).all()) and bool((prod <= iv.upper.double() + tol[:, :k]).all())


def test_mul_box_inputs_all_methods():
    """z = x[:, :3] * x[:, 3:] over boxes whose factors have every sign pattern."""
    class M(nn.Module):
        def forward(self, x):
            return x[:, :4] * x[:, 4:]

    bm = BoundedModel(M(), input_shape=(8,), dtype=torch.float64)
    lo = torch.tensor([[-1.0, 0.5, -2.0, -1.0, -3.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    hi = torch.tensor([[2.0, 2.0, -1.0, 1.0, 0.5, 3.0, 4.0, 2.0]], dtype=torch.float64)
    check_all_specs(bm, Box(lo, hi), n_random=256)
