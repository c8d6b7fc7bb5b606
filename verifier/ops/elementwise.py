"""Element-wise arithmetic: y = x * w + b with constants (Sub/Div normalization, BatchNorm in eval,
Mul/Div by constants, Neg), the sum of perturbed tensors (residual blocks), and the product of
two perturbed tensors (McCormick planes).
"""
from __future__ import annotations

import torch

from ..bound_types import Interval
from .base import AffineRule, BoundRule, dot, pos_neg, register, unbroadcast


@register("affine")
class ElementwiseAffine(AffineRule):
    """``y = x * w + b``; params ``w``, ``b``: constants broadcastable to the node (or None)."""

    def interval(self, node, inputs):
        (x,) = inputs
        w, b = node.params.get("w"), node.params.get("b")
        mid, rad = x.center, x.radius
        if w is not None:
            mid, rad = mid * w, rad * w.abs()
        if b is not None:
            mid = mid + b
        if mid.shape != rad.shape:
            rad = rad.expand_as(mid)
        return Interval(mid - rad, mid + rad)

    def point(self, node, inputs):
        x = inputs[0]
        w, b = node.params.get("w"), node.params.get("b")
        if w is not None:
            x = x * w
        return x if b is None else x + b

    def transpose(self, node, A):
        w = node.params.get("w")
        if w is not None:
            A = A * w
        return [unbroadcast(A, node.params["in_shape"])]

    def bias(self, node, A):
        b = node.params.get("b")
        return 0.0 if b is None else dot(A, b)


@register("add")
class Add(AffineRule):
    """``y = sum_i sign_i x_i`` (broadcasting); params ``signs``: +1/-1 per input."""

    def interval(self, node, inputs):
        lo = up = 0
        for s, x in zip(node.params["signs"], inputs):
            if s > 0:
                lo, up = lo + x.lower, up + x.upper
            else:
                lo, up = lo - x.upper, up - x.lower
        return Interval(lo, up)

    def transpose(self, node, A):
        return [unbroadcast(A if s > 0 else -A, shp)
                for s, shp in zip(node.params["signs"], node.params["in_shapes"])]


@register("mul")
class Mul(BoundRule):
    """``z = x * y`` for two perturbed tensors, relaxed by McCormick planes over the box
    ``[lx, ux] x [ly, uy]``:  z >= ly x + lx y - lx ly,  z <= uy x + lx y - lx uy."""

    needs_bounds = True

    def interval(self, node, inputs):
        x, y = inputs
        c = torch.stack([x.lower * y.lower, x.lower * y.upper, x.upper * y.lower, x.upper * y.upper])
        return Interval(c.min(0).values, c.max(0).values)

    def backward(self, node, A_lower, A_upper, inputs):
        x, y = inputs
        shape = node.shape
        lx, uy, ly = (torch.broadcast_to(t, (t.shape[0], *shape)).unsqueeze(1)
                      for t in (x.lower, y.upper, y.lower))
        sx, sy = node.params["in_shapes"]

        def one(A, upper):
            Ap, An = pos_neg(A)
            if upper:  # A+ takes the upper plane, A- the lower
                Ap, An = An, Ap
            # lower plane (ly, lx, -lx ly) for An...; written once for both directions:
            ax = An * uy + Ap * ly
            ay = A * lx
            b = (An * (-lx * uy) + Ap * (-lx * ly)).flatten(2).sum(-1)
            return unbroadcast(ax, sx), unbroadcast(ay, sy), b

        axl, ayl, bl = one(A_lower, False)
        axu, ayu, bu = one(A_upper, True)
        return [(axl, axu), (ayl, ayu)], bl, bu
