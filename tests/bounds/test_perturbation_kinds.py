"""End-to-end soundness of IBP, CROWN and CROWN-IBP for every kind of input set: LpBall with
p = inf, 2, 1, with and without clip (0, 1), scalar / per-sample / per-channel (L-inf) eps, and
Box; on a model mixing normalization, conv, BatchNorm, ReLU, a residual add, Sigmoid, max and
average pooling and dense layers; without a spec, with a random spec and with a margin spec."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_all_specs, check_sound
from verifier import BoundedModel, Box, LpBall


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5]).view(2, 1, 1))
        self.register_buffer("std", torch.tensor([0.3, 0.2]).view(2, 1, 1))
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3).eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2, stride=1)
        self.fc1 = nn.Linear(3 * 1 * 1 + 3 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):                                   # x: [B, 2, 4, 4]
        h = (x - self.mean) / self.std
        h = torch.relu(self.bn(self.c1(h)))
        h = h + torch.relu(self.c2(h))                      # residual
        p = self.pool(h)                                    # [B, 3, 2, 2]
        a = self.avg(p)                                     # [B, 3, 1, 1]
        z = torch.sigmoid(self.fc1(torch.cat([a.flatten(1), p.flatten(1)], 1)))
        return self.fc2(z)


@pytest.fixture(scope="module")
def bm():
    torch.manual_seed(0)
    return BoundedModel(Mixed(), input_shape=(2, 4, 4), dtype=torch.float64)


def _x(B=2, seed=1):
    return torch.rand((B, 2, 4, 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm,eps", [("inf", 0.05), (2, 0.3), (1, 0.8)])
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_lp_balls(bm, norm, eps, clip):
    check_all_specs(bm, LpBall(_x(), eps, norm, clip), pgd_steps=15)


@pytest.mark.parametrize("norm,scale", [("inf", 0.05), (2, 0.3), (1, 0.8)])
def test_per_sample_eps(bm, norm, scale):
    eps = torch.tensor([0.3, 1.0, 2.0]) * scale
    for clip in (None, (0.0, 1.0)):
        check_sound(bm, LpBall(_x(3), eps, norm, clip), pgd_steps=15)


def test_per_channel_eps_linf(bm):
    for eps in (torch.tensor([0.02, 0.08]).view(2, 1, 1), torch.tensor([0.1, 0.0]).view(1, 2, 1, 1)):
        check_all_specs(bm, LpBall(_x(), eps, "inf", (0.0, 1.0)), pgd_steps=15)


def test_per_element_eps_linf(bm):
    eps = torch.rand((2, 2, 4, 4), generator=torch.Generator().manual_seed(3)) * 0.1
    check_sound(bm, LpBall(_x(), eps, "inf"), pgd_steps=15)


def test_box(bm):
    g = torch.Generator().manual_seed(4)
    lo = torch.rand((2, 2, 4, 4), generator=g)
    w = torch.rand((2, 2, 4, 4), generator=g) * 0.2
    w[0, 0] = 0.0                                           # some degenerate coordinates
    check_all_specs(bm, Box(lo, lo + w), pgd_steps=15)


def test_float32_model_with_l2_clip(bm):
    torch.manual_seed(0)
    bm32 = BoundedModel(Mixed(), input_shape=(2, 4, 4))
    check_all_specs(bm32, LpBall(_x(), 0.3, 2, (0.0, 1.0)), pgd_steps=10)


def test_zero_eps_gives_the_point_value(bm):
    x = _x()
    for norm in ("inf", 2, 1):
        rep = check_sound(bm, LpBall(x, 0.0, norm), n_random=4, n_extreme=4, pgd_steps=2)
        y = bm(x).double()
        for r in rep.results.values():
            torch.testing.assert_close(r.lower.double(), y, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(r.upper.double(), y, atol=1e-6, rtol=1e-6)
