"""The variance over some dims of a perturbed tensor, as one rule (LayerNorm, GroupNorm).

``v = mean_k (x_k - mean(x))^2`` over the ``n`` elements of each reduced group is a convex
quadratic function of ``x`` whose value is the least mean square deviation from any centre:
``v = min_m mean_k (x_k - m)^2``. Both facts give the bounds:

* interval: over a box ``l <= x <= u``, ``min v = min_m mean_k dist(m, [l_k, u_k])^2``, a
  convex function of the one number ``m``, minimized by bisection on its (increasing)
  derivative; the bracket's end gives a rigorous lower bound through convexity. Intervals of
  the centred values alone would give 0 as soon as each of them may change sign. The upper
  bound is ``mean_k max((l_k - m)^2, (u_k - m)^2)`` at ``m`` = the mean of the boxes' centres
  (``v <= mean (x - m)^2`` for any ``m``);
* lines: below, the tangent plane at the box's centre ``p`` (``v(x) >= v(p) + g (x - p)``,
  ``g = 2 (p - mean p) / n``: a convex function lies above its tangent planes everywhere);
  above, ``mean_k (x_k - m)^2`` with each square replaced by its chord over ``[l_k, u_k]``.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import BoundRule, NotSupported, pos_neg, register

_ITERS = 60


def _groups(node, t: torch.Tensor) -> torch.Tensor:
    """``t: [B, *in_shape]`` -> ``[B, *kept, n]`` with the reduced dims last, flattened."""
    dims = tuple(d + 1 for d in node.params["dims"])
    rest = [d for d in range(1, t.ndim) if d not in dims]
    return t.permute(0, *rest, *dims).flatten(len(rest) + 1)


def _ungroup(node, t: torch.Tensor, lead: int) -> torch.Tensor:
    """The inverse of ``_groups`` for ``t: [*lead dims, *kept, n]`` -> ``[*lead, *in_shape]``."""
    in_shape = tuple(node.params["in_shape"])
    dims = tuple(node.params["dims"])
    rest = [d for d in range(len(in_shape)) if d not in dims]
    order = rest + list(dims)
    t = t.reshape(*t.shape[:lead], *[in_shape[d] for d in order])
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return t.permute(*range(lead), *[lead + i for i in inv])


def _out(node, t: torch.Tensor) -> torch.Tensor:
    """``[B, *kept]`` -> ``[B, *node.shape]`` (keepdim or not)."""
    return t.reshape(t.shape[0], *node.shape)


def _min_over_box(l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A lower bound (tight to rounding) of ``min_m mean_k dist(m, [l_k, u_k])^2`` per group
    (last dim); float64."""
    h = lambda m: ((l - m).clamp(min=0) ** 2 + (m - u).clamp(min=0) ** 2).mean(-1)  # noqa: E731
    dh = lambda m: 2 * ((m - u).clamp(min=0) - (l - m).clamp(min=0)).mean(-1)     # noqa: E731
    a = l.min(-1).values      # dh(a) <= 0
    b = u.max(-1).values      # dh(b) >= 0
    for _ in range(_ITERS):
        m = (a + b) / 2
        up = dh(m) >= 0
        b = torch.where(up, m, b)
        a = torch.where(up, a, m)
    # for m in [a, b]: h(m) >= h(a) + h'(a) (m - a) >= h(a) + h'(a) (b - a)   (h'(a) <= 0)
    return (h(a) + dh(a) * (b - a)).clamp(min=0)


@register("variance")
class Variance(BoundRule):
    """``y = mean((x - mean(x))^2)`` over the per-sample dims ``dims`` (``keepdim``); params
    ``dims``, ``keepdim``, ``in_shape``."""

    needs_bounds = True

    def point(self, node, inputs):
        (x,) = inputs
        dims = tuple(d + 1 for d in node.params["dims"])
        return x.var(dim=dims, unbiased=False, keepdim=node.params["keepdim"])

    def interval(self, node, inputs):
        (x,) = inputs
        dt = x.lower.dtype
        l, u = _groups(node, x.lower).double(), _groups(node, x.upper).double()
        tol = 64 * torch.finfo(dt).eps
        lo = _min_over_box(l, u)
        m = ((l + u) / 2).mean(-1, keepdim=True)
        hi = torch.maximum((l - m) ** 2, (u - m) ** 2).mean(-1)
        lo = (lo * (1 - tol)).to(dt)
        hi = (hi * (1 + tol) + tol * (m.squeeze(-1) ** 2)).to(dt)
        return Interval(_out(node, lo), _out(node, hi))

    def _lines(self, node, x: Interval):
        """Lower plane ``v >= gl·x + bl`` and upper ``v <= gu·x + bu`` per group: ``g: [B, *kept,
        n]``, ``b: [B, *kept]`` (float64)."""
        l, u = _groups(node, x.lower).double(), _groups(node, x.upper).double()
        n = l.shape[-1]
        p = (l + u) / 2
        c = p - p.mean(-1, keepdim=True)
        gl = 2 * c / n
        bl = (c ** 2).mean(-1) - (gl * p).sum(-1)
        m = p.mean(-1, keepdim=True)
        # chord of (x - m)^2 on [l, u]: slope (l + u - 2m), value (l - m)^2 at l
        gu = (l + u - 2 * m) / n
        bu = ((l - m) ** 2).mean(-1) - (gu * l).sum(-1)
        # rounding: widen by a few ulps of the terms' size
        scale = (p.abs() + (u - l)).pow(2).mean(-1) + (m.squeeze(-1) ** 2)
        tol = 64 * torch.finfo(x.lower.dtype).eps * scale
        return gl, bl - tol, gu, bu + tol

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        (x,) = inputs
        dt = A_lower.dtype
        gl, bl, gu, bu = self._lines(node, x)
        B = A_lower.shape[0]
        kept_l = A_lower.reshape(B, A_lower.shape[1], *gl.shape[1:-1]).double()
        kept_u = A_upper.reshape(B, A_upper.shape[1], *gl.shape[1:-1]).double()

        def one(A, low):
            Ap, An = pos_neg(A)
            if not low:
                Ap, An = An, Ap
            # A+ takes the lower line for a lower bound, A- the upper one
            g = Ap.unsqueeze(-1) * gl.unsqueeze(1) + An.unsqueeze(-1) * gu.unsqueeze(1)
            bias = (Ap * bl.unsqueeze(1) + An * bu.unsqueeze(1)).reshape(*A.shape[:2], -1).sum(-1)
            return _ungroup(node, g, 2).to(dt), bias.to(dt)

        Axl, b_l = one(kept_l, True)
        Axu, b_u = one(kept_u, False)
        return [(Axl, Axu)], b_l, b_u

    def lipschitz(self, node, Ls):
        raise NotSupported(self.op, "lipschitz", "the variance is quadratic: no global constant")

    def deviation(self, node, centers, devs):
        raise NotSupported(self.op, "deviation")
