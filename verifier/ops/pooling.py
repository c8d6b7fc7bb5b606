"""Pooling. AvgPool (and global average pooling) is linear with non-negative weights: IBP maps
the bounds through it, CROWN through its adjoint. MaxPool is relaxed per window: lower bound by
the element with the largest lower bound (max >= any element); upper bound by that same element
when its lower bound reaches every other upper bound (the max is decided), else by the constant
max of the upper bounds. For alpha-CROWN the lower line may be any convex combination of the
window's elements (max >= every weighted mean), with optimized weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bound_types import Interval
from .base import AffineRule, BoundRule, register
from .norms import window_overlap


def _overlap(p) -> int:
    nd = len(p["kernel_size"])
    return window_overlap(p["kernel_size"], p["stride"], p.get("dilation", (1,) * nd))


@register("avgpool")
class AvgPool(AffineRule):
    """params: ``nd`` (1 or 2), kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override (2-D only), in_shape."""

    def _pool(self, node, x):
        p = node.params
        if p["nd"] == 1:
            return F.avg_pool1d(x, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                                p["count_include_pad"])
        return F.avg_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                            p["count_include_pad"], p["divisor_override"])

    def interval(self, node, inputs):
        (x,) = inputs
        return Interval(self._pool(node, x.lower), self._pool(node, x.upper))

    def op_norm(self, node):
        """``|mean of k values| <= sqrt(k) ||values|| / divisor``, summed over the windows that
        share an element (the overlap)."""
        p = node.params
        if p.get("divisor_override"):
            div = float(p["divisor_override"])
        elif p.get("count_include_pad", True) or not any(p["padding"]):
            div = float(math.prod(p["kernel_size"]))
        else:
            div = 1.0   # border windows may average fewer entries: the safe divisor
        return math.sqrt(_overlap(p) * math.prod(p["kernel_size"])) / div, "sqrt(overlap k) / divisor"

    def transpose(self, node, A):
        B, S = A.shape[:2]
        in_shape = node.params["in_shape"]
        x0 = A.new_zeros(B * S, *in_shape)
        _, vjp = torch.func.vjp(lambda x: self._pool(node, x), x0)
        (r,) = vjp(A.reshape(B * S, *A.shape[2:]))
        return [r.reshape(B, S, *in_shape)]


@register("maxpool")
class MaxPool(BoundRule):
    """2-D max pooling; params kernel_size, stride, padding, dilation (pairs), in_shape [C,H,W]."""

    needs_bounds = True

    def _pool(self, node, x):
        p = node.params
        return F.max_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["dilation"])

    def interval(self, node, inputs):
        (x,) = inputs
        return Interval(self._pool(node, x.lower), self._pool(node, x.upper))

    def _windows(self, node, t, fill):
        """[B, C, H, W] -> [B, C, k, L] windows (padding filled with ``fill``)."""
        p = node.params
        ph, pw = p["padding"]
        t = F.pad(t, (pw, pw, ph, ph), value=fill)
        B, C = t.shape[:2]
        w = F.unfold(t, p["kernel_size"], dilation=p["dilation"], stride=p["stride"])
        return w.view(B, C, -1, w.shape[-1])

    def lipschitz(self, node, Ls):
        """``|max a - max b| <= max |a - b|`` per window, and an element lies in at most
        ``overlap`` windows."""
        c = math.sqrt(_overlap(node.params))
        return c * Ls[0], c, "sqrt(window overlap)"

    def deviation(self, node, centers, devs):
        return devs[0] * math.sqrt(_overlap(node.params))

    def alpha_init(self, node, inputs, B, S, dtype):
        """Lower-line weights ``[B, S, C, k, L]`` >= 0 over each window (normalized in
        ``backward``), starting at CROWN's element; None when every window is decided."""
        onehot, undecided = self.initial_weights(node, inputs[0])
        if not undecided:
            return None
        return onehot.to(dtype).unsqueeze(1).expand(B, S, *onehot.shape[1:]), 0.0, 1.0

    def initial_weights(self, node, x: Interval):
        """-> (weights ``[B, C, k, L]`` of CROWN's lower line: one-hot on the element with the
        largest lower bound, whether some window is undecided (else nothing to optimize))."""
        lw = self._windows(node, x.lower, float("-inf"))
        uw = self._windows(node, x.upper, float("-inf"))
        best_l, j = lw.max(dim=2, keepdim=True)
        u_others = uw.scatter(2, j, float("-inf")).max(dim=2, keepdim=True).values
        return torch.zeros_like(lw).scatter_(2, j, 1.0), bool((best_l < u_others).any())

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """``alpha``: optional lower-line weights ``(for the lower bound, for the upper bound)``,
        each ``[B, S, C, k, L]`` and >= 0 (alpha-CROWN): normalized over each window's real
        (unpadded) elements they give a convex combination, which never exceeds the max; all
        zero falls back to CROWN's element."""
        (x,) = inputs
        p = node.params
        lw = self._windows(node, x.lower, float("-inf"))
        uw = self._windows(node, x.upper, float("-inf"))
        best_l, j = lw.max(dim=2, keepdim=True)             # [B, C, 1, L]
        u_others = uw.scatter(2, j, float("-inf")).max(dim=2, keepdim=True).values
        decided = (best_l >= u_others).squeeze(2)           # [B, C, L]
        u_max = uw.max(dim=2).values                        # [B, C, L]
        onehot = torch.zeros_like(lw).scatter_(2, j, 1.0)   # [B, C, k, L]
        B, C, k, L = onehot.shape
        S = A_lower.shape[1]
        in_shape = p["in_shape"]
        Hp, Wp = in_shape[1] + 2 * p["padding"][0], in_shape[2] + 2 * p["padding"][1]

        def to_input(A_win):  # [B, S, C, k, L] -> [B, S, C, H, W]
            cols = A_win.reshape(B * S, C * k, L)
            img = F.fold(cols, (Hp, Wp), p["kernel_size"], dilation=p["dilation"], stride=p["stride"])
            ph, pw = p["padding"]
            img = img[:, :, ph:ph + in_shape[1], pw:pw + in_shape[2]]
            return img.reshape(B, S, *in_shape)

        def weights(w):
            """Convex weights from ``w >= 0`` over each window's real elements."""
            w = w * torch.isfinite(lw).unsqueeze(1)
            total = w.sum(3, keepdim=True)
            return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), onehot.unsqueeze(1))

        def one(A, upper, w=None):
            A = A.reshape(B, S, C, L)
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            if upper:
                Ap, An = An, Ap  # Ap now takes the lower relaxation
            # lower relaxation: the chosen element (coefficient 1), or a convex combination;
            # upper relaxation: the chosen element if decided, else the constant u_max
            bias = (An * (~decided).unsqueeze(1) * u_max.unsqueeze(1)).flatten(2).sum(-1)
            if w is None:
                lin = Ap + An * decided.unsqueeze(1)
                return to_input(lin.unsqueeze(3) * onehot.unsqueeze(1)), bias
            A_win = (Ap.unsqueeze(3) * weights(w)
                     + (An * decided.unsqueeze(1)).unsqueeze(3) * onehot.unsqueeze(1))
            return to_input(A_win), bias

        A_l, b_l = one(A_lower, False, None if alpha is None else alpha[0])
        A_u, b_u = one(A_upper, True, None if alpha is None else alpha[1])
        return [(A_l, A_u)], b_l, b_u
