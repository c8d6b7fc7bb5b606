"""Element-wise activations, each relaxed on [l, u] by two lines  kl x + bl <= f(x) <= ku x + bu.

The backward step is shared (dense and patches): for a lower bound, positive entries of A take
the lower line and negative ones the upper line (the reverse for an upper bound). The weight
deviation and the Lipschitz bound both follow from the largest slope ``slope_bound``.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import BoundRule, NotSupported, one_sided, register


# a relaxation whose lines are at most this far apart on [l, u] is not worth tightening its
# input's bounds for (``ElementwiseRelaxation.loose``)
LOOSE_GAP = 1e-4


def split_multipliers(A_l, A_u, beta, in_place: bool = False):
    """beta-CROWN's Lagrangian terms of a node's split constraints, added to the A of its input
    ``z`` (``A_*: [B, S, *shape]``): -> (A_l, A_u, bias_l, bias_u).

    ``beta``: a group ``(sign, beta_lower, beta_upper)`` or ``(sign, beta_lower, beta_upper,
    point)``, or a list of groups. ``sign: [B, *shape]`` is +1 where the domain assumes
    ``z >= point``, -1 where it assumes ``z <= point``, 0 where the group has no constraint;
    ``point: [B, *shape]`` (0 when absent: a ReLU split); ``beta_*: [B, S, *shape]`` >= 0. On
    the domain ``sign·(z - point) >= 0``, so ``A·y - beta·sign·(z - point) <= A·y`` and
    ``A·y + beta·sign·(z - point) >= A·y``: A of z gains ``-beta_lower·sign`` (lower bound) and
    ``+beta_upper·sign`` (upper bound), the biases ``+beta_lower·sign·point`` and
    ``-beta_upper·sign·point``; both bounds stay sound for every beta >= 0 (Lagrangian
    relaxation of the split constraints)."""
    groups = beta if isinstance(beta, list) else [beta]
    c_l = c_u = 0.0
    for grp in groups:
        sign = grp[0].unsqueeze(1).to(A_l.dtype)
        if in_place:
            A_l.sub_(sign * grp[1])
            A_u.add_(sign * grp[2])
        else:
            A_l, A_u = A_l - sign * grp[1], A_u + sign * grp[2]
        point = grp[3] if len(grp) > 3 else None
        if point is not None:
            sp = torch.where(sign != 0, sign * point.unsqueeze(1).to(A_l.dtype), 0.0)
            c_l = c_l + (grp[1] * sp).flatten(2).sum(2)
            c_u = c_u - (grp[2] * sp).flatten(2).sum(2)
    return A_l, A_u, c_l, c_u


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` summed over the dims where ``shape`` (same rank) has size 1."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


class LineSelect(torch.autograd.Function):
    """One side of an element-wise relaxation's backward step under autograd (certified
    training), with a hand-written gradient:

        A' = A+ k_pos + A- k_neg,    bias = A+·b_pos + A-·b_neg  (per row: [B, S])

    ``A: [B, S, *shape]``; ``k_*``: broadcastable to A (``[B, 1 | S, *shape]``); ``b_*``:
    ``[B, n, 1]`` (n = prod(shape)) or None (a zero bias). Gradients, with ``m = [A < 0]``:
    ``dA = g·(m k_neg + (1-m) k_pos) + gb·(m b_neg + (1-m) b_pos)``, ``dk_neg = sum g·A-``,
    ``dk_pos = sum g·A+`` (summed over the broadcast dims), ``db_neg = sum_S gb·A-``,
    ``db_pos = sum_S gb·A+``: about 40% fewer passes over A than autograd through the clamps and
    products (the widest tensors of the CROWN-IBP loss)."""

    @staticmethod
    def forward(ctx, A, k_pos, k_neg, b_pos, b_neg):
        neg = A < 0
        slope = torch.where(neg, k_neg, k_pos)
        out = A * slope
        An = torch.where(neg, A, 0.0)
        B, S = A.shape[:2]
        bias = A.new_zeros(B, S)
        if b_neg is not None:
            bias = bias + torch.bmm(An.flatten(2), b_neg).squeeze(-1)
        if b_pos is not None:
            bias = bias + torch.bmm((A - An).flatten(2), b_pos).squeeze(-1)
        ctx.save_for_backward(A, An, slope, neg, k_pos, k_neg, b_pos, b_neg)
        return out, bias

    @staticmethod
    def backward(ctx, g, gb):
        A, An, slope, neg, k_pos, k_neg, b_pos, b_neg = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, S = A.shape[:2]
        shape = A.shape[2:]
        dA = dkp = dkn = dbp = dbn = None
        if g is None:
            g = torch.zeros_like(A)
        if need[0]:
            dA = g * slope
            if gb is not None:
                gbv = gb.view(B, S, *[1] * len(shape))
                if b_neg is not None:
                    dA.addcmul_(torch.where(neg, b_neg.view(B, 1, *shape), 0.0), gbv)
                if b_pos is not None:
                    dA.addcmul_(torch.where(neg, 0.0, b_pos.view(B, 1, *shape)), gbv)
        if need[2]:
            dkn = _sum_to(g * An, k_neg.shape)
        if need[1]:
            dkp = _sum_to(g * (A - An), k_pos.shape)
        if gb is not None and need[4]:
            dbn = torch.bmm(gb.unsqueeze(1), An.flatten(2)).transpose(1, 2)
        if gb is not None and need[3]:
            dbp = torch.bmm(gb.unsqueeze(1), (A - An).flatten(2)).transpose(1, 2)
        return dA, dkp, dkn, dbp, dbn


class ElementwiseRelaxation(BoundRule):
    needs_bounds = True
    elementwise = True
    has_lower_bias = True  # False where the lower line always passes through 0 (ReLU)

    def f(self, node, x):
        raise NotSupported(self.op, "point")

    def relax(self, node, l, u):
        """-> (kl, bl, ku, bu), each [B, *shape]."""
        raise NotSupported(self.op, "backward")

    def slope_bound(self, node) -> float:
        """``sup |f'|``: f is that Lipschitz, element-wise."""
        raise NotSupported(self.op, "lipschitz", "no bound on the slope of the activation")

    def lipschitz(self, node, Ls):
        c = self.slope_bound(node)
        return c * Ls[0], c, "activation slope bound"

    def deviation(self, node, centers, devs):
        return devs[0] * self.slope_bound(node)

    def norm_on(self, node, ctx):
        """``|f(x)| <= |f(0)| + s |x|`` element-wise (s: the slope bound)."""
        (i,) = node.inputs
        x0 = torch.zeros(1, *ctx.graph[i].shape, dtype=torch.float64, device="cpu")
        f0 = float(self.point(node, [x0.to(ctx.center[i])]).detach().double().norm())
        return self.slope_bound(node) * ctx.N[i] + f0

    def patchable(self, node) -> bool:
        return True

    def patch_step(self, node, g, vl, vu, inputs):
        """As ``backward``, on windows of the line maps (cached per node in ``g``)."""
        kl, bl, ku, bu = self.relaxation(node, inputs[0])
        B = kl.shape[0]
        maps = [kl, ku, bu] + ([bl] if self.has_lower_bias else [])
        win = g.windows(lambda: torch.cat(maps), ("relax", node.name)).split(B)
        kl, ku, bu = win[:3]
        bl = win[3] if self.has_lower_bias else None

        def one(v, k_pos, k_neg, b_pos, b_neg):
            """v- k_neg + v+ k_pos (exact: one of the two products is 0), one scratch buffer."""
            part = v.clamp(max=0)
            nv = part * k_neg
            bias = 0.0
            if b_neg is not None:
                bias = part.mul_(b_neg).flatten(2).sum(-1)
            part = torch.clamp(v, min=0, out=part)
            nv.addcmul_(part, k_pos)
            if b_pos is not None:
                bias = bias + part.mul_(b_pos).flatten(2).sum(-1)
            return nv, bias

        al, b_l = one(vl, kl, ku, bl, bu)
        au, b_u = one(vu, ku, kl, bu, bl)
        return [(g, al, au)], b_l, b_u

    def relaxation(self, node, x: Interval):
        """``relax`` over the input interval ``x``, computed once per interval object: every
        backward pass of a bounds computation reads the same input intervals. The key holds the
        tensors' version counters, so an in-place change of the bounds is never served stale."""
        cache = x.cache
        key = self._key(node, x)
        if key not in cache:
            cache[key] = self.relax(node, x.lower, x.upper)
        return cache[key]

    def _key(self, node, x: Interval):
        return (node.name, self.op, x.lower._version, x.upper._version)

    def loose(self, node, x: Interval) -> torch.Tensor:
        """``[B, *shape]`` bool: the neurons whose relaxation over ``x`` is loose, so that
        tighter bounds on ``x`` could tighten it (alpha-CROWN optimizes those rows of the input
        first): where the two lines are more than ``LOOSE_GAP`` apart somewhere on [l, u]."""
        kl, bl, ku, bu = self.relaxation(node, x)
        dk = ku - kl   # parallel lines: no 0 * inf at an infinite end (1 / x over [1, inf])
        spread = torch.maximum(dk * x.lower, dk * x.upper)
        gap = torch.where(dk == 0, torch.zeros_like(spread), spread) + (bu - bl)
        return gap > LOOSE_GAP

    def seed_relaxation(self, node, x: Interval, lines) -> None:
        """Store ``lines`` as the relaxation over ``x`` (e.g. rows gathered from the relaxation
        over a larger batch whose rows ``x`` holds), so that it is not computed again."""
        x.cache[self._key(node, x)] = tuple(lines)

    def split_gaps(self, node, x: Interval, points: int = 9):
        """How loose each line of the relaxation over ``x`` is (a branching heuristic, not a
        bound): -> (gap_lower, gap_upper) ``[B, *shape]``, the largest of ``f - lower line`` and
        of ``upper line - f`` at ``points`` evenly spread inputs of [l, u]."""
        kl, bl, ku, bu = self.relaxation(node, x)
        l, u = x.lower, x.upper
        # the points lead ([points, B, *shape]): per-channel parameters broadcast as usual
        t = torch.linspace(0, 1, points, dtype=l.dtype, device=l.device).view(-1, *[1] * l.dim())
        z = l + t * (u - l)
        fz = self.f(node, z)
        gl = (fz - kl * z - bl).amax(0)
        gu = (ku * z + bu - fz).amax(0)
        return gl.clamp(min=0), gu.clamp(min=0)

    def interval(self, node, inputs):
        (x,) = inputs  # monotone non-decreasing activations
        return Interval(self.f(node, x.lower), self.f(node, x.upper))

    def point(self, node, inputs):
        return self.f(node, inputs[0])

    @one_sided
    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """``alpha``: optional optimized lower-line slopes ``(for the lower bound, for the upper
        bound)``, each ``[B, S, *shape]``, used where the neuron is unstable (alpha-CROWN; only
        rules whose lower line passes through 0 for every slope in range accept them).

        ``beta``: optional split multipliers (beta-CROWN), see ``split_multipliers``: ``(sign,
        beta_lower, beta_upper)`` for the constraints ``sign·z >= 0`` (a ReLU split), with a
        fourth entry ``point`` for ``sign·(z - point) >= 0`` (an interval split), or a list of
        such groups.

        The two new A are the halves of one tensor ``[B, 2S, *shape]``, so that the next affine
        rule maps both in one call without copying them together."""
        if A_upper is None and beta is not None:
            # the split multipliers act on both halves: the upper one is computed and dropped
            [(A_l, _)], b_l, _ = self.backward(node, A_lower, A_lower, inputs, alpha, beta)
            return [(A_l, None)], b_l, None
        (x,) = inputs
        kl, bl, ku, bu = self.relaxation(node, x)
        B = kl.shape[0]
        kl, ku = kl.unsqueeze(1), ku.unsqueeze(1)
        bl, bu = bl.reshape(B, -1, 1), bu.reshape(B, -1, 1)
        kl_u = kl
        if alpha is not None:
            unstable = ((x.lower < 0) & (x.upper > 0)).unsqueeze(1)
            kl, kl_u = torch.where(unstable, alpha[0], kl), torch.where(unstable, alpha[1], kl)
        S = A_lower.shape[1]
        betas = () if beta is None else [t for grp in (beta if isinstance(beta, list) else [beta])
                                         for t in grp[1:3]]
        halves = 1 if A_upper is None else 2
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (A_lower, A_upper, kl, kl_u, *betas)
                                                  if t is not None)
        both = scratch = None
        if not tracked:  # autograd cannot write into buffers
            both = A_lower.new_empty(A_lower.shape[0], halves * S, *A_lower.shape[2:])
            scratch = torch.empty_like(A_lower)

        # a line may be a constant at +-inf (no finite line bounds the function there, e.g. exp
        # over an interval whose end overflows): 0 * inf must count as 0 in the biases
        infinite = not all(bool(torch.isfinite(b).all()) for b in (bl, bu) if b is not None)

        def dot(Ah, b):
            if not infinite:
                return torch.bmm(Ah.flatten(2), b).squeeze(-1)
            Af = Ah.flatten(2)
            return torch.where(Af == 0, 0.0, Af * b.transpose(1, 2)).sum(-1)

        def one(A, k_pos, k_neg, b_pos, b_neg, half):
            """Entries of A >= 0 take the (k_pos, b_pos) line, the others (k_neg, b_neg):
            A+ k_pos + A- k_neg, exact since one of the two products is 0 (torch.where is much
            slower on CPU)."""
            if tracked and not infinite and alpha is None:
                # (alpha-CROWN, whose slopes are per row, keeps autograd's gradient)
                return LineSelect.apply(A, k_pos, k_neg, b_pos, b_neg)
            out = None if both is None else both[:, half * S:(half + 1) * S]
            An = torch.clamp(A, max=0, out=out)
            bias = 0.0
            # skip the product with a line's bias where it is known to be 0 (ReLU's lower line)
            if b_neg is not None:
                bias = dot(An, b_neg)
            A_new = An.mul_(k_neg) if out is not None else An * k_neg
            Ap = torch.clamp(A, min=0, out=scratch)
            if b_pos is not None:
                bias = bias + dot(Ap, b_pos)
            return A_new.addcmul_(Ap, k_pos), bias

        bl = bl if self.has_lower_bias else None
        A_l, b_l = one(A_lower, kl, ku, bl, bu, 0)
        if A_upper is None:
            return [(A_l, None)], b_l, None
        A_u, b_u = one(A_upper, ku, kl_u, bu, bl, 1)
        if beta is not None:
            # in place unless tracked: the two halves stay one tensor
            A_l, A_u, c_l, c_u = split_multipliers(A_l, A_u, beta, in_place=not tracked)
            b_l, b_u = b_l + c_l, b_u + c_u
        return [(A_l, A_u)], b_l, b_u


