"""Reductions over per-sample dims: sum and mean (affine, exact), max and min (relaxed).

Both rules take params ``kind``, ``dims`` (the reduced per-sample dims: batch excluded,
non-negative, sorted), ``keepdim`` and ``in_shape``. Each output element reduces one *group*: the
``k`` input elements that share its kept coordinates.

Max over a group ``x_1..x_k`` with bounds ``[l_i, u_i]`` (min is ``-max(-x)``):

- lower line: one element, ``j`` with the largest lower bound (``max >= x_j``); for alpha-CROWN
  any convex combination ``sum w_i x_i`` (``max >= every weighted mean``);
- upper line ``P``: with ``m`` the element with the largest upper bound and ``c`` the larger of
  ``l_m`` and every other upper bound, ``max(x) <= max(x_m, c)``, a convex function of ``x_m``
  alone, lies below its chord over ``[l_m, u_m]``. P never exceeds ``u_m`` (the constant that
  max pooling uses) and is exactly ``x_m`` where ``l_m`` reaches every other upper bound (the
  max is decided);
- a second upper line ``Q = l_j + sum_i s_i (x_i - l_i)`` over the elements with ``u_i > l_j``,
  ``s_i = (u_i - l_j) / (u_i - l_i)``: ``max(x) <= l_j + sum_i relu(x_i - l_j)`` and each relu
  lies below its chord. Q wins where the elements move together against the spec (e.g. in
  ``max(x) - sum(x)``); every convex combination ``(1 - t) P + t Q`` is an upper line too, and
  alpha-CROWN optimizes ``t`` (CROWN uses P).

For two values P and Q are the two facets of the concave envelope of the max over the box.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import AffineRule, BoundRule, register


def _layout(node):
    """-> (in_shape, reduced dims, kept dims), all per sample."""
    in_shape = tuple(node.params["in_shape"])
    dims = tuple(node.params["dims"])
    return in_shape, dims, tuple(d for d in range(len(in_shape)) if d not in dims)


def group_size(node) -> int:
    in_shape, dims, _ = _layout(node)
    return math.prod(in_shape[d] for d in dims)


def _grouped(node, t: torch.Tensor) -> torch.Tensor:
    """``[*lead, *in_shape] -> [*lead, *kept sizes, k]``: each group along the last dim."""
    in_shape, dims, kept = _layout(node)
    lead = t.ndim - len(in_shape)
    t = t.permute(*range(lead), *(lead + d for d in kept), *(lead + d for d in dims))
    return t.reshape(*t.shape[:lead + len(kept)], -1)


def _ungrouped(node, t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_grouped``: ``[*lead, *kept sizes, k] -> [*lead, *in_shape]``."""
    in_shape, dims, kept = _layout(node)
    lead = t.ndim - len(kept) - 1
    t = t.reshape(*t.shape[:lead + len(kept)], *(in_shape[d] for d in dims))
    order = kept + dims                      # the in-dim held at each position after lead
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(*range(lead), *(lead + i for i in inverse))


def _kept_sizes(node) -> tuple:
    in_shape, _, kept = _layout(node)
    return tuple(in_shape[d] for d in kept)


def _torch_dims(node) -> tuple:
    """The reduced dims of a tensor with the batch dim first."""
    return tuple(d + 1 for d in node.params["dims"])


@register("reduce_sum")
class ReduceSum(AffineRule):
    """``kind`` "sum" or "mean" over ``dims``: every input element counts once, in one group."""

    def _apply(self, node, t):
        f = torch.sum if node.params["kind"] == "sum" else torch.mean
        return f(t, dim=_torch_dims(node), keepdim=node.params["keepdim"])

    def interval(self, node, inputs):
        (x,) = inputs  # non-negative weights: the bounds map through
        return Interval(self._apply(node, x.lower), self._apply(node, x.upper))

    def point(self, node, inputs):
        return self._apply(node, inputs[0])

    def transpose(self, node, A):
        """Each output's coefficient copied to every element of its group (over k for mean)."""
        in_shape, dims, _ = _layout(node)
        B, S = A.shape[:2]
        kept_view = tuple(1 if d in dims else s for d, s in enumerate(in_shape))
        A = A.reshape(B, S, *kept_view).expand(B, S, *in_shape)
        if node.params["kind"] == "mean":
            return [A / group_size(node)]
        return [A.contiguous()]

    def op_norm(self, node):
        """``|sum of k values| <= sqrt(k) ||values||_2``, each input element in one group."""
        k = group_size(node)
        if node.params["kind"] == "mean":
            return 1.0 / math.sqrt(k), "1 / sqrt(group size)"
        return math.sqrt(k), "sqrt(group size)"


