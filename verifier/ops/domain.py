"""Element-wise functions with a domain: ``pow`` with a constant exponent, ``sqrt``, ``rsqrt``,
``reciprocal``, ``log``.

They are bounded by the generic smooth rule (``verifier.ops.smooth``: rigorous bounds of
``f - k x`` over ``[l, u]``, float64 inside, widened by the slack of the dtype), after a check of
the domain: where an input interval leaves it (``log``/``rsqrt``/``reciprocal`` over an interval
that reaches 0, ``sqrt`` below 0), no finite sound bound exists, and the rule raises a typed
``DomainError`` naming the node, the op and the offending interval rather than returning NaN or
inf. Bounds that overflow the dtype (``reciprocal`` of 1e-40 in float32) raise it too.

Domains, by exponent ``p`` of ``pow`` (torch semantics, ``torch.pow(x, p)``):

* integer ``p >= 0``: all of R; even ``p`` is convex, odd ``p >= 3`` is concave on x <= 0 and
  convex on x >= 0 (a breakpoint at 0 for the generic rule);
* integer ``p < 0``: x != 0, each interval wholly on one side of 0 (``reciprocal``: p = -1);
* non-integer ``p > 0``: x >= 0 (``sqrt``: p = 1/2; f'(0) is infinite for p < 1);
* non-integer ``p < 0``: x > 0 (``rsqrt``: p = -1/2).

Where the function is convex (or concave) on ``[l, u]`` the upper (lower) line is the chord,
and the other line may be the tangent at any point ``t`` of ``[l, u]``: it lies on the side of
``f`` it bounds on the whole convex piece. CROWN takes the tangent parallel to the chord (the
generic rule's line); alpha-CROWN optimizes the point's position ``tau`` in [0, 1] on
``[t0, t1]`` (geometric where one-signed: ``t = t0 (t1 / t0)^tau``, else linear) per neuron, spec
row and bound direction (``alpha_init``), starting at CROWN's point. The tangent's
bias ``f(t) - f'(t) t`` is exact in float64 (the least of ``f - f'(t) x`` over the piece is at
``t``), then widened as every generic line.

These tangent points replace the generic smooth rule's free slopes (``SmoothElementwise.
slope_table``: slopes spread evenly over ``[min f', max f']``): on a convex (concave) piece the
tangents are the best lower (upper) lines of every slope, the chord the best line on the other
side, and the positions are exact (no table) and geometric, where 1/x or log have slopes over
orders of magnitude and sqrt's f' is unbounded at 0. Where no piece is convex or concave (odd
``p >= 3`` across 0) CROWN's lines are kept.
"""
from __future__ import annotations

import math

import torch

from ..shapes import broadcast_shapes
from ..bound_types import Interval
from ..errors import DomainError
from .base import BoundRule, NotSupported, register
from .smooth import SmoothElementwise, slack

_DOMAINS = {"positive": "x > 0", "nonnegative": "x >= 0",
            "nonzero": "x != 0 (each interval wholly on one side of 0)"}


def _is_int(p: float) -> bool:
    return math.isfinite(p) and float(p) == round(p)