@register("relu")
class ReLU(ElementwiseRelaxation):
    """Upper: the chord through (l, 0) and (u, u). Lower: slope 1 if u > -l else 0 (CROWN's
    adaptive choice); exact where the neuron is stable."""

    sign_only = True
    splittable = True
    has_lower_bias = False
    slope = 0.0  # LeakyReLU overrides per node

    def f(self, node, x):
        a = node.params.get("negative_slope", self.slope)
        return x.clamp(min=0) if a == 0 else torch.where(x >= 0, x, x * a)

    def slope_bound(self, node) -> float:
        return max(1.0, abs(node.params.get("negative_slope", self.slope)))

    def piece_slopes(self, node) -> tuple[float, float]:
        """The negative slope below 0 (0 for ReLU), 1 above."""
        return float(node.params.get("negative_slope", self.slope)), 1.0

    def split_point(self, node, lower, upper):
        """0: each half is linear (exact)."""
        return torch.zeros_like(lower)

    def loose(self, node, x: Interval) -> torch.Tensor:
        """The unstable neurons (l < 0 < u): the lines are exact elsewhere."""
        return (x.lower < 0) & (x.upper > 0)

    def alpha_init(self, node, inputs, B, S, dtype):
        """The lower line's slope of each unstable neuron: any value in [a, 1] (a the negative
        slope) gives a line below the activation, through 0; CROWN's is 1 where u > -l, else a
        (drawn over ``x.relax`` where given, as ``relaxation``)."""
        x = inputs[0]
        if not ((x.lower < 0) & (x.upper > 0)).any():
            return None
        a = node.params.get("negative_slope", self.slope)
        r = x.relax or x
        init = torch.where(r.upper > -r.lower, 1.0, a).to(dtype).unsqueeze(1)
        return init.expand(B, S, *node.shape), a, 1.0

    def relaxation(self, node, x: Interval):
        """Over ``x``, except that neurons ``x`` leaves unstable take the lines drawn over
        ``x.relax`` where it is given (see ``Interval``); stable neurons stay exact."""
        if x.relax is None:
            return super().relaxation(node, x)
        cache = x.cache
        key = self._key(node, x)
        if key not in cache:
            own = self.relax(node, x.lower, x.upper)
            wide = self.relax(node, x.relax.lower, x.relax.upper)
            unstable = (x.lower < 0) & (x.upper > 0)
            cache[key] = tuple(torch.where(unstable, w, o) for o, w in zip(own, wide))
        return cache[key]

    def _key(self, node, x: Interval):
        if x.relax is None:
            return super()._key(node, x)
        return (node.name, self.op, "relax", x.lower._version, x.upper._version,
                x.relax.lower._version, x.relax.upper._version)

    def relax(self, node, l, u):
        a = node.params.get("negative_slope", self.slope)
        if a == 0:
            # the same lines in fewer passes: with u+ = max(u, 0), l- = min(l, 0), the upper
            # slope u+ / (u+ - l-) is 1 where active, 0 where inactive, the chord's where
            # unstable, and its intercept -slope·l- is 0 unless unstable; the lower slope
            # [u > -l] is 1 where active and 0 where inactive (l = u = 0 counts as active)
            up, ln = u.clamp(min=0), l.clamp(max=0)
            active = l >= 0
            ku = (up / (up - ln).clamp(min=torch.finfo(u.dtype).tiny)).masked_fill_(active, 1.0)
            bu = -ku * ln
            kl = ((u + l > 0) | active).to(l.dtype)
            return kl, torch.zeros_like(l), ku, bu
        active, inactive = l >= 0, u <= 0
        unstable = ~(active | inactive)
        width = torch.where(unstable, u - l, torch.ones_like(u))
        ku_unstable = (u - a * l) / width
        ku = torch.where(active, 1.0, torch.where(inactive, a, ku_unstable))
        bu = torch.where(unstable, u - ku_unstable * u, 0.0)
        kl = torch.where(active, 1.0, torch.where(inactive, a, torch.where(u > -l, 1.0, a)))
        return kl.to(l.dtype), torch.zeros_like(l), ku.to(l.dtype), bu.to(l.dtype)


