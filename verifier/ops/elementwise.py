"""Element-wise arithmetic: y = x * w + b with constants (Sub/Div normalization, BatchNorm in eval,
Mul/Div by constants, Neg), the sum of perturbed tensors (residual blocks), and the product of
two perturbed tensors (McCormick planes).
"""
from __future__ import annotations

import math

import torch

from ..shapes import broadcast_shapes
from ..bound_types import Interval
from ..devices import as_tensor
from ..errors import VerifierError
from .base import (AffineRule, BoundRule, NotSupported, dot, live_from_module, register,
                   unbroadcast)
from .bilinear import crown_alpha, mccormick_backward, mix_init


def _full(t, shape):
    """A constant broadcast to the full per-sample map, with a batch dim of 1 if it has none."""
    t = as_tensor(t)
    if t.ndim <= len(shape):
        t = t.expand(*shape).unsqueeze(0)
    return t


def _batchnorm_affine(mod, stats, eps: float, ndim: int, dtype):
    """``w = gamma / sqrt(var + eps)``, ``b = beta - mean w`` from a BatchNorm module's live
    parameters, with its running statistics (eval mode) or the clean batch's ``stats``."""
    if mod.training:
        if stats is None:
            raise VerifierError(f"BatchNorm module {type(mod).__name__} is in training mode: give "
                                "the clean batch's statistics (verifier.graph.live.BatchStats)")
        mean, var = stats
    else:
        mean, var = mod.running_mean, mod.running_var
    scale = torch.rsqrt(var.to(dtype) + eps)
    if mod.weight is not None:
        scale = scale * mod.weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if mod.bias is not None:
        shift = shift + mod.bias.to(dtype)
    view = (-1,) + (1,) * (ndim - 1)
    return scale.reshape(view), shift.reshape(view)


@register("affine")
class ElementwiseAffine(AffineRule):
    """``y = x * w + b``; params ``w``, ``b``: constants broadcastable to the node (or None)."""

    def interval(self, node, inputs):
        (x,) = inputs
        w, b = node.params.get("w"), node.params.get("b")
        if w is None:  # a shift: exact ends (the centre-radius form loses a small b next to a
            #            wide interval: [0, 1e9] + 1e-5 would start at 0 in float32)
            lo, up = x.lower + b, x.upper + b
            return Interval(lo.expand(broadcast_shapes(lo.shape, up.shape)), up)
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

    def constant_shift(self, node):
        p = node.params
        return p.get("b") if p.get("w") is None else None

    def channel_scale(self, node, channels):
        """``(w, b)`` as ``[channels]`` vectors (None where absent) when the node scales and
        shifts each channel of its input (no broadcast), else None."""
        p = node.params
        if tuple(p.get("in_shape", ())) != tuple(node.shape):
            return None
        want = (channels,) + (1,) * (len(node.shape) - 1)
        out = []
        for key in ("w", "b"):
            t = p.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != want):
                return None
            out.append(None if t is None else t.reshape(channels))
        return tuple(out)

    def op_norm(self, node):
        """``max |w|``, times ``sqrt(copies)`` where broadcasting repeats each input entry."""
        w = node.params.get("w")
        rep = math.prod(node.shape) / max(1, math.prod(node.params["in_shape"]))
        if w is None:
            return math.sqrt(rep), "shift only"
        return float(w.detach().abs().max()) * math.sqrt(rep), "max |scale| (diagonal)"

    def patchable(self, node) -> bool:
        return tuple(node.params["in_shape"]) == tuple(node.shape)

    def patch_step(self, node, g, vl, vu, inputs):
        p = node.params
        bl = bu = 0.0
        w, b = p.get("w"), p.get("b")
        shape = node.shape
        if w is not None:
            ww = g.windows(lambda: _full(w, shape).to(vl.dtype).expand(vl.shape[0], *shape),
                           ("w", node.name))
            nl, nu = vl * ww, (vu * ww if vu is not vl else None)
        else:
            nl, nu = vl, (vu if vu is not vl else None)
        if b is not None:
            bw = g.windows(lambda: _full(b, shape).to(vl.dtype).expand(vl.shape[0], *shape),
                           ("b", node.name)).flatten(2)
            bl = (vl.flatten(2) * bw).sum(-1)
            bu = bl if vu is vl else (vu.flatten(2) * bw).sum(-1)
        return [(g, nl, nl if nu is None else nu)], bl, bu

    def live_params(self, node, named, modules, batch_stats):
        """A folded BatchNorm (``params["batchnorm"]``) is folded again from the module's live
        parameters and statistics (see ``verifier.graph.live``)."""
        params, used = live_from_module(node, named)
        bn = node.params.get("batchnorm")
        if bn is None:
            return params, used
        mod = modules.get(bn["module"])
        if mod is None:
            raise VerifierError(f"node {node.name!r}: no BatchNorm module {bn['module']!r} in "
                                "the model")
        stats = (batch_stats or {}).get(bn["module"])
        params["w"], params["b"] = _batchnorm_affine(mod, stats, bn["eps"], len(params["in_shape"]),
                                                     params["w"].dtype)
        used |= {f"{bn['module']}.{k}" for k in ("weight", "bias") if getattr(mod, k) is not None}
        return params, used


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

    @staticmethod
    def _spread(node) -> list[float]:
        """Per input, ``sqrt(numel(out) / numel(in))``: broadcasting copies each element that
        many times on average, so ``||broadcast(x)||_2 = spread · ||x||_2`` (the copies are
        equal in number for every element)."""
        n = math.prod(node.shape)
        return [math.sqrt(n / math.prod(s)) for s in node.params["in_shapes"]]

    def lipschitz(self, node, Ls):
        w = self._spread(node)
        return sum(c * L for c, L in zip(w, Ls)), float(sum(w)), "sum of branches"

    def norm_on(self, node, ctx):
        return sum(c * ctx.N[i] for c, i in zip(self._spread(node), node.inputs))

    def deviation(self, node, centers, devs):
        return sum(c * d for c, d in zip(self._spread(node), devs))

    def patchable(self, node) -> bool:
        return all(tuple(s) == tuple(node.shape) for s in node.params["in_shapes"])

    def patch_step(self, node, g, vl, vu, inputs):
        outs = []
        for s in node.params["signs"]:
            if s > 0:
                outs.append((g, vl, vu))
            else:
                nl = -vl
                outs.append((g, nl, nl if vu is vl else -vu))
        return outs, 0.0, 0.0


