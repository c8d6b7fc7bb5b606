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
from .activation import ElementwiseRelaxation, split_multipliers
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


def _products(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A * b`` with ``0 * inf = 0``: a line's offset may be +-inf (a flat line where no finite
    line bounds f, ``SmoothElementwise._finite_or_flat``)."""
    prod = A * b
    if bool(torch.isfinite(b).all()):
        return prod
    return torch.where(A == 0, torch.zeros_like(prod), prod)


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` with ``0 * inf = 0`` (a flat line over an interval with an infinite end)."""
    return torch.where((a == 0) | (b == 0), torch.zeros_like(a * b), a * b)


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

    def split_point(self, node, lower, upper):
        """The breakpoint inside ``(lower, upper)`` nearest the midpoint (a kink or an
        inflection: each half is then closer to linear, convex or concave), else the
        midpoint."""
        mid = (lower + upper) / 2
        if not lower.numel():
            return mid
        pts = self.breakpoints_in(node, float(lower.min()), float(upper.max())) or ()
        best, found = mid, torch.zeros_like(mid, dtype=torch.bool)
        for p in pts:
            pt = torch.full_like(mid, p)
            take = (lower < pt) & (pt < upper) & (~found | ((pt - mid).abs() < (best - mid).abs()))
            best, found = torch.where(take, pt, best), found | take
        return best

    def slope_bound(self, node) -> float:
        if not all(math.isfinite(v) for v in self.slope_limits):
            raise NotSupported(self.op, "lipschitz", f"{self.op} has no global slope bound")
        pts = torch.tensor(self.breakpoints(node), dtype=torch.float64, device="cpu")
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
                    m = self._mid(a, b)
                    up = dh(m) >= 0
                    a = torch.where(up, m, a)
                    b = torch.where(up, b, m)
            # h is concave on the region (h' decreasing through its root): h <= h(a) + h'(a)(x - a)
            bound = h(a) + dh(a).clamp(min=0) * (b - a)
            best = torch.where(live, torch.maximum(best, bound), best)
        return s * best

    def _mid(self, a, b):
        """A point strictly inside ``(a, b)`` for the bisection (a rule with a domain halves on a
        log scale, ``verifier.ops.domain``)."""
        return (a + b) / 2

    def _round(self, v, up, dtype, scale=None):
        """``v`` (float64) moved outwards (up where ``up``: a bool or a bool tensor) by
        ``slack(dtype) (1 + |v| + scale)``, cast."""
        d = slack(dtype) * (1 + v.abs() + (0.0 if scale is None else scale))
        return (v + _sign(up) * d).to(dtype)

    def _line(self, node, l, u, k, upper, dtype, iters: int | None = None):
        """The line ``k x + b`` above (``upper``: a bool or a bool tensor) or below f on
        ``[l, u]`` for the slope ``k`` (float64): ``b`` from ``_extreme`` (``iters`` bisection
        steps), widened for the rounding of k to ``dtype`` (the line is evaluated with the
        rounded k) and by the slack; -> (k, b) in ``dtype``."""
        b = self._extreme(node, l, u, k, upper, iters)
        return self._widen(node, l, u, k, b, _sign(upper), dtype)

    def _widen(self, node, l, u, k, b, s, dtype):
        """The line ``k x + b`` (float64, ``b`` a bound of ``f - k x`` over ``[l, u]`` from above
        where ``s`` = 1, from below where ``s`` = -1: a number or a tensor of signs) moved
        outwards for the rounding of k to ``dtype``, by ``margin`` and by the slack; -> (k, b)
        in ``dtype``."""
        kd = k.to(dtype)
        far = torch.maximum(l.abs(), u.abs())
        reach = _times(far, (kd.double() - k).abs()).detach() + self.margin(node)
        kx = _times(kd.double().abs().detach(), far)   # the line's values reach |b| + |k| max|x|
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
        return self._finite_or_flat(node, l, u, kl, bl, ku, bu)

    def _finite_or_flat(self, node, l, u, kl, bl, ku, bu):
        """Lines whose slope or offset overflow the dtype (exp over [0, 100] in float32) become
        the flat lines at the interval's ends (the upper one may be +inf: no finite line is
        above f there; backward counts 0 * inf as 0)."""
        bad_l = ~(torch.isfinite(kl) & torch.isfinite(bl))
        bad_u = ~(torch.isfinite(ku) & torch.isfinite(bu))
        if not bool(bad_l.any() or bad_u.any()):
            return kl, bl, ku, bu
        iv = SmoothElementwise.interval(self, node, [Interval(l.to(kl.dtype), u.to(kl.dtype))])
        zero = torch.zeros_like(kl)
        return (torch.where(bad_l, zero, kl), torch.where(bad_l, iv.lower, bl),
                torch.where(bad_u, zero, ku), torch.where(bad_u, iv.upper, bu))

    # --- alpha-CROWN ----------------------------------------------------------------------------
    # Two forms of free parameters. The generic one (here): the slopes of both lines, each any
    # value in [min f', max f'] over [l, u] (``slope_table``). A subclass may instead give its
    # own, one per neuron and bound direction, by overriding ``alpha_init`` and ``_lines`` (a
    # tangent point on a convex or concave piece, ``verifier.ops.domain``; PReLU's line through
    # its kink); ``backward`` takes that form where ``_lines`` is overridden.
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
                d = self.df(node, torch.tensor([p - step, p, p + step], dtype=torch.float64,
                                                         device=l.device))
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
        ks = torch.zeros(*l.shape, G, dtype=torch.float64, device=l.device)
        bs = torch.zeros(*l.shape, 2 * G, dtype=torch.float64, device=l.device)
        if bool(free.any()):
            a, c = k0[free].unsqueeze(-1), k1[free].unsqueeze(-1)
            chord = kl[free].double().unsqueeze(-1)
            kf = torch.cat([a + torch.linspace(0, 1, G - 1, dtype=torch.float64, device=a.device) * (c - a), chord],
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
        idx = j.long().unsqueeze(-1) + torch.tensor([0, 1], device=j.device)   # [B, T, n, 2]
        kk = torch.gather(ks.unsqueeze(1).expand(B, T, n, G), 3, idx)
        bb = torch.gather(bs.unsqueeze(1).expand(B, T, n, 2 * G), 3, idx + G * up.unsqueeze(-1))
        k = kk[..., 0] + th * (kk[..., 1] - kk[..., 0])
        b = bb[..., 0] + th * (bb[..., 1] - bb[..., 0])
        l = torch.where(free, x.lower.reshape(B, n), 0).double().unsqueeze(1)
        u = torch.where(free, x.upper.reshape(B, n), 0).double().unsqueeze(1)
        # the float64 rounding of the two interpolations, moved outwards
        err = 4 * torch.finfo(torch.float64).eps * (
            bb.abs().sum(-1) + kk.abs().sum(-1) * torch.maximum(l.abs(), u.abs()))
        kd, bd = self._widen(node, l, u, k, b + _sign(up) * err, _sign(up), dtype)
        sel = free.unsqueeze(1)
        k_out = torch.where(sel, kd, torch.where(up, ku, kl))
        b_out = torch.where(sel, bd, torch.where(up, bu, bl))
        return k_out.reshape(upper.shape), b_out.reshape(upper.shape)

    def _lines(self, node, x: Interval, alpha):
        """A subclass's own free parameters ``alpha: [B, S, *shape]`` (as its ``alpha_init``
        gives them) -> their lines kl, bl, ku, bu, each ``[B, S, *shape]`` in the graph's dtype;
        sound for every value in range."""
        raise NotSupported(self.op, "backward", "no free parameters of its own")

    def _own_lines(self) -> bool:
        """Whether the subclass gives its own free parameters (``_lines``)."""
        return type(self)._lines is not SmoothElementwise._lines

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """With ``alpha`` (alpha-CROWN): ``(for the lower bound, for the upper bound)``, in the
        generic form (``_backward_slopes``) or the subclass's own (``_lines``: ``[B, S, *shape]``
        each, one pair of lines per spec row)."""
        if alpha is None:
            return super().backward(node, A_lower, A_upper, inputs, beta=beta)
        (x,) = inputs
        if not self._own_lines():
            [(A_l, A_u)], b_l, b_u = self._backward_slopes(node, A_lower, A_upper, x, alpha)
            return self._with_splits(A_l, A_u, b_l, b_u, beta)

        def one(A, k_pos, b_pos, k_neg, b_neg):
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            bias = (_products(Ap, b_pos) + _products(An, b_neg)).flatten(2).sum(2)
            return Ap * k_pos + An * k_neg, bias

        kl, bl, ku, bu = self._lines(node, x, alpha[0])
        A_l, b_l = one(A_lower, kl, bl, ku, bu)
        kl, bl, ku, bu = self._lines(node, x, alpha[1])
        A_u, b_u = one(A_upper, ku, bu, kl, bl)
        return self._with_splits(A_l, A_u, b_l, b_u, beta)

    @staticmethod
    def _with_splits(A_l, A_u, b_l, b_u, beta):
        """-> the backward result with the split multipliers ``beta`` (if any) added
        (``split_multipliers``)."""
        if beta is not None:
            A_l, A_u, c_l, c_u = split_multipliers(A_l, A_u, beta)
            b_l, b_u = b_l + c_l, b_u + c_u
        return [(A_l, A_u)], b_l, b_u

    def _backward_slopes(self, node, A_lower, A_upper, x: Interval, alpha):
        """The generic form: ``alpha`` is ``(tau for the lower bound, tau for the upper bound)``,
        each ``[2, B, S, *shape]`` (the slope positions of the lower and the upper line, see
        ``alpha_init``). Each entry of A takes one line (for the lower bound: the lower line
        where A >= 0, else the upper one; the reverse for the upper bound), so one line per
        entry is looked up, for both bounds in one pass."""
        S = A_lower.shape[1]
        A = torch.cat([A_lower, A_upper], 1)
        upper = torch.cat([A_lower < 0, A_upper >= 0], 1)
        tau = torch.cat([torch.where(upper[:, :S], alpha[0][1], alpha[0][0]),
                         torch.where(upper[:, S:], alpha[1][1], alpha[1][0])], 1)
        k, b = self.optimized_lines(node, x, tau, upper)
        A_new = A * k
        bias = _products(A, b).flatten(2).sum(-1)
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


_TANH_C, _TANH_K = math.sqrt(2 / math.pi), 0.044715
# the inflection point of the tanh form: the root of u' + x (u'' - 2 tanh(u) u'^2) / 2 on x > 0
# (f'' = (1 - tanh(u)^2) times that, u = c (x + k x^3)), by bisection in float64 to the last ulp
_TANH_INFLECTION = 1.418504008790828


@register("gelu")
class GELU(SmoothElementwise):
    """``x Phi(x)`` (param ``approximate`` "none", the default: the exact, erf form): ``f'' =
    phi(x) (2 - x^2)`` changes sign at +-sqrt(2); f' from -0.1289 to 1.1289.

    ``approximate`` "tanh": ``0.5 x (1 + tanh(u))``, ``u = sqrt(2 / pi) (x + 0.044715 x^3)``:
    ``f'' = (1 - tanh(u)^2) (u' + x (u'' - 2 tanh(u) u'^2) / 2)``; the second factor is even,
    ``sqrt(2 / pi)`` at 0 and falls to -inf, with one root on x > 0 (1.4185040087908280: a float64
    bisection; an error of an ulp moves the region's ends where f'' is 0 to first order, far
    inside the slack); f' from -0.1290 to 1.1290."""

    slope_limits = (0.0, 1.0)

    def _tanh(self, node) -> bool:
        return node.params.get("approximate", "none") == "tanh"

    def f(self, node, x):
        return F.gelu(x, approximate="tanh") if self._tanh(node) else F.gelu(x)

    def df(self, node, x):
        if self._tanh(node):
            t = torch.tanh(_TANH_C * (x + _TANH_K * x * x * x))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _TANH_C * (1 + 3 * _TANH_K * x * x)
        return 0.5 * (1 + torch.erf(x / _SQRT2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def breakpoints(self, node):
        if self._tanh(node):
            return (-_TANH_INFLECTION, _TANH_INFLECTION)
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


@register("prelu")
class PReLU(SmoothElementwise):
    """``x`` for x >= 0, ``a x`` below, with a learned slope ``a`` (param ``weight``: one value,
    or one per channel (dim 0 of a sample, torch's ``nn.PReLU``), or a tensor broadcastable to a
    sample; ``param_names`` gives the module's parameter, read live in certified training). Any
    real ``a``: convex where a <= 1, concave where a > 1 (not monotone where a < 0).

    Where the input crosses 0 the chord bounds one side (above if convex, below if concave) and a
    line through 0 of slope ``s`` between ``a`` and 1 bounds the other: ``f(x) - s x`` keeps one
    sign, 0 at x = 0. CROWN takes s = 1 where u > -l, else a (as for ReLU); alpha-CROWN optimizes
    ``s = a + tau (1 - a)``, ``tau`` in [0, 1]. The slope as a weight perturbation is not
    supported."""

    alpha_lr = 1.0   # its own parameter (``_lines``), best at an end of its range as ReLU's

    def slope(self, node, like: torch.Tensor) -> torch.Tensor:
        """``a`` broadcastable to ``like`` (``[B, *shape]`` or ``[B, S, *shape]``)."""
        w = node.params["weight"].to(like.dtype)
        nd = len(node.shape)
        if w.numel() > 1 and w.ndim == 1 and nd > 1:
            w = w.view(-1, *[1] * (nd - 1))   # one per channel
        return w

    def f(self, node, x):
        return torch.where(x >= 0, x, x * self.slope(node, x))

    def df(self, node, x):
        return torch.where(x > 0, torch.ones_like(x), self.slope(node, x).expand_as(x))

    def breakpoints(self, node):
        return (0.0,)

    def slope_bound(self, node) -> float:
        return max(1.0, float(node.params["weight"].detach().abs().max()))

    def relax(self, node, l, u):
        dtype = l.dtype
        l, u = l.double(), u.double()
        a = self.slope(node, l).expand_as(l)
        chord = self._chord(node, l, u)
        through_0 = torch.where(u > -l, torch.ones_like(a), a)
        cross = (l < 0) & (u > 0)
        convex = a <= 1
        k_lo = torch.where(cross & convex, through_0, chord)
        k_up = torch.where(cross & ~convex, through_0, chord)
        kl, bl = self._line(node, l, u, k_lo, False, dtype)
        ku, bu = self._line(node, l, u, k_up, True, dtype)
        return kl, bl, ku, bu

    def alpha_init(self, node, inputs, B, S, dtype):
        """The slope position ``tau`` ``[B, S, *shape]`` of the line through 0 where the input
        crosses 0 (and ``a`` != 1), starting at CROWN's (1 where u > -l, else 0)."""
        x = inputs[0]
        a = self.slope(node, x.lower).expand_as(x.lower)
        if not bool(((x.lower < 0) & (x.upper > 0) & (a != 1)).any()):
            return None
        init = (x.upper > -x.lower).to(dtype).unsqueeze(1)
        return init.expand(B, S, *node.shape), 0.0, 1.0

    def _lines(self, node, x, tau):
        dtype = x.lower.dtype
        kl, bl, ku, bu = (v.unsqueeze(1) for v in self.relaxation(node, x))
        l, u = x.lower.double().unsqueeze(1), x.upper.double().unsqueeze(1)
        a = self.slope(node, l).expand_as(l)
        cross = (l < 0) & (u > 0) & (a != 1)
        s = a + tau.double() * (1 - a)
        convex = a <= 1
        # the least (convex) or largest (concave) value of f - s x over [l, u] is 0, at 0
        ks, bs = self._widen(node, l, u, s, torch.zeros_like(s), torch.where(convex, -1.0, 1.0), dtype)
        lower, upper = cross & convex, cross & ~convex
        return (torch.where(lower, ks, kl), torch.where(lower, bs, bl),
                torch.where(upper, ks, ku), torch.where(upper, bs, bu))


@register("exp")
class Exp(SmoothElementwise):
    """``exp(x)``: convex and increasing; no global slope bound (no Lipschitz constant)."""

    slope_limits = (0.0, math.inf)

    def f(self, node, x):
        return torch.exp(x)

    def df(self, node, x):
        return torch.exp(x)

    def lipschitz_on(self, node, ctx):
        """On a domain where the input stays below ``u``: the slope is at most ``exp(max u)``."""
        (i,) = node.inputs
        c = float(torch.exp(ctx.box[i].upper.double().max()))   # inf past float64's range
        return c * ctx.L[i], c, "exp's slope on the domain"


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
            far = torch.where((k.detach() >= 0) == upper, l, u)
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
