"""The bottom layer: interval and linear bound types shared by rules, perturbations and traversals.

Shapes: every tensor carries a batch dimension first. An interval on a node of per-sample shape
``S`` holds ``lower, upper: [batch, *S]``. A linear bound on a node, seen from a start node with
``spec`` rows, holds ``A: [batch, spec, *S]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Interval:
    """Element-wise bounds ``lower <= x <= upper``; both ``[batch, *shape]``.

    ``relax``: optionally a wider sound interval (a superset, e.g. CROWN's bounds before they
    were intersected with IBP's) on which piecewise-linear rules (ReLU) draw the relaxation of
    neurons that ``lower``/``upper`` leave unstable. Any interval containing the true range gives
    a sound relaxation; CROWN's own keeps CROWN's back-substitution consistent, where a chord
    over a narrower IBP-clipped range can loosen bounds further on.

    ``cache``: what rules derive from this interval and reuse across the backward passes of one
    bounds computation (e.g. an activation's lines over it), keyed by node and rule (see
    ``ElementwiseRelaxation.relaxation``); not part of the interval's value.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    relax: "Interval | None" = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def center(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def sanitized(self) -> "Interval":
        """NaN (e.g. inf - inf after a float overflow) means "no information": -inf / +inf."""
        lo, up = self.lower, self.upper
        if torch.isnan(lo).any() or torch.isnan(up).any():
            lo = torch.nan_to_num(lo, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
            up = torch.nan_to_num(up, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
        return Interval(lo, up)

    def intersect(self, other: "Interval") -> "Interval":
        """Both are sound, so their intersection is sound (and at least as tight)."""
        return Interval(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))

    def __repr__(self) -> str:
        w = (self.upper - self.lower)
        return (f"Interval(shape={tuple(self.lower.shape)}, lower.min={self.lower.min().item():.4g}, "
                f"upper.max={self.upper.max().item():.4g}, mean width={w.mean().item():.4g})")


@dataclass
class LinearBound:
    """Linear functions of some node ``x`` bounding a start node's (spec'd) value.

    ``A_lower·x + bias_lower <= C·y <= A_upper·x + bias_upper``;
    ``A_*: [batch, spec, *x_shape]``, ``bias_*: [batch, spec]``.
    """

    A_lower: torch.Tensor
    A_upper: torch.Tensor
    bias_lower: torch.Tensor
    bias_upper: torch.Tensor


def concretize_interval(A: torch.Tensor, box: Interval, upper: bool) -> torch.Tensor:
    """min (or max) of ``A·x`` over ``x`` in ``box``: ``A·c -/+ |A|·r``. A: [B, S, *shape] -> [B, S];
    the box has the batch B, or 1 when it is shared by the batch."""
    c = box.center.flatten(1).unsqueeze(-1)
    r = box.radius.flatten(1).unsqueeze(-1)
    A = A.flatten(2)
    if c.shape[0] == A.shape[0]:
        mid = torch.bmm(A, c).squeeze(-1)
        dev = torch.bmm(A.abs(), r).squeeze(-1)
    else:  # a box shared by the batch (a parameter's set): [1, ...]
        mid = torch.matmul(A, c).squeeze(-1)
        dev = torch.matmul(A.abs(), r).squeeze(-1)
    return mid + dev if upper else mid - dev
