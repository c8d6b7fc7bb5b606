"""Soundness of the pooling rules (verifier/ops/pooling.py): AvgPool1d/2d (padding,
count_include_pad, ceil_mode, divisor_override), F.avg_pool2d, AdaptiveAvgPool1d/2d, and
MaxPool2d (overlapping windows, padding, dilation, ceil_mode without partial windows,
F.max_pool2d), alone and between ReLUs, with every method and spec. Average pooling is linear:
alone, CROWN must be exact. Max pooling is checked on boxes where some windows are decided (one
element's lower bound above every other upper bound) and others are not."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_all_specs, check_sound, exact_affine_bounds, linf, specs_for
from verifier import BoundedModel, Box, LpBall

AVG = {
    "avg2_s2": (lambda: nn.AvgPool2d(2), (2, 4, 4)),
    "avg3_s1_pad": (lambda: nn.AvgPool2d(3, stride=1, padding=1), (2, 4, 4)),
    "avg3_pad_exclude": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 5, 5)),
    "avg2_ceil": (lambda: nn.AvgPool2d(2, stride=2, ceil_mode=True), (1, 5, 5)),
    "avg_divisor": (lambda: nn.AvgPool2d((2, 3), stride=(1, 2), divisor_override=5), (2, 4, 5)),
    "avg1d": (lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 7)),
    "F.avg_pool2d": (lambda: (lambda x: F.avg_pool2d(x, 2, 1)), (2, 3, 4)),
    "adaptive2d": (lambda: nn.AdaptiveAvgPool2d((2, 2)), (2, 4, 6)),
    "adaptive2d_global": (lambda: nn.AdaptiveAvgPool2d(1), (3, 3, 3)),
    "adaptive1d": (lambda: nn.AdaptiveAvgPool1d(2), (2, 6)),
}
MAX = {
    "max2_s2": (lambda: nn.MaxPool2d(2), (2, 4, 4)),
    "max3_s1_pad_overlap": (lambda: nn.MaxPool2d(3, stride=1, padding=1), (2, 4, 4)),
    "max3_s2_pad": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 5, 5)),
    "max2_dilation": (lambda: nn.MaxPool2d(2, stride=1, dilation=2), (1, 5, 5)),
    "max_rect": (lambda: nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)), (2, 4, 5)),
    "max_ceil_exact": (lambda: nn.MaxPool2d(2, stride=2, ceil_mode=True), (1, 4, 4)),
    "F.max_pool2d": (lambda: (lambda x: F.max_pool2d(x, 3, 2, 1)), (2, 4, 4)),
}
OPS = {**AVG, **MAX}


class Wrap(nn.Module):
    def __init__(self, op, shape, between_relus):
        super().__init__()
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        self.relus = between_relus
        c = shape[0]
        self.pre = nn.Conv1d(c, c, 1) if len(shape) == 2 else nn.Conv2d(c, c, 1)
        with torch.no_grad():
            n = self._op(torch.zeros(1, *shape)).numel()
        self.fc = nn.Linear(n, 4)

    def _op(self, h):
        return self.op(h) if self.op is not None else self.fn(h)

    def forward(self, x):
        h = torch.relu(self.pre(x)) if self.relus else x
        h = self._op(h)
        if self.relus:
            h = torch.relu(h)
        return self.fc(h.flatten(1))


def make(name, between_relus, seed=0):
    torch.manual_seed(seed)
    factory, shape = OPS[name]
    return BoundedModel(Wrap(factory(), shape, between_relus), input_shape=shape,
                        dtype=torch.float64), shape


@pytest.mark.parametrize("name", list(AVG))
def test_avgpool_sound_and_exact(name):
    bm, shape = make(name, False)
    x = torch.randn(2, *shape)
    for pert in (linf(x, 0.3), LpBall(x, 0.5, 2)):
        for spec_name, C in specs_for(bm, 2):
            rep = check_sound(bm, pert, spec=C, pgd_steps=8, restarts=1, n_random=32, n_extreme=16)
            lo, up = exact_affine_bounds(bm, pert, C)
            for m in ("crown", "crown-ibp"):
                torch.testing.assert_close(rep.results[m].lower.double(), lo, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(rep.results[m].upper.double(), up, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", list(OPS))
def test_pool_sound_between_relus(name):
    bm, shape = make(name, True, seed=1)
    check_all_specs(bm, linf(torch.randn(2, *shape), torch.tensor([0.2, 0.7])), pgd_steps=12,
                    restarts=2)


@pytest.mark.parametrize("name", list(MAX))
def test_maxpool_alone_on_boxes_with_decided_and_undecided_windows(name):
    bm, shape = make(name, False, seed=2)
    g = torch.Generator().manual_seed(3)
    c = torch.randn((2, *shape), generator=g, dtype=torch.float64)
    c[:, :, ::3, ::2] += 4.0                   # some elements dominate their windows
    r = torch.rand((2, *shape), generator=g, dtype=torch.float64) * 0.6
    r[1] *= 3                                  # sample 1: most windows undecided
    r[0, 0, 0, 0] = 0.0                        # a degenerate coordinate
    check_all_specs(bm, Box(c - r, c + r), n_random=128, n_extreme=64, pgd_steps=15)


def test_maxpool_with_negative_inputs_and_padding():
    """All inputs negative: padding must not act as a 0 (max_pool2d pads with -inf)."""
    net = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten())
    bm = BoundedModel(net, input_shape=(1, 4, 4), dtype=torch.float64)
    c = -2.0 - torch.rand(1, 1, 4, 4, dtype=torch.float64)
    rep = check_sound(bm, Box(c - 0.3, c + 0.3))
    for res in rep.results.values():
        assert res.upper.max().item() < 0