@register("mul")
class Mul(BoundRule):
    """``z = x * y`` for two perturbed tensors (broadcasting; params ``in_shapes``), relaxed by
    McCormick planes over the box ``[lx, ux] x [ly, uy]`` (``verifier.ops.bilinear``): CROWN
    takes, per element, one plane of each pair (``corner_mix``: ``z >= ly x + lx y - lx ly``
    or ``z >= uy x + ux y - ux uy`` below, ``z <= uy x + lx y - lx uy`` or ``z <= ly x + ux y
    - ux ly`` above); alpha-CROWN mixes the two of each pair, per spec row and element,
    starting from CROWN's."""

    needs_bounds = True

    def lipschitz(self, node, Ls):
        raise NotSupported(self.op, "lipschitz",
                           "a product of two perturbed tensors has no global Lipschitz constant")

    @staticmethod
    def _per_sample(node, t):
        """``t: [B, *s]`` with size-1 dims after the batch dim up to the node's rank, so that
        broadcasting follows the per-sample shapes (not the batch dim against a sample's)."""
        extra = len(node.shape) + 1 - t.ndim
        return t.view(t.shape[0], *[1] * extra, *t.shape[1:]) if extra > 0 else t

    def interval(self, node, inputs):
        x, y = ([self._per_sample(node, t) for t in (i.lower, i.upper)] for i in inputs)
        c = torch.stack([x[0] * y[0], x[0] * y[1], x[1] * y[0], x[1] * y[1]])
        return Interval(c.min(0).values, c.max(0).values)

    def point(self, node, inputs):
        x, y = (self._per_sample(node, t) for t in inputs)
        return x * y

    def alpha_init(self, node, inputs, B, S, dtype):
        """The mix of the two lower planes and of the two upper planes (``[2, B, S, *shape]`` in
        [0, 1]) per spec row and element, starting at CROWN's choice (``corner_mix``)."""
        return mix_init(*self._broadcast(node, inputs), lambda a, b: a * b, B, S, node.shape,
                        dtype)

    def _broadcast(self, node, inputs):
        """The inputs' intervals broadcast to ``[B, *node.shape]``."""
        shape = node.shape
        return [Interval(*(torch.broadcast_to(self._per_sample(node, t), (t.shape[0], *shape))
                           for t in (i.lower, i.upper))) for i in inputs]

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """``alpha``: optional ``(for the lower bound, for the upper bound)``, each ``[2, B, S,
        *shape]`` in [0, 1]: the mix of the lower planes (index 0) and of the upper planes (1)."""
        sx, sy = node.params["in_shapes"]
        x, y = self._broadcast(node, inputs)

        def prod(a, b):
            return a * b

        if alpha is None:
            alpha = crown_alpha(x, y, prod)

        def adj(w, t):
            return w * t.unsqueeze(1)

        return mccormick_backward(A_lower, A_upper, alpha, x, y, prod, adj, adj, sx, sy)