@register("reduce_max")
class ReduceMax(BoundRule):
    """``kind`` "max" or "min" over ``dims``, relaxed as in the module doc."""

    needs_bounds = True

    def _apply(self, node, t):
        f = torch.amax if node.params["kind"] == "max" else torch.amin
        return f(t, dim=_torch_dims(node), keepdim=node.params["keepdim"])

    def interval(self, node, inputs):
        (x,) = inputs  # max and min are non-decreasing in every element
        return Interval(self._apply(node, x.lower), self._apply(node, x.upper))

    def point(self, node, inputs):
        return self._apply(node, inputs[0])

    def lipschitz(self, node, Ls):
        """``|max a - max b| <= max |a_i - b_i| <= ||a - b||_2`` per group, and the groups are
        disjoint: ``||y - y'||_2 <= ||x - x'||_2``."""
        return Ls[0], 1.0, "max / min over disjoint groups"

    def deviation(self, node, centers, devs):
        return devs[0]

    def _max_bounds(self, node, x: Interval):
        """Grouped bounds ``[B, *kept, k]`` of the max's input (of ``-x`` for min)."""
        if node.params["kind"] == "max":
            return _grouped(node, x.lower), _grouped(node, x.upper)
        return _grouped(node, -x.upper), _grouped(node, -x.lower)

    def lines(self, node, x: Interval):
        """The lines of the max over each group (coefficients ``[B, *kept, k]``, intercepts
        ``[B, *kept]``): (CROWN's lower line, one-hot on j; P's coefficients and intercept; Q's
        coefficients and intercept; decided; the slack a convex combination's lower line needs).
        Cached on the interval (one computation per bounds pass, as
        ``ElementwiseRelaxation.relaxation``).

        Rounding: the intercepts of P and Q are raised by a few ulps of the terms they are made of
        (the stored lines then hold in exact arithmetic, in float32 too); a one-hot lower line and
        P with slope 0 or 1 are exact and get none."""
        key = ("reduce_max", node.name, x.lower._version, x.upper._version)
        if key in x.cache:
            return x.cache[key]
        lo, up = self._max_bounds(node, x)
        k = lo.shape[-1]
        eps = torch.finfo(lo.dtype).eps
        neg = torch.tensor(-torch.inf, dtype=lo.dtype, device=lo.device)
        l_j, j = lo.max(-1, keepdim=True)
        onehot_j = torch.zeros_like(lo).scatter_(-1, j, 1.0)
        u_m, m = up.max(-1, keepdim=True)
        onehot_m = torch.zeros_like(lo).scatter_(-1, m, 1.0)
        l_m = lo.gather(-1, m)
        u_other = torch.where(onehot_m > 0, neg, up).amax(-1, keepdim=True)   # -inf when k = 1
        c = torch.maximum(u_other, l_m)
        width = u_m - l_m
        # P: the chord of max(x_m, c) over [l_m, u_m]; where c = l_m (decided, or k = 1) it is
        # x_m itself (slope 1 exactly); a fixed x_m (width 0) gives the constant u_m
        s = torch.where(width > 0, (u_m - c) / torch.where(width > 0, width, 1.0), 0.0)
        s = torch.where((c <= l_m) & (width > 0), 1.0, s).nan_to_num(nan=0.0)  # nan: u_m = inf
        p_coef = onehot_m * s
        inner = (s > 0) & (s < 1)
        p_bias = torch.where(s == 1, 0.0, u_m * (1 - s))
        p_bias = (p_bias + torch.where(inner, 8 * eps * (u_m.abs() + l_m.abs()), 0.0)).squeeze(-1)
        # Q: l_j + the chord of relu(x_i - l_j) over [l_i, u_i] for every element with u_i > l_j
        cand = up > l_j
        gap = torch.where(cand, up - lo, 1.0)
        q_coef = torch.where(cand, (up - l_j) / gap, 0.0)
        lo_c = torch.where(cand, lo, 0.0)
        q_bias = l_j.squeeze(-1) - (q_coef * lo_c).sum(-1)
        terms = (q_coef * (lo_c.abs() + torch.where(cand, up, 0.0).abs())).sum(-1)
        q_bias = q_bias + (k + 6) * eps * (l_j.squeeze(-1).abs() + terms)
        finite = (torch.isfinite(lo) & torch.isfinite(up)).all(-1)
        q_coef = torch.where(finite.unsqueeze(-1), q_coef, p_coef)  # unbounded: Q is P
        q_bias = torch.where(finite, q_bias, p_bias)
        u_not_j = torch.where(onehot_j > 0, neg, up).amax(-1)
        decided = l_j.squeeze(-1) >= u_not_j
        # sum w_i x_i with weights normalized in floats may pass max(x) by (k + 1) ulps of |x|
        w_slack = (k + 4) * eps * torch.maximum(lo.abs(), up.abs()).amax(-1)
        out = (onehot_j, p_coef, p_bias, q_coef, q_bias, decided, w_slack)
        x.cache[key] = out
        return out

    def alpha_init(self, node, inputs, B, S, dtype):
        """``[B, S, *kept, k + 1]`` in [0, 1]: the lower line's weights over each group
        (normalized in ``backward``; CROWN's one-hot to start) and, last, ``t``, the share of Q in
        the upper line (0 to start). None when every group is decided."""
        onehot, _, _, _, _, decided, _ = self.lines(node, inputs[0])
        if bool(decided.all()):
            return None
        init = torch.cat([onehot, torch.zeros_like(onehot[..., :1])], -1).to(dtype)
        return init.unsqueeze(1).expand(B, S, *init.shape[1:]), 0.0, 1.0

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """``alpha``: optional ``(for the lower bound, for the upper bound)``, each as
        ``alpha_init`` gives it; used where a group is undecided (a decided group's lines are
        exact). Entries of A >= 0 take the lower line of the max, the others its upper line
        (reversed for the upper bound); for min the max's lines act on ``-x``."""
        (x,) = inputs
        onehot, p_coef, p_bias, q_coef, q_bias, decided, w_slack = (
            t.unsqueeze(1) for t in self.lines(node, x))
        B, S = A_lower.shape[:2]
        flip = node.params["kind"] == "min"
        kept = _kept_sizes(node)

        def weights(a):
            """-> (lower-line coefficients and intercept, upper-line coefficients and intercept)."""
            if a is None:
                return onehot, 0.0, p_coef, p_bias
            w, t = a[..., :-1], a[..., -1]
            total = w.sum(-1, keepdim=True)
            lw = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), onehot)
            lw = torch.where(decided.unsqueeze(-1), onehot, lw)
            lb = torch.where(decided, 0.0, -w_slack)
            t = torch.where(decided, 0.0, t)
            return lw, lb, p_coef + t.unsqueeze(-1) * (q_coef - p_coef), p_bias + t * (q_bias - p_bias)

        def one(A, a, upper):
            A = A.reshape(B, S, *kept)
            if flip:
                A = -A   # A·min(x) = (-A)·max(-x)
            lw, lb, uw, ub = weights(a)
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            if upper:
                Ap, An = An, Ap  # Ap now takes the lower line
            A_in = Ap.unsqueeze(-1) * lw + An.unsqueeze(-1) * uw
            bias = (An * ub + Ap * lb).reshape(B, S, -1).sum(-1)
            A_in = _ungrouped(node, A_in)
            return (-A_in if flip else A_in), bias

        A_l, b_l = one(A_lower, None if alpha is None else alpha[0], False)
        A_u, b_u = one(A_upper, None if alpha is None else alpha[1], True)
        return [(A_l, A_u)], b_l, b_u
