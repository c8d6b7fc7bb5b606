"""The soundness checker itself (tests/helpers.py) catches broken rules: each test breaks one rule
slightly (monkeypatched) and asserts that ``check_sound`` / ``exact_affine_bounds`` fail."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, exact_affine_bounds, linf
from verifier import BoundedModel, Box, Interval, LpBall
from verifier.ops import RULES


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3))


def test_checker_passes_the_unbroken_rules():
    bm = BoundedModel(_net(), input_shape=(4,), dtype=torch.float64)
    rep = check_sound(bm, linf(torch.randn(2, 4), 0.5))
    assert {"_0", "_1", "_2", "_3", "_4"} <= rep.checked_nodes


def test_checker_catches_a_shrunk_ibp_interval(monkeypatch):
    cls = type(RULES["linear"])
    orig = cls.interval

    def interval(self, node, inputs):
        iv = orig(self, node, inputs)
        return Interval(iv.center - 0.99 * iv.radius, iv.center + 0.99 * iv.radius)

    monkeypatch.setattr(cls, "interval", interval)
    bm = BoundedModel(_net(), input_shape=(4,), dtype=torch.float64)
    with pytest.raises(AssertionError, match="ibp"):
        check_sound(bm, linf(torch.randn(2, 4), 0.5), methods=("ibp",))


def test_checker_catches_a_relaxation_line_shifted_by_1e_4(monkeypatch):
    cls = type(RULES["sigmoid"])
    orig = cls.relax

    def relax(self, node, l, u):
        kl, bl, ku, bu = orig(self, node, l, u)
        return kl, bl, ku, bu - 1e-4

    monkeypatch.setattr(cls, "relax", relax)
    bm = BoundedModel(nn.Sigmoid(), input_shape=(4,), dtype=torch.float64)
    lo = torch.randn(2, 4, dtype=torch.float64)          # narrow boxes: the lines are tight
    with pytest.raises(AssertionError, match="crown"):
        check_sound(bm, Box(lo, lo + 0.01), methods=("crown",))


def test_exactness_catches_a_slightly_wrong_adjoint(monkeypatch):
    cls = type(RULES["conv"])
    orig = cls.transpose

    def transpose(self, node, A):
        (r,) = orig(self, node, A)
        return [r * 1.001]

    monkeypatch.setattr(cls, "transpose", transpose)
    bm = BoundedModel(nn.Conv2d(1, 2, 3, padding=1), input_shape=(1, 4, 4), dtype=torch.float64)
    pert = LpBall(torch.randn(1, 1, 4, 4), 0.1, 2)
    lo, _ = exact_affine_bounds(bm, pert)
    r = bm.bounds(pert, method="crown")
    assert not torch.allclose(r.lower.double(), lo, atol=1e-8, rtol=1e-8)