class DomainElementwise(SmoothElementwise):
    """A smooth function on ``domain(node)`` (None: all of R; "positive", "nonnegative",
    "nonzero"), with a known sign of ``f''`` per interval (``convexity``) for alpha-CROWN's
    tangent lines, and a floor of its range (``floor``: the interval's lower end is kept at it,
    e.g. 0 for even powers, so that ``var + eps`` stays positive after a square)."""

    bisect_iters = 60
    # alpha-CROWN: the rule's own parameters (tangent points, ``alpha_init`` and ``_lines``), not
    # the generic slopes of ``SmoothElementwise`` (see the module doc), at the full learning rate
    alpha_lr = 1.0
    # no interval splits in branch and bound (not tested on restricted domains)
    split_point = BoundRule.split_point

    def domain(self, node) -> str | None:
        return None

    def floor(self, node) -> float | None:
        return None

    def convexity(self, node, l, u) -> torch.Tensor:
        """+1 where ``f`` is convex on ``[l, u]``, -1 where concave, 0 otherwise (int8)."""
        return torch.zeros(l.shape, dtype=torch.int8, device=l.device)

    def describe(self, node) -> str:
        return self.op

    def monotone(self, node, l, u) -> torch.Tensor:
        """Where ``f`` is monotone on ``[l, u]`` (bool)."""
        return torch.ones(l.shape, dtype=torch.bool, device=l.device)

    # --- the domain ----------------------------------------------------------------------------
    def check(self, node, l, u) -> None:
        """Raise ``DomainError`` where an interval ``[l, u]`` leaves the domain (NaN too)."""
        dom = self.domain(node)
        if dom is None:
            bad = torch.isnan(l) | torch.isnan(u)
        elif dom == "positive":
            bad = ~(l > 0)
        elif dom == "nonnegative":
            bad = ~(l >= 0)
        else:
            bad = ~((l > 0) | (u < 0))
        if bool(bad.any()):
            # the worst element: the least lower end among the offending ones (NaN first)
            score = torch.where(bad, -l.double().nan_to_num(nan=-math.inf), -math.inf)
            i = int(score.flatten().argmax())
            raise DomainError(node.name, self.describe(node), _DOMAINS.get(dom, "x in R"),
                              float(l.flatten()[i]), float(u.flatten()[i]), int(bad.sum()),
                              bad.numel())

    def finite(self, node, l, u, *vals) -> None:
        """Raise ``DomainError`` where a bound overflows (not finite in the dtype)."""
        bad = torch.zeros(broadcast_shapes(*(v.shape for v in vals)), dtype=torch.bool, device=l.device)
        for v in vals:
            bad = bad | ~torch.isfinite(v)
        if bool(bad.any()):
            bad = bad.expand(l.shape) if bad.shape != l.shape else bad
            i = int(bad.flatten().nonzero()[0])
            raise DomainError(node.name, self.describe(node), _DOMAINS.get(self.domain(node), "x in R"),
                              float(l.flatten()[i]), float(u.flatten()[i]), int(bad.sum()), bad.numel(),
                              why=f"its bounds overflow {l.dtype}")

    # --- the generic rule, guarded -------------------------------------------------------------
    def _mid(self, a, b):
        """A point strictly inside ``(a, b)`` for the bisection: the middle, or the geometric
        middle where ``0 < a`` and ``b`` is far above it (``[0.5, 1e30]``: 50 halvings would
        leave a bracket of 1e15; on a log scale they leave one of 1 + 1e-13 relative), or
        where the bracket reaches infinity."""
        mid = (a + b) / 2
        far = (a > 0) & (b > 4 * a)
        geo = torch.sqrt(a.clamp(min=1e-300)) * torch.sqrt(b)
        mid = torch.where(far & torch.isfinite(geo), geo, mid)
        nfar = (b < 0) & (a < 4 * b)
        ngeo = -torch.sqrt((-b).clamp(min=1e-300)) * torch.sqrt(-a)
        mid = torch.where(nfar & torch.isfinite(ngeo), ngeo, mid)
        return torch.where(torch.isfinite(mid), mid, torch.where(a > 0, 2 * a + 1, 2 * b - 1))

    def _extreme(self, node, l, u, k, upper, iters: int | None = None):
        """As the generic bound (``upper``: a bool or a bool tensor; ``iters`` bisection steps),
        with a fallback where it is not finite (a root of ``f' = k`` too close to a point where
        ``f'`` is infinite, e.g. sqrt at 0): ``f`` is monotone on ``[l, u]`` there, so
        ``max f(x) - k x <= max(f(l), f(u)) - min(k l, k u)`` (and the mirror bound for the least
        value)."""
        got = super()._extreme(node, l, u, k, upper, iters)
        bad = ~torch.isfinite(got) & self.monotone(node, l, u)   # the rest: an overflow error
        if not bool(bad.any()):
            return got
        fl, fu = self.f(node, l), self.f(node, u)
        # k x with k = 0 is 0 even at an infinite end (reciprocal over [1, inf]: 1/inf = 0)
        kl = torch.where(k == 0, torch.zeros_like(l), k * l)
        ku = torch.where(k == 0, torch.zeros_like(u), k * u)
        alt = torch.where(torch.as_tensor(upper, device=l.device), torch.maximum(fl, fu) - torch.minimum(kl, ku),
                          torch.minimum(fl, fu) - torch.maximum(kl, ku))
        return torch.where(bad, alt, got)

    def _chord(self, node, l, u):
        k = super()._chord(node, l, u)
        return torch.where(torch.isfinite(k), k, torch.zeros_like(k))   # any slope is sound

    def interval(self, node, inputs):
        (x,) = inputs
        self.check(node, x.lower, x.upper)
        iv = super().interval(node, inputs)
        lo, hi = iv.lower, iv.upper
        mono = self.monotone(node, x.lower, x.upper)
        if bool(mono.any()):
            # a monotone f: its range is between its values at the ends, also where an end is
            # infinite (1 / inf = 0), which the generic bound (bisection) cannot handle
            l, u = x.lower.double(), x.upper.double()
            fl, fu = self.f(node, l), self.f(node, u)
            s = slack(lo.dtype)
            m_lo, m_hi = torch.minimum(fl, fu), torch.maximum(fl, fu)
            m_lo = (m_lo - s * (1 + m_lo.abs())).to(lo.dtype)
            m_hi = (m_hi + s * (1 + m_hi.abs())).to(lo.dtype)
            lo = torch.where(mono & ~(lo >= m_lo), m_lo, lo)   # NaN in the generic bound too
            hi = torch.where(mono & ~(hi <= m_hi), m_hi, hi)
        fl = self.floor(node)
        if fl is not None:
            lo = lo.clamp(min=fl)
        self.finite(node, x.lower, x.upper, lo, hi)
        return Interval(lo, hi)

    def relax(self, node, l, u):
        self.check(node, l, u)
        lines = super().relax(node, l, u)
        self.finite(node, l, u, *lines)
        return lines

    # --- alpha-CROWN: tangent points ----------------------------------------------------------
    def tangent_ranges(self, node, x: Interval):
        """-> (free, convexity, t0, t1), float64 ``[B, *shape]`` (cached like ``relaxation``):
        where ``free``, the lower line (convex) or the upper line (concave) may be the tangent at
        any point of ``[t0, t1]``: ``[l, u]``, except that ``t0`` moves off the domain's
        closed edge 0 (sqrt, x^1.5: f' or f'' infinite there) by 2^-20 of the width."""
        cache = x.cache
        key = ("tangents",) + self._key(node, x)
        if key not in cache:
            l, u = x.lower.double(), x.upper.double()
            self.check(node, x.lower, x.upper)
            cv = self.convexity(node, l, u)
            # off the domain's closed edge 0 (x^p, 0 < p: f' or f'' is infinite there, and so
            # is the gradient of the tangent's slope)
            edge = (l <= 0) if self.domain(node) == "nonnegative" else ~torch.isfinite(self.df(node, l))
            t0 = torch.where(edge, l + (u - l) * 2.0 ** -20, l)
            free = (cv != 0) & (u - l > 1e-9) & torch.isfinite(self.df(node, t0)) \
                & torch.isfinite(self.df(node, u))
            cache[key] = (free, cv, t0, u)
        return cache[key]

    def alpha_init(self, node, inputs, B, S, dtype):
        """Tangent positions ``tau`` in [0, 1] ``[B, S, *shape]`` where a line may be any
        tangent (``tangent_ranges``), starting at CROWN's: the tangent parallel to the chord,
        found by bisection of the monotone ``f'`` (0.5 elsewhere, where it is not used)."""
        x = inputs[0]
        free, cv, t0, t1 = self.tangent_ranges(node, x)
        if not bool(free.any()):
            return None
        l, u = x.lower.double(), x.upper.double()
        k = self._chord(node, l, u)
        lo, hi = t0.clone(), t1.clone()
        rising = cv > 0   # f' increases on a convex piece
        with torch.no_grad():
            for _ in range(self.bisect_iters):
                m = (lo + hi) / 2
                below = torch.where(rising, self.df(node, m) < k, self.df(node, m) > k)
                lo = torch.where(below, m, lo)
                hi = torch.where(below, hi, m)
        tau = torch.where(free, self._position(t0, t1, (lo + hi) / 2), torch.full_like(t0, 0.5))
        return tau.clamp(0, 1).to(dtype).unsqueeze(1).expand(B, S, *node.shape), 0.0, 1.0

    @staticmethod
    def _geometric(t0, t1):
        """Where ``[t0, t1]`` is one-signed, positions are geometric (``t = t0 (t1 / t0)^tau``:
        as fine near the end closest to 0, where 1/x, log, rsqrt bend, as far from it); -> (mask,
        log(t1 / t0), 1 elsewhere)."""
        geo = t0 * t1 > 0
        return geo, torch.where(geo, torch.log(torch.where(geo, t1 / t0, 2.0)), 1.0)

    def _point(self, t0, t1, tau):
        """The tangent point of position ``tau`` in [0, 1] on ``[t0, t1]`` (inside it)."""
        geo, span = self._geometric(t0, t1)
        t = torch.where(geo, t0 * torch.exp(tau * span), t0 + tau * (t1 - t0))
        return torch.minimum(torch.maximum(t, torch.minimum(t0, t1)), torch.maximum(t0, t1))

    def _position(self, t0, t1, t):
        """The inverse of ``_point``."""
        geo, span = self._geometric(t0, t1)
        lin = (t - t0) / torch.where(t1 != t0, t1 - t0, 1.0)
        return torch.where(geo, torch.log(torch.where(geo, t / t0, 2.0)) / span, lin)

    def _lines(self, node, x: Interval, tau):
        """The lines of the tangent positions ``tau: [B, S, *shape]`` where free, else
        ``relax``'s: -> kl, bl, ku, bu, each ``[B, S, *shape]`` in the graph's dtype."""
        dtype = x.lower.dtype
        kl, bl, ku, bu = (v.unsqueeze(1) for v in self.relaxation(node, x))
        free, cv, t0, t1 = (v.unsqueeze(1) for v in self.tangent_ranges(node, x))
        l, u = x.lower.double().unsqueeze(1), x.upper.double().unsqueeze(1)
        tau = tau.double()
        # where unused, a constant point: no gradient reaches tau through an infinite f'' there
        t = torch.where(free, self._point(t0, t1, tau), t1.expand_as(tau))
        k = self.df(node, t)
        b = self.f(node, t) - k * t
        s = torch.where(cv > 0, -1.0, 1.0).to(torch.float64)   # convex: the tangent is below
        kt, bt = self._widen(node, l, u, k, b, s, dtype)
        lower, upper = free & (cv > 0), free & (cv < 0)
        return (torch.where(lower, kt, kl), torch.where(lower, bt, bl),
                torch.where(upper, kt, ku), torch.where(upper, bt, bu))


