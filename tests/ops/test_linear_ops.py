"""Soundness of the dense and convolutional rules (verifier/ops/linear.py): Linear, F.linear,
x @ M, M @ x, Conv1d, Conv2d (stride, padding, dilation, groups), ConvTranspose2d (stride,
padding, output_padding, groups, dilation), each alone and between ReLUs, with IBP, CROWN and
CROWN-IBP, without a spec, with a random spec and with a margin spec. Alone, the op is affine:
CROWN must then be exact (equal to the extremes of the true linear map)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_all_specs, check_sound, exact_affine_bounds, linf, specs_for
from verifier import BoundedModel, LpBall


class FLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.register_buffer("w", torch.randn(n_out, n_in))
        self.register_buffer("b", torch.randn(n_out))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class RightMatmul(nn.Module):
    """x @ M, x per sample [r, k] (a 3-D batch), M [k, n]."""

    def __init__(self, k, n):
        super().__init__()
        self.register_buffer("M", torch.randn(k, n))

    def forward(self, x):
        return x @ self.M


class LeftMatmul(nn.Module):
    """M @ x, M [m, k], x per sample [k, n]."""

    def __init__(self, m, k):
        super().__init__()
        self.register_buffer("M", torch.randn(m, k))

    def forward(self, x):
        return torch.matmul(self.M, x)


class FConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4, 1, 3, 3))
        self.register_buffer("b", torch.randn(4))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, stride=2, padding=1, dilation=1, groups=2)


# name -> (factory, per-sample input shape)
OPS = {
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "linear_nobias": (lambda: nn.Linear(6, 3, bias=False), (6,)),
    "linear_3d": (lambda: nn.Linear(5, 3), (2, 5)),
    "F.linear": (lambda: FLinear(6, 4), (6,)),
    "x@M": (lambda: RightMatmul(5, 3), (2, 5)),
    "M@x": (lambda: LeftMatmul(4, 3), (3, 2)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9)),
    "conv1d_dil_groups": (lambda: nn.Conv1d(2, 4, 2, dilation=2, groups=2, padding=1), (2, 8)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5)),
    "conv2d_stride_pad": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
    "conv2d_stride_floor": (lambda: nn.Conv2d(1, 2, 3, stride=2), (1, 6, 7)),
    "conv2d_dilation": (lambda: nn.Conv2d(2, 2, 3, dilation=2, padding=2), (2, 5, 5)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 4, 3, groups=2, padding=1, bias=False), (4, 4, 4)),
    "conv2d_depthwise": (lambda: nn.Conv2d(3, 3, 2, groups=3, stride=(2, 1)), (3, 5, 4)),
    "conv2d_all": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=(1, 2), dilation=2, groups=2), (2, 7, 6)),
    "conv2d_same": (lambda: nn.Conv2d(2, 2, 3, padding="same"), (2, 4, 5)),
    "F.conv2d": (lambda: FConv2d(), (2, 5, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(2, 3, 3), (2, 3, 3)),
    "convT2d_stride_pad_outpad": (lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1,
                                                            output_padding=1), (2, 3, 3)),
    "convT2d_groups_dilation": (lambda: nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2,
                                                          dilation=2), (4, 2, 3)),
    "convT2d_stride3": (lambda: nn.ConvTranspose2d(1, 2, (2, 3), stride=3, padding=(0, 1),
                                                  output_padding=(2, 1)), (1, 2, 2)),
}


class Sandwich(nn.Module):
    """relu(x * a + b) -> op -> relu -> flatten -> linear(5): the op's A comes from a ReLU
    relaxation and its input bounds from one."""

    def __init__(self, op, in_shape, out_numel):
        super().__init__()
        self.register_buffer("a", torch.rand(in_shape) + 0.5)
        self.register_buffer("b", 0.3 * torch.randn(in_shape))
        self.op = op
        self.fc = nn.Linear(out_numel, 5)

    def forward(self, x):
        h = torch.relu(self.op(torch.relu(x * self.a + self.b)))
        return self.fc(h.flatten(1))


def make(name, seed=0, sandwich=False, dtype=torch.float64):
    torch.manual_seed(seed)
    factory, shape = OPS[name]
    op = factory()
    if sandwich:
        with torch.no_grad():
            n_out = op(torch.zeros(1, *shape)).numel()
        op = Sandwich(op, shape, n_out)
    return BoundedModel(op, input_shape=shape, dtype=dtype), shape


def center(shape, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, *shape), generator=g)


@pytest.mark.parametrize("name", list(OPS))
def test_op_alone_sound_and_crown_exact(name):
    bm, shape = make(name)
    x = center(shape)
    for pert in (linf(x, 0.3), LpBall(x, torch.tensor([0.2, 0.7]), 2)):
        reports = check_all_specs(bm, pert, pgd_steps=10, restarts=1, n_random=48, n_extreme=32)
        for spec_name, C in specs_for(bm, 2):
            lo, up = exact_affine_bounds(bm, pert, C)
            for m in ("crown", "crown-ibp"):
                r = reports[spec_name].results[m]
                torch.testing.assert_close(r.lower.double(), lo, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(r.upper.double(), up, atol=1e-8, rtol=1e-8)
            if pert.norm == float("inf"):   # one affine op over a box: IBP is exact too
                r = reports[spec_name].results["ibp"]
                torch.testing.assert_close(r.lower.double(), lo, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(r.upper.double(), up, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", list(OPS))
def test_op_between_relus_sound(name):
    bm, shape = make(name, sandwich=True)
    x = center(shape)
    check_all_specs(bm, linf(x, torch.tensor([0.4, 0.15])), pgd_steps=15, restarts=2)


@pytest.mark.parametrize("name", ["linear", "conv2d_all", "convT2d_stride_pad_outpad", "M@x"])
def test_op_between_relus_sound_float32(name):
    bm, shape = make(name, seed=3, sandwich=True, dtype=torch.float32)
    x = center(shape, seed=4)
    check_all_specs(bm, linf(x, 0.3), pgd_steps=10, restarts=1)


def test_conv_with_many_unstable_neurons_l2_and_l1():
    """A deeper conv stack under L2 and L1 balls (dual norms through conv adjoints)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, padding=1, dilation=1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 2, 2, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    bm = BoundedModel(net, input_shape=(1, 6, 6), dtype=torch.float64)
    x = center((1, 6, 6), seed=6)
    for norm, eps in ((2, 0.8), (1, 1.5)):
        check_sound(bm, LpBall(x, eps, norm), pgd_steps=15, restarts=2)
