"""A generic rule for smooth element-wise functions, and the modern activations built on it.

A function ``f`` is given with its derivative ``f'`` and its *breakpoints*: the points where
``f'`` may change from increasing to decreasing (inflection points, and kinks such as ELU's at 0).
Between two breakpoints ``f'`` is monotone, so for any slope ``k`` the function
``g(x) = f(x) - k x`` has at most one interior extremum there, where ``f'(x) = k``. Hence, on
``[l, u]``, the extremes of ``g`` are among: ``l``, ``u``, the breakpoints inside, and one root
per region, found by bisection on ``f' - k``. The rule bounds ``g`` over ``[l, u]`` rigorously:

* at a root bracketed by ``[a, b]`` (``g'(a) >= 0 >= g'(b)`` for a maximum), ``g'`` decreases on
  the region, so ``g`` is concave there and ``g(x) <= g(a) + g'(a) (b - a)`` for ``x`` in
  ``[a, b]``; a minimum is the mirror case;
* ``b_up = max g`` and ``b_lo = min g`` (over the candidates, each bounded as above) give the lines
  ``k x + b_lo <= f(x) <= k x + b_up`` on ``[l, u]``: sound for every ``k``.

``relax`` draws both lines with the chord's slope (``(f(u) - f(l)) / (u - l)``): on a convex
piece the upper line is the chord and the lower one the parallel tangent. ``interval`` is the
case ``k = 0`` (``[min f, max f]``, so ``f`` need not be monotone). Everything is computed in
float64 and moved outwards by ``slack(dtype) (1 + |b| + |k| max(|l|, |u|))`` before the cast back:
that covers the error of evaluating ``f`` in the graph's dtype (torch's float32 GELU is off by up
to 1.3e-6 (1 + |f|) on [-30, 30]; ``slack`` is 32 ulps of the dtype: 3.8e-6 in float32). A new smooth activation is ``f``, ``df``, its
breakpoints and its slope limits at -inf and +inf (for the Lipschitz bound ``sup |f'|``, reached
at a breakpoint or at infinity).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bound_types import Interval
from .activation import ElementwiseRelaxation
from .base import NotSupported, register

SLACK = 1e-6   # relative margin of the slope bound


def slack(dtype) -> float:
    """The relative margin of the bounds in ``dtype``: 32 ulps (3.8e-6 in float32)."""
    return 32 * torch.finfo(dtype).eps


class SmoothElementwise(ElementwiseRelaxation):
    """``y = f(x)`` for a smooth ``f``; subclasses give ``f``, ``df``, ``breakpoints(node)`` and
    ``slope_limits`` (``f'`` at -inf and +inf)."""

    iters = 50
    slope_limits: tuple[float, float] = (0.0, 1.0)

    def f(self, node, x):
        raise NotImplementedError

    def df(self, node, x):
        raise NotImplementedError

    def breakpoints(self, node) -> tuple[float, ...]:
        """Sorted points where ``f'`` may change its direction of monotonicity."""
        return ()

    def breakpoints_in(self, node, lo: float, hi: float) -> tuple[float, ...]:
        """The breakpoints that matter on ``[lo, hi]`` (all of them, unless f has infinitely
        many, as a periodic f does)."""
        return self.breakpoints(node)

    def slope_bound(self, node) -> float:
        if not all(math.isfinite(v) for v in self.slope_limits):
            raise NotSupported(self.op, "lipschitz", f"{self.op} has no global slope bound")
        pts = torch.tensor(self.breakpoints(node), dtype=torch.float64)
        vals = [abs(v) for v in self.slope_limits]
        if pts.numel():
            vals.append(float(self.df(node, pts).abs().max()))
        return max(vals) * (1 + SLACK)

    # --- the bound on g(x) = f(x) - k x over [l, u] ------------------------------------------
    def margin(self, node) -> float:
        """An absolute widening of every bound (torch's departure from the formula, if any)."""
        return 0.0

    def _extreme(self, node, l, u, k, upper: bool):
        """A rigorous bound on ``max`` (``upper``) or ``min`` of ``f(x) - k x`` over ``[l, u]``
        (float64, broadcastable). Differentiable in ``k`` (the envelope: the candidates are found
        without gradients, then evaluated with them)."""
        s = 1.0 if upper else -1.0

        def h(x):
            return s * (self.f(node, x) - k * x)

        def dh(x):
            return s * (self.df(node, x) - k)

        l, u = torch.broadcast_tensors(l, u, k.detach())[:2]
        best = torch.maximum(h(l), h(u))
        points = self.breakpoints_in(node, float(l.min()), float(u.max())) if l.numel() else ()
        edges = [-math.inf, *points, math.inf]
        for p in points:
            pt = torch.full_like(l, p)
            inside = (l < pt) & (pt < u)
            best = torch.where(inside, torch.maximum(best, h(pt)), best)
        for lo_e, hi_e in zip(edges[:-1], edges[1:]):
            with torch.no_grad():
                a = l.clamp(min=lo_e) if math.isfinite(lo_e) else l
                b = u.clamp(max=hi_e) if math.isfinite(hi_e) else u
                # an interior maximum of h needs h' >= 0 at a and <= 0 at b (h' monotone here)
                live = (a < b) & (dh(a) >= 0) & (dh(b) <= 0)
                if not bool(live.any()):
                    continue
                a = torch.where(live, a, l)
                b = torch.where(live, b, l)
                for _ in range(self.iters):
                    m = (a + b) / 2
                    up = dh(m) >= 0
                    a = torch.where(up, m, a)
                    b = torch.where(up, b, m)
            # h is concave on the region (h' decreasing through its root): h <= h(a) + h'(a)(x - a)
            bound = h(a) + dh(a).clamp(min=0) * (b - a)
            best = torch.where(live, torch.maximum(best, bound), best)
        return s * best

    def _round(self, v, up: bool, dtype, scale=None):
        """``v`` (float64) moved outwards by ``slack(dtype) (1 + |v| + scale)``, cast."""
        d = slack(dtype) * (1 + v.abs() + (0.0 if scale is None else scale))
        return (v + d if up else v - d).to(dtype)

    def _line(self, node, l, u, k, upper: bool, dtype):
        """The line ``k x + b`` above (``upper``) or below f on ``[l, u]`` for the slope ``k``
        (float64): ``b`` from ``_extreme``, widened for the rounding of k to ``dtype`` (the line
        is evaluated with the rounded k) and by the slack; -> (k, b) in ``dtype``."""
        b = self._extreme(node, l, u, k, upper)
        return self._widen(node, l, u, k, b, 1.0 if upper else -1.0, dtype)

    def _widen(self, node, l, u, k, b, s, dtype):
        """The line ``k x + b`` (float64, ``b`` a bound of ``f - k x`` over ``[l, u]`` from above
        where ``s`` = 1, from below where ``s`` = -1: a number or a tensor of signs) moved
        outwards for the rounding of k to ``dtype`` and by the slack; -> (k, b) in ``dtype``."""
        kd = k.to(dtype)
        far = torch.maximum(l.abs(), u.abs())
        reach = (far * (kd.double() - k).abs()).detach() + self.margin(node)
        kx = kd.double().abs().detach() * far   # the line's values reach |b| + |k| max|x|
        v = b + s * reach
        d = slack(dtype) * (1 + v.abs() + kx)
        return kd, (v + s * d).to(dtype)

    def _chord(self, node, l, u):
        width = u - l
        wide = width > 1e-9
        chord = (self.f(node, u) - self.f(node, l)) / torch.where(wide, width, torch.ones_like(width))
        return torch.where(wide, chord, self.df(node, (l + u) / 2))

    def interval(self, node, inputs):
        (x,) = inputs
        l, u = x.lower.double(), x.upper.double()
        zero = torch.zeros_like(l)
        lo = self._extreme(node, l, u, zero, upper=False) - self.margin(node)
        hi = self._extreme(node, l, u, zero, upper=True) + self.margin(node)
        return Interval(self._round(lo, False, x.lower.dtype), self._round(hi, True, x.upper.dtype))

    def point(self, node, inputs):
        return self.f(node, inputs[0])

    def relax(self, node, l, u):
        dtype = l.dtype
        l, u = l.double(), u.double()
        k = self._chord(node, l, u)
        kl, bl = self._line(node, l, u, k, False, dtype)
        ku, bu = self._line(node, l, u, k, True, dtype)
        return kl, bl, ku, bu


@register("silu")
class SiLU(SmoothElementwise):
    """``x sigmoid(x)`` (Swish): convex on [-2.3994, 2.3994], concave outside; f' from -0.0998 to
    1.0998."""

    slope_limits = (0.0, 1.0)

    def f(self, node, x):
        return F.silu(x)

    def df(self, node, x):
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))

    def breakpoints(self, node):
        return (-2.3993572805154676, 2.3993572805154676)