@register("pow")
class Pow(DomainElementwise):
    """``torch.pow(x, p)`` for a constant exponent ``p`` (param ``exponent``; see the module doc
    for its domain)."""

    def exponent(self, node) -> float:
        return float(node.params["exponent"])

    def describe(self, node) -> str:
        return f"{self.op} {self.exponent(node):g}"

    def f(self, node, x):
        return torch.pow(x, self.exponent(node))

    def df(self, node, x):
        p = self.exponent(node)
        if p == 0:
            return torch.zeros_like(x)
        if p == 1:
            return torch.ones_like(x)
        return p * torch.pow(x, p - 1)

    def domain(self, node):
        p = self.exponent(node)
        if _is_int(p):
            return None if p >= 0 else "nonzero"
        return "nonnegative" if p > 0 else "positive"

    def floor(self, node):
        p = self.exponent(node)
        return 0.0 if not _is_int(p) or int(p) % 2 == 0 else None

    def breakpoints(self, node):
        p = self.exponent(node)
        # odd powers turn f' at 0; negative integer powers are never bounded across 0
        return (0.0,) if _is_int(p) and (p < 0 or (p >= 3 and int(p) % 2 == 1)) else ()

    def monotone(self, node, l, u):
        p = self.exponent(node)
        if _is_int(p) and p > 0 and int(p) % 2 == 0:
            return (l >= 0) | (u <= 0)
        return torch.ones(l.shape, dtype=torch.bool, device=l.device)

    def convexity(self, node, l, u):
        p = self.exponent(node)
        one = torch.ones(l.shape, dtype=torch.int8, device=l.device)
        if p in (0.0, 1.0):
            return 0 * one
        if not _is_int(p):
            return one if (p > 1 or p < 0) else -one
        if int(p) % 2 == 0:
            return one   # even: convex on R (p > 0) and on each side of 0 (p < 0)
        # odd: x^p (p >= 3) and x^p (p < 0) are convex on x > 0, concave on x < 0
        return torch.where(l >= 0, one, torch.where(u <= 0, -one, 0 * one))

    def slope_bound(self, node):
        p = self.exponent(node)
        if p in (0.0, 1.0):
            return p
        raise NotSupported(self.op, "lipschitz", f"x^{p:g} has no global slope bound on its domain")