@register("leaky_relu")
class LeakyReLU(ReLU):
    """``max(x, a x)`` for 0 <= a <= 1 (param ``negative_slope``); relaxed as ReLU."""


class SShaped(ElementwiseRelaxation):
    """Sigmoid-like f: increasing, convex on x <= 0, concave on x >= 0, f(-x) = 2 f(0) - f(x).

    Upper line on [l, u]: u <= 0: the chord. l >= 0: the tangent at the midpoint. l < 0 < u: the
    chord when it stays above f (u at or before the point d >= 0 whose tangent passes through
    (l, f(l))), else the tangent at d, found by bisection and rounded towards the valid side.
    The lower line follows from the symmetry.
    """

    iters = 30
    # branch and bound's split point: "mid" (the midpoint) or "zero" (the inflection point
    # where it lies inside the interval, else the midpoint). Measured on random sigmoid / tanh
    # MLPs (docs/howto-verify.md): "mid" closed 13 of 24 open properties, "zero" 11, with more
    # domains on most (a split at 0 of an interval such as [-3, 0.1] leaves one half as wide)
    split_at = "mid"

    def split_point(self, node, lower, upper):
        """The midpoint, or (``split_at`` "zero") the inflection point 0 where the interval
        holds it (each half is then convex or concave)."""
        mid = (lower + upper) / 2
        if self.split_at == "mid":
            return mid
        return torch.where((lower < 0) & (upper > 0), torch.zeros_like(mid), mid)

    def df(self, x):
        raise NotSupported(self.op, "backward", "no derivative given")

    def slope_bound(self, node) -> float:
        """f' grows on x <= 0 (convex) and falls on x >= 0 (concave): its max is f'(0)."""
        return float(self.df(torch.zeros((), dtype=torch.float64, device="cpu")))

    def _tangent(self, d):
        k = self.df(d)
        return k, self.f(None, d) - k * d

    def _gap(self, d, l):
        """t_d(l) - f(l): >= 0 iff the tangent at d (d >= 0) lies above f on [l, inf)."""
        return self.f(None, d) + self.df(d) * (l - d) - self.f(None, l)

    def _point_d(self, l, u):
        """-> (need_d, d): where l < 0 < u and the chord would cut f, and there the least
        d >= 0 whose tangent passes above (l, f(l)), by bisection, kept on the valid side (0
        elsewhere)."""
        need_d = (l < 0) & (u > 0) & (self._gap(u, l) > 0)
        lo = torch.zeros_like(u)
        hi = torch.where(need_d, u, torch.zeros_like(u))
        for _ in range(self.iters):
            mid = (lo + hi) / 2
            ok = self._gap(mid, l) >= 0
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        return need_d, hi

    def upper_line(self, l, u):
        fl, fu = self.f(None, l), self.f(None, u)
        narrow = (u - l) < 1e-6
        chord_k = (fu - fl) / torch.where(narrow, torch.ones_like(u), u - l)
        chord_b = fl - chord_k * l
        m = (l + u) / 2
        tm_k, tm_b = self._tangent(m)
        need_d, d = self._point_d(l, u)   # the chord would cut f: use the tangent at d
        td_k, td_b = self._tangent(d)
        k = torch.where(l >= 0, tm_k, torch.where(need_d, td_k, chord_k))
        b = torch.where(l >= 0, tm_b, torch.where(need_d, td_b, chord_b))
        # a box too narrow for a stable chord: the constant f(u) is an upper bound (monotone)
        k = torch.where(narrow, torch.zeros_like(k), k)
        b = torch.where(narrow, fu, b)
        return k, b

    def relax(self, node, l, u):
        ku, bu = self.upper_line(l, u)
        k, b = self.upper_line(-u, -l)
        c2 = 2 * self.f(None, l.new_zeros(()))
        return k, c2 - b, ku, bu

    # --- alpha-CROWN: optimizable tangent points -------------------------------------------
    def _upper_tangents(self, l, u):
        """Where the upper line may be any tangent at a point t in [t0, t1] (a mask, t0, t1):
        l >= 0 (f concave there): any t in [l, u]; l < 0 < u with the chord cutting f: t in
        [d, u], d the least t >= 0 whose tangent passes above (l, f(l)) (``upper_line``'s point,
        found by bisection on the valid side): such a tangent lies above f on [0, inf) by
        concavity and on [l, 0], where f is convex, by its value at both ends."""
        narrow = (u - l) < 1e-6
        need_d, d = self._point_d(l, u)
        free = ~narrow & ((l >= 0) | need_d)
        t0 = torch.where(l >= 0, l, d)
        return free, t0, torch.maximum(u, t0)

    def tangent_ranges(self, node, x: Interval):
        """-> (free_l, t0_l, t1_l, free_u, t0_u, t1_u) over ``x`` (cached like ``relaxation``):
        the neurons whose lower / upper line may be a tangent at any point of [t0, t1]. The
        lower line mirrors the upper one (f(-x) = 2 f(0) - f(x))."""
        cache = x.cache
        key = ("tangents",) + self._key(node, x)
        if key not in cache:
            l, u = x.lower, x.upper
            fu, a0, a1 = self._upper_tangents(l, u)
            fl, m0, m1 = self._upper_tangents(-u, -l)
            cache[key] = (fl, -m1, -m0, fu, a0, a1)
        return cache[key]

    def alpha_init(self, node, inputs, B, S, dtype):
        """Tangent positions ``[2, B, S, *shape]`` in [0, 1] (lower line, upper line) where a
        neuron's line may be any tangent on a range (``tangent_ranges``), starting at CROWN's."""
        x = inputs[0]
        free_l, _, _, free_u, _, _ = self.tangent_ranges(node, x)
        if not (free_l | free_u).any():
            return None
        init = torch.stack(self.initial_tangents(node, x)).to(dtype).unsqueeze(2)
        return init.expand(2, B, S, *node.shape), 0.0, 1.0

    def initial_tangents(self, node, x: Interval):
        """The tangent positions ``(lower, upper)`` in [0, 1] that reproduce ``relax``'s lines
        where they are tangents: the midpoint on a one-signed interval, else the point d."""
        l, u = x.lower, x.upper
        half = torch.full_like(l, 0.5)
        return torch.where(u <= 0, half, torch.ones_like(l)), torch.where(l >= 0, half, torch.zeros_like(l))

    def _lines(self, node, x: Interval, tau):
        """The lines of the tangent positions ``tau: [2, B, S, *shape]`` (lower, upper), where
        the neuron is free, else ``relax``'s: -> kl, bl, ku, bu, each ``[B, S, *shape]``."""
        kl, bl, ku, bu = (v.unsqueeze(1) for v in self.relaxation(node, x))
        fl, l0, l1, fu, u0, u1 = (v.unsqueeze(1) for v in self.tangent_ranges(node, x))
        tl = l0 + tau[0] * (l1 - l0)
        tu = u0 + tau[1] * (u1 - u0)
        kt_l, kt_u = self.df(tl), self.df(tu)
        kl2 = torch.where(fl, kt_l, kl)
        bl2 = torch.where(fl, self.f(None, tl) - kt_l * tl, bl)
        ku2 = torch.where(fu, kt_u, ku)
        bu2 = torch.where(fu, self.f(None, tu) - kt_u * tu, bu)
        return kl2, bl2, ku2, bu2

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """With ``alpha`` (alpha-CROWN): ``(tau for the lower bound, tau for the upper bound)``,
        each ``[2, B, S, *shape]``, the tangent positions in [0, 1] of the lower and the upper
        line (see ``tangent_ranges``); every position gives sound lines, one pair per spec row."""
        if alpha is None:
            return super().backward(node, A_lower, A_upper, inputs, beta=beta)
        (x,) = inputs

        def one(A, k_pos, b_pos, k_neg, b_neg):
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            return Ap * k_pos + An * k_neg, (Ap * b_pos + An * b_neg).flatten(2).sum(2)

        kl, bl, ku, bu = self._lines(node, x, alpha[0])
        A_l, b_l = one(A_lower, kl, bl, ku, bu)
        kl, bl, ku, bu = self._lines(node, x, alpha[1])
        A_u, b_u = one(A_upper, ku, bu, kl, bl)
        if beta is not None:
            A_l, A_u, c_l, c_u = split_multipliers(A_l, A_u, beta)
            b_l, b_u = b_l + c_l, b_u + c_u
        return [(A_l, A_u)], b_l, b_u


@register("sigmoid")
class Sigmoid(SShaped):
    def f(self, node, x):
        return torch.sigmoid(x)

    def df(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)


@register("tanh")
class Tanh(SShaped):
    def f(self, node, x):
        return torch.tanh(x)

    def df(self, x):
        return 1 - torch.tanh(x) ** 2


@register("erf")
class Erf(SShaped):
    """``erf(x)``: increasing, convex on x <= 0, concave on x >= 0, odd; ``f' = 2/sqrt(pi) e^(-x^2)``."""

    def f(self, node, x):
        return torch.erf(x)

    def df(self, x):
        return 2 / math.sqrt(math.pi) * torch.exp(-x * x)