_SQRT2 = math.sqrt(2.0)


@register("gelu")
class GELU(SmoothElementwise):
    """``x Phi(x)`` (the exact, erf form): ``f'' = phi(x) (2 - x^2)`` changes sign at +-sqrt(2);
    f' from -0.1289 to 1.1289."""

    slope_limits = (0.0, 1.0)

    def f(self, node, x):
        return F.gelu(x)

    def df(self, node, x):
        return 0.5 * (1 + torch.erf(x / _SQRT2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def breakpoints(self, node):
        return (-_SQRT2, _SQRT2)


@register("softplus")
class Softplus(SmoothElementwise):
    """``log(1 + exp(beta x)) / beta`` (params ``beta``, ``threshold``: torch returns ``x`` where
    ``beta x > threshold``, within ``exp(-threshold) / beta`` of the formula): convex."""

    slope_limits = (0.0, 1.0)

    def f(self, node, x):
        return F.softplus(x, node.params.get("beta", 1.0), node.params.get("threshold", 20.0))

    def df(self, node, x):
        return torch.sigmoid(node.params.get("beta", 1.0) * x)

    def _gap(self, node) -> float:
        """Twice torch's largest departure from the smooth formula (the bounds are drawn from
        torch's values with the formula's derivative)."""
        return 2 * math.exp(-node.params.get("threshold", 20.0)) / node.params.get("beta", 1.0)

    def margin(self, node) -> float:
        return self._gap(node)


@register("elu")
class ELU(SmoothElementwise):
    """``x`` for x > 0, ``alpha (exp(x) - 1)`` for x <= 0 (param ``alpha`` >= 0): a kink at 0 when
    alpha != 1, convex on each side."""

    def f(self, node, x):
        return F.elu(x, node.params.get("alpha", 1.0))

    def df(self, node, x):
        a = node.params.get("alpha", 1.0)
        return torch.where(x > 0, torch.ones_like(x), a * torch.exp(x.clamp(max=0)))

    def breakpoints(self, node):
        return (0.0,)

    def slope_bound(self, node) -> float:
        return max(1.0, node.params.get("alpha", 1.0)) * (1 + SLACK)


@register("exp")
class Exp(SmoothElementwise):
    """``exp(x)``: convex and increasing; no global slope bound (no Lipschitz constant)."""

    slope_limits = (0.0, math.inf)

    def f(self, node, x):
        return torch.exp(x)

    def df(self, node, x):
        return torch.exp(x)


@register("abs")
class Abs(SmoothElementwise):
    """``|x|``: convex, a kink at 0."""

    slope_limits = (-1.0, 1.0)

    def f(self, node, x):
        return x.abs()

    def df(self, node, x):
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)

    def breakpoints(self, node):
        return (0.0,)


@register("hardtanh")
class Hardtanh(SmoothElementwise):
    """``clamp(x, min_val, max_val)`` (params ``min_val`` < ``max_val``, either may be infinite;
    ReLU6 is (0, 6))."""

    slope_limits = (0.0, 0.0)

    def f(self, node, x):
        lo, hi = node.params["min_val"], node.params["max_val"]
        return x.clamp(lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None)

    def df(self, node, x):
        p = node.params
        return ((x > p["min_val"]) & (x < p["max_val"])).to(x.dtype)

    def breakpoints(self, node):
        return tuple(v for v in (node.params["min_val"], node.params["max_val"]) if math.isfinite(v))

    def slope_bound(self, node) -> float:
        return 1.0


@register("hardsigmoid")
class Hardsigmoid(SmoothElementwise):
    """``clamp(alpha x + beta, 0, 1)`` (params ``alpha`` > 0, ``beta``; torch: 1/6 and 1/2)."""

    slope_limits = (0.0, 0.0)

    def f(self, node, x):
        p = node.params
        return (p["alpha"] * x + p["beta"]).clamp(0.0, 1.0)

    def df(self, node, x):
        p = node.params
        z = p["alpha"] * x + p["beta"]
        return ((z > 0) & (z < 1)).to(x.dtype) * p["alpha"]

    def breakpoints(self, node):
        p = node.params
        return (-p["beta"] / p["alpha"], (1 - p["beta"]) / p["alpha"])

    def slope_bound(self, node) -> float:
        return node.params["alpha"] * (1 + SLACK)


@register("hardswish")
class Hardswish(SmoothElementwise):
    """``x relu6(x + 3) / 6``: 0 below -3, ``x (x + 3) / 6`` (convex) on [-3, 3], x above 3;
    f' from -0.5 to 1.5."""

    slope_limits = (0.0, 1.0)

    def f(self, node, x):
        return F.hardswish(x)

    def df(self, node, x):
        mid = (2 * x + 3) / 6
        return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), mid))

    def breakpoints(self, node):
        return (-3.0, 3.0)


