"""LayerNorm's pieces that know they are one: the variance over some dims of a perturbed tensor
(LayerNorm, GroupNorm), and the normalized product ``c * rsqrt(mean(c^2) + eps)``.

**The variance.**
``v = mean_k (x_k - mean(x))^2`` over the ``n`` elements of each reduced group is a convex
quadratic function of ``x`` whose value is the least mean square deviation from any centre:
``v = min_m mean_k (x_k - m)^2``. Both facts give the bounds:

* interval: over a box ``l <= x <= u``, ``min v = min_m mean_k dist(m, [l_k, u_k])^2``, a
  convex function of the one number ``m``, minimized by bisection on its (increasing)
  derivative; the bracket's end gives a rigorous lower bound through convexity. Intervals of
  the centred values alone would give 0 as soon as each of them may change sign. The upper
  bound is ``mean_k max((l_k - m)^2, (u_k - m)^2)`` at ``m`` = the mean of the boxes' centres
  (``v <= mean (x - m)^2`` for any ``m``);
* with CROWN (``linear_refine``): ``v = |c|^2 / n >= (e·x)^2 / n`` for a unit ``e`` with ``sum
  e = 0``, along the box centre's centred values, from CROWN's bounds of ``e·x``: where the
  box is loose enough to hold a constant vector (least variance 0), one linear function of
  the network's input still sees that the elements move together;
* lines: below, the tangent plane at the box's centre ``p`` (``v(x) >= v(p) + g (x - p)``,
  ``g = 2 (p - mean p) / n``: a convex function lies above its tangent planes everywhere);
  above, ``mean_k (x_k - m)^2`` with each square replaced by its chord over ``[l_k, u_k]``.

**The normalized product** ``y = c * r`` with ``r = rsqrt(mean(c^2) + eps)`` (LayerNorm: ``c``
the centred input; RMSNorm: the input itself) is bounded by McCormick planes like any product
of two perturbed tensors, but its interval also uses what ``r`` is: ``y_k = sqrt(n) c_k /
sqrt(c_k^2 + S + n eps)`` with ``S = sum_{j != k} c_j^2``, increasing in ``c_k``, and, for
``c_k >= 0``, decreasing in ``S`` (increasing for ``c_k < 0``). Over the box of ``c``, ``S``
lies in ``[sum_j min c_j^2, sum_j max c_j^2]``, so ``y_k``'s range is read at the ends; in
particular ``|y_k| <= sqrt(n)`` however wide the box. Where the bounds of ``c`` or of the
variance are loose (deep in a transformer), this keeps them from blowing up through ``r``'s
upper bound ``1 / sqrt(eps)``.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import BoundRule, NotSupported, pos_neg, register
from .elementwise import Mul

_ITERS = 60


def _groups(node, t: torch.Tensor) -> torch.Tensor:
    """``t: [B, *in_shape]`` -> ``[B, *kept, n]`` with the reduced dims last, flattened
    (``in_shape``: the node's params', or for the normalized product the shape of ``c``)."""
    dims = tuple(d + 1 for d in node.params["dims"])
    rest = [d for d in range(1, t.ndim) if d not in dims]
    return t.permute(0, *rest, *dims).flatten(len(rest) + 1)


def _in_shape(node) -> tuple:
    p = node.params
    return tuple(p["in_shape"]) if "in_shape" in p else tuple(p["in_shapes"][0])


def _ungroup(node, t: torch.Tensor, lead: int) -> torch.Tensor:
    """The inverse of ``_groups`` for ``t: [*lead dims, *kept, n]`` -> ``[*lead, *in_shape]``."""
    in_shape = _in_shape(node)
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
    def h(m):
        m = m.unsqueeze(-1)
        return ((l - m).clamp(min=0) ** 2 + (m - u).clamp(min=0) ** 2).mean(-1)

    def dh(m):
        m = m.unsqueeze(-1)
        return 2 * ((m - u).clamp(min=0) - (l - m).clamp(min=0)).mean(-1)

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

    def linear_refine(self, node, inputs, bound_linear):
        """``v = ||c||^2 / n >= (e·c)^2 / n = (e·x)^2 / n`` for a unit ``e`` with ``sum e = 0``
        (Cauchy-Schwarz; ``c = x - mean x``): with ``e`` along the centred centre of ``x``'s box,
        CROWN's bounds ``[L, U]`` of ``e·x`` (one row per group) give ``v >= dist(0, [L, U])^2 /
        n``. Where ``x``'s box is much wider than its true range (deep in a transformer) and its
        least variance is 0, ``e·x`` keeps the dependence between the elements and can stay away
        from 0."""
        (x,) = inputs
        dt = x.lower.dtype
        l, u = _groups(node, x.lower).double(), _groups(node, x.upper).double()
        n = l.shape[-1]
        p = (l + u) / 2
        c = p - p.mean(-1, keepdim=True)
        e = (c / c.norm(dim=-1, keepdim=True).clamp(min=1e-30)).to(dt)   # [B, *kept, n]
        B, G = e.shape[0], math.prod(e.shape[1:-1])
        rows = torch.zeros(B, G, G, n, dtype=dt, device=e.device)
        idx = torch.arange(G, device=e.device)
        rows[:, idx, idx] = e.reshape(B, G, n)
        C = _ungroup(node, rows.reshape(B, G, *e.shape[1:]), 2)
        lo, up = bound_linear(0, C)
        lo, up = lo.double(), up.double()
        # e in the graph's dtype sums to 0 only up to rounding: e·x = e·c + (sum e) mean(x)
        drift = e.double().sum(-1).abs() * torch.maximum(l.mean(-1).abs(), u.mean(-1).abs())
        drift = drift.reshape(B, G)
        d = torch.where(lo > 0, lo, torch.where(up < 0, -up, torch.zeros_like(lo)))
        d = (d - drift).clamp(min=0)
        e2 = (e.double() ** 2).sum(-1).reshape(B, G)       # 1 up to the rounding of e
        tol = 64 * torch.finfo(dt).eps
        v = (d * d / (n * e2) * (1 - tol)).clamp(min=0)
        v = torch.where(e2 > 0.5, v, torch.zeros_like(v))   # c = 0: no direction
        v = v.to(dt).reshape(B, *node.shape)
        return Interval(v, torch.full_like(v, math.inf))

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


def _normalized_range(node, c: Interval) -> Interval:
    """The range of ``sqrt(n) c_k / sqrt(c_k^2 + S_k + n eps)`` over the box of ``c`` (see the
    module doc), for the node's shape (``c`` broadcast to it)."""
    dt = c.lower.dtype
    l, u = _groups(node, c.lower).double(), _groups(node, c.upper).double()
    n = l.shape[-1]
    ne = n * float(node.params["eps"])
    qmin = torch.where((l <= 0) & (u >= 0), torch.zeros_like(l), torch.minimum(l * l, u * u))
    qmax = torch.maximum(l * l, u * u)
    smin = qmin.sum(-1, keepdim=True) - qmin
    smax = qmax.sum(-1, keepdim=True) - qmax
    rn = math.sqrt(n)

    def y(v, s):
        return rn * v / torch.sqrt(v * v + s + ne)

    hi = torch.where(u >= 0, y(u, smin), y(u, smax))
    lo = torch.where(l <= 0, y(l, smin), y(l, smax))
    tol = 64 * torch.finfo(dt).eps
    lo = lo - tol * (lo.abs() + 1)
    hi = hi + tol * (hi.abs() + 1)
    return Interval(_ungroup(node, lo, 1).to(dt), _ungroup(node, hi, 1).to(dt))


@register("normalize")
class Normalize(Mul):
    """``y = c * r`` where ``r = rsqrt(mean(c^2, dims) + eps)`` is the graph's own node; params
    ``dims`` (per-sample dims of ``c`` normalized together), ``eps``, ``in_shapes`` (of ``c``
    and ``r``). Lines: the product's (``mul``); interval: the product's, intersected with the
    range that ``r``'s definition allows (see the module doc)."""

    def inputs_at(self, node, xs):
        c = xs[0]
        dims = tuple(d + 1 for d in node.params["dims"])
        r = torch.rsqrt((c * c).mean(dim=dims, keepdim=True) + node.params["eps"])
        return [c, r.reshape(xs[1].shape)]

    def interval(self, node, inputs):
        prod = super().interval(node, inputs)
        c = inputs[0]
        if tuple(c.lower.shape[1:]) != tuple(node.shape):
            return prod
        got = _normalized_range(node, c)
        return Interval(torch.maximum(prod.lower, got.lower), torch.minimum(prod.upper, got.upper))
