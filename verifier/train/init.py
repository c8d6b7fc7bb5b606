"""The IBP initialization (after Shi et al. 2021, "Fast certified robust training with short
warmup"): weights drawn so that interval widths neither explode nor vanish with depth.

For ``y = W x`` with ``x`` of radius ``r`` (element-wise), IBP gives ``y`` the radius
``|W| r``, whose expectation is ``n_in * E|w| * r = n_in * sigma * sqrt(2/pi) * r`` for
``w ~ N(0, sigma^2)``. A ReLU roughly halves radii on average, so keeping the radius constant
per (layer + ReLU) asks for ``n_in * sigma * sqrt(2/pi) / 2 = 1``:

    sigma = sqrt(2 * pi) / n_in,    n_in = fan-in (in_features, or C_in * kernel area)

Biases start at 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def ibp_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-draw every Linear / Conv weight of ``module`` in place (see the module doc)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
    return module