class Periodic(SmoothElementwise):
    """``sin(x + phase)``: f' = cos(x + phase) turns at ``x = k pi - phase``; only those inside
    the inputs' range are used, and past ``MAX_TURNS`` of them the bounds are the constant
    lines -1 and 1."""

    phase = 0.0
    slope_limits = (1.0, 1.0)
    MAX_TURNS = 64

    def f(self, node, x):
        return torch.sin(x + self.phase) if self.phase else torch.sin(x)

    def df(self, node, x):
        return torch.cos(x + self.phase) if self.phase else torch.cos(x)

    def breakpoints_in(self, node, lo, hi):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return ()
        k0, k1 = math.floor((lo + self.phase) / math.pi), math.ceil((hi + self.phase) / math.pi)
        if k1 - k0 > self.MAX_TURNS:
            return None
        return tuple(k * math.pi - self.phase for k in range(k0, k1 + 1))

    def slope_bound(self, node) -> float:
        return 1.0

    def _extreme(self, node, l, u, k, upper: bool):
        if not (l.numel() and math.isfinite(float(l.min())) and math.isfinite(float(u.max()))) \
                or self.breakpoints_in(node, float(l.min()), float(u.max())) is None:
            # too wide a range (or none): |sin| <= 1, so f - kx lies within -1 - kx and 1 - kx
            # max of 1 - kx is at l for k >= 0 (else u); min of -1 - kx at u for k >= 0 (else l)
            far = torch.where(k.detach() >= 0, l, u) if upper else torch.where(k.detach() >= 0, u, l)
            return (1.0 if upper else -1.0) - k * far
        return super()._extreme(node, l, u, k, upper)


@register("sin")
class Sin(Periodic):
    """``sin(x)`` (SIREN): turns of f' at k pi."""


@register("cos")
class Cos(Periodic):
    """``cos(x) = sin(x + pi / 2)``: turns of f' at k pi - pi / 2."""

    phase = math.pi / 2

    def f(self, node, x):
        return torch.cos(x)

    def df(self, node, x):
        return -torch.sin(x)