@register("sqrt")
class Sqrt(Pow):
    """``sqrt(x)`` on x >= 0: concave, increasing, f'(0) infinite."""

    def exponent(self, node):
        return 0.5

    def describe(self, node):
        return self.op

    def f(self, node, x):
        return torch.sqrt(x)

    def df(self, node, x):
        return 0.5 / torch.sqrt(x)


@register("rsqrt")
class Rsqrt(Pow):
    """``1 / sqrt(x)`` on x > 0: convex, decreasing."""

    def exponent(self, node):
        return -0.5

    def describe(self, node):
        return self.op

    def f(self, node, x):
        return torch.rsqrt(x)

    def df(self, node, x):
        return -0.5 * torch.rsqrt(x) / x


@register("reciprocal")
class Reciprocal(Pow):
    """``1 / x`` on intervals wholly above 0 (convex, decreasing) or below 0 (concave,
    decreasing)."""

    def exponent(self, node):
        return -1.0

    def describe(self, node):
        return self.op

    def f(self, node, x):
        return torch.reciprocal(x)

    def df(self, node, x):
        return -torch.reciprocal(x * x)

    def softmax_logits(self, node, graph) -> str | None:
        """The node holding the logits when this node is a softmax (``softmax_dim``: the graph
        builder's ``1 / sum_j exp(a_j - a_i)``), else None."""
        if "softmax_dim" not in node.params:
            return None
        s = graph[node.inputs[0]]
        e = graph[s.inputs[0]] if s.op == "reduce_sum" else None
        d = graph[e.inputs[0]] if e is not None and e.op == "exp" else None
        return d.inputs[0] if d is not None and d.op == "pairdiff" else None

    def lipschitz_on(self, node, ctx):
        """A softmax over rows is 1/2-Lipschitz in L2 on every domain: per row its Jacobian
        ``diag(p) - p p^T`` is symmetric, and Gershgorin bounds its eigenvalues by
        ``p_i (1 - p_i) + p_i sum_{j != i} p_j = 2 p_i (1 - p_i) <= 1/2``; the logits range over
        all of R^n (convex), so the mean value inequality gives the bound, and rows are disjoint.
        Any other ``1/x``: slope ``1 / min |x|^2`` on an interval that excludes 0."""
        logits = self.softmax_logits(node, ctx.graph)
        if logits is not None:
            return 0.5 * ctx.L[logits], 0.5, "softmax (Jacobian norm <= 1/2)"
        (i,) = node.inputs
        iv = ctx.box[i]
        if bool(((iv.lower <= 0) & (iv.upper >= 0)).any()):
            raise NotSupported(self.op, "lipschitz", "1/x on an interval that holds 0")
        m = float(torch.minimum(iv.lower.abs(), iv.upper.abs()).double().min())
        c = 1.0 / (m * m)
        return c * ctx.L[i], c, "1/x's slope on the domain"

    def norm_on(self, node, ctx):
        """A softmax: each row is a probability vector (L2 norm <= 1), so ``sqrt(rows)``."""
        if self.softmax_logits(node, ctx.graph) is None:
            raise NotSupported(self.op, "norm_on")
        d = node.params["softmax_dim"]
        return math.sqrt(math.prod(node.shape) / node.shape[d])


@register("log")
class Log(DomainElementwise):
    """``log(x)`` (natural) on x > 0: concave, increasing."""

    def f(self, node, x):
        return torch.log(x)

    def df(self, node, x):
        return torch.reciprocal(x)

    def domain(self, node):
        return "positive"

    def convexity(self, node, l, u):
        return -torch.ones(l.shape, dtype=torch.int8, device=l.device)

    def slope_bound(self, node):
        raise NotSupported(self.op, "lipschitz", "log has no global slope bound on x > 0")
