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

alpha-CROWN frees both slopes: each line may take any slope in ``[min f', max f']`` over [l, u]
(``slope_table``, ``optimized_lines``), with intercepts tabled per neuron at evenly spread
slopes and interpolated between them (rigorous: ``min (f - kx)`` is concave in ``k``, ``max``
convex), so that an optimizer step costs a lookup rather than a bisection per spec row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bound_types import Interval
from .activation import ElementwiseRelaxation
from .base import NotSupported, register

SLACK = 1e-6   # relative margin of the slope bound
TABLE_ELEMENTS = 2 ** 22   # entries of one alpha-CROWN line table (``slope_table``), at most


def slack(dtype) -> float:
    """The relative margin of the bounds in ``dtype``: 32 ulps (3.8e-6 in float32)."""
    return 32 * torch.finfo(dtype).eps


def _sign(upper):
    """+1 where ``upper`` (a bool or a bool tensor), else -1 (float64 where a tensor)."""
    if isinstance(upper, torch.Tensor):
        return upper.to(torch.float64) * 2 - 1
    return 1.0 if upper else -1.0


class SmoothElementwise(ElementwiseRelaxation):
    """``y = f(x)`` for a smooth ``f``; subclasses give ``f``, ``df``, ``breakpoints(node)`` and
    ``slope_limits`` (``f'`` at -inf and +inf)."""

    iters = 50
    # alpha-CROWN (``slope_table``): slopes tabled per neuron, bisection steps for their
    # intercepts (loose by at most sup|f''| (width / 2^30)^2, or the slope's jump times
    # width / 2^30 at a kink), and the learning-rate factor (the best slopes lie inside their
    # range, where ReLU's are at its ends)
    alpha_grid = 257
    alpha_iters = 30
    alpha_lr = 0.025
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

    def _extreme(self, node, l, u, k, upper, iters: int | None = None):
        """A rigorous bound on ``max`` (``upper``) or ``min`` of ``f(x) - k x`` over ``[l, u]``
        (float64, broadcastable; ``upper``: a bool, or a bool tensor choosing per element).
        Differentiable in ``k`` (the envelope: the candidates are found without gradients, then
        evaluated with them). ``iters``: bisection steps (default ``self.iters``); fewer steps
        leave a wider bracket and a looser, still rigorous, bound."""
        s = _sign(upper)
        iters = self.iters if iters is None else iters

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
                for _ in range(iters):
                    m = (a + b) / 2
                    up = dh(m) >= 0
                    a = torch.where(up, m, a)
                    b = torch.where(up, b, m)
            # h is concave on the region (h' decreasing through its root): h <= h(a) + h'(a)(x - a)
            bound = h(a) + dh(a).clamp(min=0) * (b - a)
            best = torch.where(live, torch.maximum(best, bound), best)
        return s * best

    def _round(self, v, up, dtype, scale=None):
        """``v`` (float64) moved outwards (up where ``up``: a bool or a bool tensor) by
        ``slack(dtype) (1 + |v| + scale)``, cast."""
        d = slack(dtype) * (1 + v.abs() + (0.0 if scale is None else scale))
        return (v + _sign(up) * d).to(dtype)

    def _line(self, node, l, u, k, upper, dtype, iters: int | None = None):
        """The line ``k x + b`` above (``upper``: a bool or a bool tensor) or below f on
        ``[l, u]`` for the slope ``k`` (float64): ``b`` from ``_extreme``, widened for the
        rounding of k to ``dtype`` (the line is evaluated with the rounded k) and by the slack;
        -> (k, b) in ``dtype``."""
        return self._cast_line(node, l, u, k, self._extreme(node, l, u, k, upper, iters), upper, dtype)

    def _cast_line(self, node, l, u, k, b, upper, dtype):
        """The line ``k x + b`` (float64, ``b`` a rigorous intercept for the slope ``k``) in
        ``dtype``: widened for the rounding of k (the line is evaluated with the rounded k),
        ``margin`` and the slack; -> (k, b)."""
        kd = k.to(dtype)
        far = torch.maximum(l.abs(), u.abs())
        reach = (far * (kd.double() - k).abs()).detach() + self.margin(node)
        kx = kd.double().abs().detach() * far   # the line's values reach |b| + |k| max|x|
        return kd, self._round(b + _sign(upper) * reach, upper, dtype, kx)

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

    # --- alpha-CROWN: the slopes of both lines are free ------------------------------------
    def slope_table(self, node, x: Interval):
        """-> (free ``[B, n]``, ks ``[B, n, G]``, bs ``[B, n, 2G]``), float64, cached on ``x``
        like ``relaxation``: the lines alpha-CROWN chooses from (see ``optimized_lines``).

        For each neuron, the slopes ``ks`` (sorted) spread evenly over ``[k0, k1] = [min f',
        max f']`` on [l, u] (f' is monotone between breakpoints: its extremes are at l, u and
        beside the breakpoints inside), plus the chord's slope (``relax``'s lines), and in ``bs``
        rigorous bounds on ``min`` (the first G) and on ``max`` (the last G) of ``f(x) - k x``
        over [l, u] at each slope (``_extreme``). ``free``: where [k0, k1] is not a point and everything is finite (the
        other neurons keep ``relax``'s lines, and zeros in the tables). ``G`` is ``alpha_grid``,
        fewer where ``B n G`` would pass ``TABLE_ELEMENTS``."""
        cache = x.cache
        key = ("slope_table",) + self._key(node, x)
        if key in cache:
            return cache[key]
        B = x.lower.shape[0]
        l, u = x.lower.double().reshape(B, -1), x.upper.double().reshape(B, -1)
        kl, bl, ku, bu = (t.reshape(B, -1) for t in self.relaxation(node, x))
        dl, du = self.df(node, l), self.df(node, u)
        k0, k1 = torch.minimum(dl, du), torch.maximum(dl, du)
        pts = self.breakpoints_in(node, float(l.min()), float(u.max())) if l.numel() else ()
        for p in pts or ():
            inside = (l < p) & (p < u)
            if bool(inside.any()):
                step = 1e-9 * (1 + abs(p))   # both one-sided slopes at a kink
                d = self.df(node, torch.tensor([p - step, p, p + step], dtype=torch.float64))
                k0 = torch.where(inside, torch.minimum(k0, d.min()), k0)
                k1 = torch.where(inside, torch.maximum(k1, d.max()), k1)
        # the chord's slope is in [min f', max f'] (mean value), up to torch's departures from
        # the formula (Softplus's threshold): kept in range, so the start is relax's lines
        k0, k1 = torch.minimum(k0, kl.double()), torch.maximum(k1, kl.double())
        free = (u > l) & torch.isfinite(l) & torch.isfinite(u) & torch.isfinite(k0) & \
            torch.isfinite(k1) & (k1 - k0 > 1e-9 * (1 + k0.abs() + k1.abs()))
        for t in (kl, bl, ku, bu):
            free &= torch.isfinite(t)
        if pts is None:   # too many breakpoints in the inputs' range (Periodic): no freedom
            free = torch.zeros_like(free)
        G = max(9, min(self.alpha_grid, TABLE_ELEMENTS // max(1, l.numel())))
        ks = torch.zeros(*l.shape, G, dtype=torch.float64)
        bs = torch.zeros(*l.shape, 2 * G, dtype=torch.float64)
        if bool(free.any()):
            a, c = k0[free].unsqueeze(-1), k1[free].unsqueeze(-1)
            chord = kl[free].double().unsqueeze(-1)
            kf = torch.cat([a + torch.linspace(0, 1, G - 1, dtype=torch.float64) * (c - a), chord],
                           -1).sort(-1).values
            lf, uf = l[free].unsqueeze(-1), u[free].unsqueeze(-1)
            with torch.no_grad():
                lof = self._extreme(node, lf, uf, kf, False, self.alpha_iters)
                hif = self._extreme(node, lf, uf, kf, True, self.alpha_iters)
            ok = torch.isfinite(lof).all(-1) & torch.isfinite(hif).all(-1)
            ks[free] = torch.where(ok.unsqueeze(-1), kf, 0.0)
            bs[free] = torch.where(ok.unsqueeze(-1), torch.cat([lof, hif], -1), 0.0)
            free[free.clone()] = ok
        cache[key] = (free, ks, bs)
        return cache[key]

    def alpha_init(self, node, inputs, B, S, dtype):
        """The slope of each free neuron's lower and upper line as a position ``tau`` in
        [0, 1] along its tabled slopes (``slope_table``): ``[2, B, S, *shape]`` (lower line,
        upper line), starting at the chord's slope (``relax``'s lines)."""
        x = inputs[0]
        free, ks, _ = self.slope_table(node, x)
        if not bool(free.any()):
            return None
        G = ks.shape[-1]
        chord = self.relaxation(node, x)[0].double().reshape(*free.shape, 1)
        j = (torch.searchsorted(ks, chord) - 1).clamp(0, G - 2)
        k_j, k_j1 = ks.gather(-1, j), ks.gather(-1, j + 1)
        th = ((chord - k_j) / torch.where(k_j1 > k_j, k_j1 - k_j, 1.0)).clamp(0, 1)
        tau = torch.where(free, ((j + th) / (G - 1)).squeeze(-1), 0.0)
        return tau.to(dtype).reshape(1, B, 1, *node.shape).expand(2, B, S, *node.shape), 0.0, 1.0

    def optimized_lines(self, node, x: Interval, tau, upper):
        """The line at slope position ``tau`` (``[B, T, *shape]``, in [0, 1]) above f where
        ``upper`` (a bool tensor of that shape), else below, for every free neuron; ``relax``'s
        line elsewhere: -> (k, b) in the graph's dtype.

        Position ``tau`` falls between two tabled slopes (``slope_table``); the line takes the
        slope and the intercept interpolated between theirs. That intercept is rigorous:
        ``min (f - k x)`` over [l, u] is a minimum of functions affine in ``k``, so concave in
        ``k`` and at least its chord between two tabled slopes (``max (f - k x)`` is convex, at
        most its chord). The bound is piecewise linear in ``tau``, one lookup per entry."""
        dtype = x.lower.dtype
        free, ks, bs = self.slope_table(node, x)
        B, T, n, G = tau.shape[0], tau.shape[1], free.shape[1], ks.shape[-1]
        kl, bl, ku, bu = (v.reshape(B, 1, n) for v in self.relaxation(node, x))
        up = upper.reshape(B, T, n)
        pos = tau.reshape(B, T, n).double().clamp(0, 1) * (G - 1)
        j = pos.detach().floor().clamp(max=G - 2)
        th = pos - j                                    # in [0, 1], carries the gradient
        idx = j.long().unsqueeze(-1) + torch.tensor([0, 1])                  # [B, T, n, 2]
        kk = torch.gather(ks.unsqueeze(1).expand(B, T, n, G), 3, idx)
        bb = torch.gather(bs.unsqueeze(1).expand(B, T, n, 2 * G), 3, idx + G * up.unsqueeze(-1))
        k = kk[..., 0] + th * (kk[..., 1] - kk[..., 0])
        b = bb[..., 0] + th * (bb[..., 1] - bb[..., 0])
        l = torch.where(free, x.lower.reshape(B, n), 0).double().unsqueeze(1)
        u = torch.where(free, x.upper.reshape(B, n), 0).double().unsqueeze(1)
        # the float64 rounding of the two interpolations, moved outwards
        err = 4 * torch.finfo(torch.float64).eps * (
            bb.abs().sum(-1) + kk.abs().sum(-1) * torch.maximum(l.abs(), u.abs()))
        kd, bd = self._cast_line(node, l, u, k, b + _sign(up) * err, up, dtype)
        sel = free.unsqueeze(1)
        k_out = torch.where(sel, kd, torch.where(up, ku, kl))
        b_out = torch.where(sel, bd, torch.where(up, bu, bl))
        return k_out.reshape(upper.shape), b_out.reshape(upper.shape)

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """With ``alpha`` (alpha-CROWN): ``(tau for the lower bound, tau for the upper bound)``,
        each ``[2, B, S, *shape]`` (the slope positions of the lower and the upper line, see
        ``alpha_init``). Each entry of A takes one line (for the lower bound: the lower line
        where A >= 0, else the upper one; the reverse for the upper bound), so one line per
        entry is looked up, for both bounds in one pass."""
        if alpha is None:
            return super().backward(node, A_lower, A_upper, inputs, beta=beta)
        (x,) = inputs
        S = A_lower.shape[1]
        A = torch.cat([A_lower, A_upper], 1)
        upper = torch.cat([A_lower < 0, A_upper >= 0], 1)
        tau = torch.cat([torch.where(upper[:, :S], alpha[0][1], alpha[0][0]),
                         torch.where(upper[:, S:], alpha[1][1], alpha[1][0])], 1)
        k, b = self.optimized_lines(node, x, tau, upper)
        A_new = A * k
        bias = (A * b).flatten(2).sum(-1)
        return [(A_new[:, :S], A_new[:, S:])], bias[:, :S], bias[:, S:]


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

    def _extreme(self, node, l, u, k, upper, iters=None):
        if not (l.numel() and math.isfinite(float(l.min())) and math.isfinite(float(u.max()))) \
                or self.breakpoints_in(node, float(l.min()), float(u.max())) is None:
            # too wide a range (or none): |sin| <= 1, so f - kx lies within -1 - kx and 1 - kx
            # max of 1 - kx is at l for k >= 0 (else u); min of -1 - kx at u for k >= 0 (else l)
            far = torch.where((k.detach() >= 0) == torch.as_tensor(upper), l, u)
            return _sign(upper) - k * far
        return super()._extreme(node, l, u, k, upper, iters)


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
