"""Layers whose parameters are perturbed: ``y = x W^T + b`` (``linear_w``) and
``y = conv(x, W) + b`` (``conv_w``) with W and/or b among the node's inputs, and a parameter moving
along a segment, ``W = W0 + t·delta`` (``param_affine``).

Inputs of ``linear_w``/``conv_w`` are ``[x, *params]``; ``params["roles"]`` names each parameter
input ("weight" or "bias"), ``params["layouts"]`` says when a weight input is stored transposed
(ONNX MatMul), and the roles not perturbed stay constants in ``params`` as in ``linear``/``conv``.
Parameter intervals carry a batch dim of 1 (one set shared by every sample) or of the batch.

The bilinear product of a perturbed input and a perturbed weight is relaxed per product around
the centers of both intervals::

    x w = xc w + wc x - xc wc + (x - xc)(w - wc),      |(x - xc)(w - wc)| <= rx rw,

so the linear part is the same for the lower and the upper bound and only the constant moves, by
``|A|·(rx rw)`` summed over the products (exact when the input is fixed, rx = 0). IBP uses the
exact range of each product when the input is non-negative (after a ReLU, images) and for
``linear_w`` in general; ``conv_w`` with a sign-changing input uses the center/radius form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bound_types import Interval
from .base import AffineRule, BoundRule, register
from .linear import _conv_args, _fold, conv_adjoint, frobenius, window_count
from .norms import dense_norm

# products held at once by the exact IBP of a linear layer with sign-changing inputs
_CORNER_ELEMENTS = 2 ** 22


def _shared(t: torch.Tensor) -> torch.Tensor | None:
    """The one sample of a parameter tensor that is the same for the whole batch, else None."""
    if t.shape[0] == 1:
        return t[0]
    if t.stride(0) == 0:
        return t[0]
    return None


def _params(node, inputs):
    """-> (x, W, b, roles): Intervals, W and b with a leading batch dim (1 for constants), W in
    the node's layout; b None without a bias."""
    x, rest = inputs[0], inputs[1:]
    got = dict(zip(node.params["roles"], rest))
    layouts = node.params.get("layouts", {})
    W = got.get("weight")
    if W is None:
        c = node.params["weight"].unsqueeze(0)
        W = Interval(c, c)
    elif layouts.get("weight") == "t":
        W = Interval(W.lower.transpose(-1, -2), W.upper.transpose(-1, -2))
    b = got.get("bias")
    if b is None and node.params.get("bias") is not None:
        c = node.params["bias"].unsqueeze(0)
        b = Interval(c, c)
    return x, W, b, node.params["roles"]


def _bview(d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample numbers ``[B | 1]`` (float64) shaped to broadcast against ``like``."""
    return d.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _dot(A, t):
    """``sum A * t`` over the node's dims: ``A: [B, S, *out]``, ``t: [1 | B, *out]`` -> [B, S]."""
    return (A * t.unsqueeze(1)).flatten(2).sum(-1)


class _Bilinear(BoundRule):
    """Shared CROWN rule of ``y = f(x, W) + b``, f linear in each argument."""

    needs_bounds = True
    # the rule concretizes its weight's ball itself (``concretize_weight``; params
    # ``weight_ball``) instead of returning the weight's A
    fuses_weight_ball = False

    def f(self, node, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``f(x, W)`` for ``x: [B, *in]`` and ``W: [1 | B, *weight]``."""
        raise NotImplementedError

    def adj_x(self, node, A, W):
        """A·f(., W): ``A: [B, S, *out]``, ``W: [1 | B, *weight]`` -> ``[B, S, *in]``."""
        raise NotImplementedError

    def adj_w(self, node, A, x):
        """A·f(x, .): -> ``[B, S, *weight]``."""
        raise NotImplementedError

    def adj_b(self, node, A):
        """A·b for a bias b: -> ``[B, S, out_channels]``."""
        raise NotImplementedError

    def patch_norms(self, node, t):
        """``||patch_p(t)||_2`` for every output position p (the input window that one output
        reads), broadcastable to the output: ``[B, 1 | *out]``."""
        raise NotImplementedError

    def channel_sum(self, node, A):
        """Sum ``A: [B, S, *out]`` over the output positions of each channel -> [B, S, C_out]."""
        raise NotImplementedError

    def window_count(self, node) -> int:
        """The most output windows that read one input entry."""
        raise NotImplementedError

    def deviation(self, node, centers, devs):
        """``||f(., Wc)||·d_x + ||f(., dW)||·(||x0|| + d_x) + ||db||`` (times sqrt(positions) for
        a convolution's bias), operator norms bounded by the spectral norm (dense) or
        ``||K||_F sqrt(m)`` (convolutions; ``||dW||_F`` for the perturbed weight)."""
        p = node.params
        roles = dict(zip(p["roles"], devs[1:]))
        center = dict(zip(p["roles"], centers[1:]))
        d_x = devs[0]
        conv = self.op == "conv_w"
        if "weight" in roles:
            Wc = center["weight"][0]
            if p.get("layouts", {}).get("weight") == "t":
                Wc = Wc.t()
        else:
            Wc = p["weight"]
        m = math.sqrt(window_count(p)) if conv else 1.0
        op_c = frobenius(Wc) * m if conv else dense_norm(Wc)
        out = op_c * d_x
        if "weight" in roles:
            x0n = torch.linalg.vector_norm(centers[0].double().flatten(1), dim=1)
            dw = roles["weight"]
            # a weight that does not move adds nothing, even when d_x is unbounded (0·inf)
            out = out + torch.where(dw > 0, dw * m * (x0n + d_x), torch.zeros_like(dw))
        if "bias" in roles:
            # one bias per channel, added at every spatial position (conv) or token (linear)
            positions = math.prod(node.shape[1:]) if conv else math.prod(node.shape[:-1])
            out = out + roles["bias"] * math.sqrt(positions)
        return out

    def point(self, node, inputs):
        """``f(x, W) + b`` at a point (differentiable)."""
        x, W, b, _ = _params(node, [Interval(v, v) for v in inputs])
        y = self.f(node, x.lower, W.lower)
        return y if b is None else y + self._bias_term(node, b.lower)

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        x, W, b, roles = _params(node, inputs)
        eps2 = node.params.get("l2_eps")
        if eps2 is not None:
            return self._backward_l2(node, A_lower, A_upper, x, W, b, roles, eps2)
        if "weight" not in roles:  # only the bias moves: the layer is affine in (x, b)
            Wl = Wu = W.lower
            xa = None
        else:
            Wl, Wu, xa = W.lower, W.upper, x.lower
        const_b = None
        if b is not None and "bias" not in roles:
            const_b = self._bias_term(node, b.lower)

        def one(A, upper):
            # lower bound: A+ takes the lower plane at (xl, wl), A- the upper plane at (xl, wu);
            # the upper bound swaps the planes
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            Wp, Wn = (Wu, Wl) if upper else (Wl, Wu)
            ax = self.adj_x(node, Ap, Wp) + self.adj_x(node, An, Wn)
            bias = 0.0
            if xa is not None:
                bias = -(_dot(Ap, self.f(node, xa, Wp)) + _dot(An, self.f(node, xa, Wn)))
            if const_b is not None:
                bias = bias + _dot(A, const_b)
            ball = node.params.get("weight_ball")
            if ball is not None:  # the weight's set is concretized here, without forming A_W
                bias = bias + self.concretize_weight(node, A, xa, ball, upper)
            return ax, self._weight_parts(node, A, xa, roles, fused=ball is not None), bias

        axl, pl, bl = one(A_lower, False)
        axu, pu, bu = one(A_upper, True)
        return [(axl, axu)] + [(p, q) for p, q in zip(pl, pu)], bl, bu

    def concretize_weight(self, node, A, xa, ball, upper: bool):
        """min (max) over the weight's ball of ``A·f(xa, W)`` -> [B, S]; rules that can do it
        without forming ``A_W`` (``[B, S, *weight]``) implement it and get ``weight_ball``."""
        raise NotImplementedError

    def _weight_parts(self, node, A, xa, roles, fused: bool = False):
        parts = []
        for role in roles:
            if role == "weight" and fused:
                parts.append(None)
            elif role == "weight":
                aw = self.adj_w(node, A, xa)
                if node.params.get("layouts", {}).get("weight") == "t":
                    aw = aw.transpose(-1, -2)
                parts.append(aw)
            else:
                parts.append(self.adj_b(node, A))
        return parts

    def _backward_l2(self, node, A_lower, A_upper, x, W, b, roles, eps):
        """The weight is an L2 (Frobenius) ball of radius eps around ``wc``: around the centers,
        ``x w = wc x + xc w - xc wc + dw (x - xc)`` and, with ``dw_o`` the weights of output
        channel o, ``sum |a| |dw_o · patch(x - xc)| <= eps ||(sum_p |a_op| ||patch_p(rx)||)_o||_2``
        (Cauchy-Schwarz twice; ``sum_o ||dw_o||^2 <= eps^2``)."""
        Wc, xc = W.center, x.center
        pn = self.patch_norms(node, x.radius)
        joint = None
        dev = node.params.get("dev")
        if dev is not None:
            # expand around the clean x0 instead where ||x - x0||_2 <= d_x is the smaller
            # radius: every window's deviation is at most d_x too
            x0, d_x = dev[0].to(xc.dtype), dev[1]
            far = torch.maximum(x0 - x.lower, x.upper - x0)
            box0 = torch.linalg.vector_norm(far.flatten(1), dim=1).double()
            rho = torch.minimum(d_x.expand_as(box0), box0)
            use0 = rho < torch.linalg.vector_norm(x.radius.flatten(1), dim=1).double()
            if bool(use0.any()):
                xc = torch.where(_bview(use0.double(), xc) > 0, x0, xc)
                pn0 = torch.minimum(self.patch_norms(node, far), _bview(rho, pn))
                pn = torch.where(_bview(use0.double(), pn) > 0, pn0, pn)
                joint = torch.where(use0, rho, torch.full_like(rho, math.inf))
        const = self.f(node, xc, Wc)
        if b is not None and "bias" not in roles:
            const = const - self._bias_term(node, b.lower)

        def one(A, sign):
            ax = self.adj_x(node, A, Wc)
            v = self.channel_sum(node, A.abs() * pn.unsqueeze(1))
            if joint is not None:
                # Cauchy-Schwarz over the windows: sum_p |a_op| ||patch_p(dx)|| <=
                # ||a_o||_2 sqrt(m) ||dx||_2 (each input entry lies in at most m windows)
                a2 = self.channel_sum(node, A * A).sqrt()
                cap = a2 * (self.window_count(node) ** 0.5) * _bview(joint, a2)
                v = torch.minimum(v, cap)
            bias = -_dot(A, const) + sign * eps * torch.linalg.vector_norm(v, dim=-1)
            ball = node.params.get("weight_ball")
            if ball is not None:
                bias = bias + self.concretize_weight(node, A, xc, ball, sign > 0)
            return ax, self._weight_parts(node, A, xc, roles, fused=ball is not None), bias

        axl, pl, bl = one(A_lower, -1.0)
        axu, pu, bu = one(A_upper, 1.0)
        return [(axl, axu)] + [(p, q) for p, q in zip(pl, pu)], bl, bu

    def _bias_term(self, node, b):
        """The bias broadcast to the node's output: ``[1 | B, *out]``."""
        raise NotImplementedError

    def _nonneg_range(self, node, x, W):
        """Exact range of ``f(x, W)`` for ``x >= 0``: each product's extremes sit at a fixed end
        of the weight interval, picked by its sign."""
        lo = self.f(node, x.lower, W.lower.clamp(min=0)) + self.f(node, x.upper, W.lower.clamp(max=0))
        up = self.f(node, x.upper, W.upper.clamp(min=0)) + self.f(node, x.lower, W.upper.clamp(max=0))
        return lo, up

    def _center_range(self, node, x, W):
        """``f(xc, wc) ± (f(|xc|, rw) + f(rx, |wc|) + f(rx, rw))``: sound for any signs."""
        mid = self.f(node, x.center, W.center)
        rad = (self.f(node, x.center.abs(), W.radius) + self.f(node, x.radius, W.center.abs())
               + self.f(node, x.radius, W.radius))
        return mid - rad, mid + rad

    def interval(self, node, inputs):
        x, W, b, _ = _params(node, inputs)
        if bool((x.lower >= 0).all()):
            lo, up = self._nonneg_range(node, x, W)
        else:
            lo, up = self._general_range(node, x, W)
        eps2 = node.params.get("l2_eps")
        if eps2 is not None:
            # |dw_o · patch(x)| <= eps ||patch(x)||_2 for x in its box
            mid = self.f(node, x.center, W.center)
            rad = self.f(node, x.radius, W.center.abs())
            big = torch.maximum(x.lower.abs(), x.upper.abs())
            rad = rad + eps2 * self.patch_norms(node, big)
            lo, up = torch.maximum(lo, mid - rad), torch.minimum(up, mid + rad)
        if b is not None:
            lo = lo + self._bias_term(node, b.lower)
            up = up + self._bias_term(node, b.upper)
        dev = node.params.get("dev")
        if dev is not None:  # every entry lies within the layer's L2 deviation of y0
            y0, d_y = dev[2], dev[3]
            r = _bview(d_y, y0) + 1e-5 * (1 + y0.abs())
            lo, up = torch.maximum(lo, y0 - r), torch.minimum(up, y0 + r)
        return Interval(lo, up)

    def _general_range(self, node, x, W):
        return self._center_range(node, x, W)


@register("linear_w")
class LinearW(_Bilinear):
    """``y = x W^T + b`` over the last dim with a perturbed weight and/or bias; ``x: [B, *T, in]``
    (``T``: leading token dims, e.g. a transformer's sequence, the same W for every token).

    With tokens, the bilinear relaxation is per product ``x_ti w_oi`` (per token), and the
    weight's linear coefficient sums over tokens: ``A_W[o, i] = sum_t A[t, o] x[t, i]``."""

    fuses_weight_ball = True

    @staticmethod
    def _tokens(t: torch.Tensor, lead: int) -> torch.Tensor:
        """``[B, *T, n]`` -> ``[B, P, n]`` (P = prod T, 1 for a vector input); ``lead``: the
        dims before T (1 for x, 2 for A)."""
        return t.reshape(*t.shape[:lead], -1, t.shape[-1])

    def f(self, node, x, W):
        s = _shared(W)
        if s is not None:  # one weight for the batch: a plain (fast) GEMM
            return F.linear(x, s)
        xs = self._tokens(x, 1)  # [B, P, in] @ [B, in, out]
        return torch.matmul(xs, W.transpose(-1, -2)).reshape(-1, *x.shape[1:-1], W.shape[-2])

    def adj_x(self, node, A, W):
        s = _shared(W)
        if s is not None:
            return A.matmul(s)
        As = A.reshape(A.shape[0], -1, A.shape[-1])  # [B, S*P, out] @ [B, out, in]
        return torch.matmul(As, W).reshape(-1, *A.shape[1:-1], W.shape[-1])

    def adj_w(self, node, A, x):
        """``sum_t A[.., t, o] x[t, i]`` -> ``[B, S, out, in]``."""
        As, xs = self._tokens(A, 2), self._tokens(x, 1)
        if As.shape[2] == 1:
            return As[:, :, 0, :, None] * xs[:, None, 0, None, :]
        return torch.einsum("bspo,bpi->bsoi", As, xs.expand(As.shape[0], *xs.shape[1:]))

    def adj_b(self, node, A):
        return self.channel_sum(node, A)

    def patch_norms(self, node, t):
        return torch.linalg.vector_norm(t, dim=-1, keepdim=True)

    def concretize_weight(self, node, A, xa, ball, upper):
        """``A_W = sum_t A_t ⊗ xa_t`` (an outer product for a vector input): ``A_W·c =
        A·f(xa, c)``; the dual norms: L-inf ``sum |A_W| e`` (e the per-element radii; for a
        vector input ``|A|·(e |xa|)``, with tokens ``A_W`` is formed in chunks of specs), L2
        ``||A_W||_F`` (``||A||_2 ||xa||_2`` for a vector; with tokens from the Gram matrices,
        ``||A_W||_F^2 = sum_{t,t'} (A_t·A_t')(xa_t·xa_t')``)."""
        t = node.params.get("layouts", {}).get("weight") == "t"

        def lay(w):  # stored [1, *shape] -> the node's layout
            return w.transpose(-1, -2) if t else w
        vector = len(node.shape) == 1
        if ball.norm == math.inf:
            box = ball.interval()
            c, e = lay(box.center), lay(box.radius)
            if vector:
                dev = _dot(A.abs(), self.f(node, xa.abs(), e))
            else:
                B, S = A.shape[:2]
                step = max(1, _CORNER_ELEMENTS // max(1, B * e.shape[-1] * e.shape[-2]))
                dev = torch.cat([(self.adj_w(node, A[:, k:k + step], xa).abs() * e.unsqueeze(1))
                                 .flatten(2).sum(-1) for k in range(0, S, step)], 1)
        else:
            c = lay(ball.center)
            eps = ball._eps_t.reshape(-1)[0]
            if vector:
                dev = (eps * torch.linalg.vector_norm(A, dim=-1)
                       * torch.linalg.vector_norm(xa, dim=-1, keepdim=True))
            else:
                As, xs = self._tokens(A, 2), self._tokens(xa, 1)
                ga = torch.matmul(As, As.transpose(-1, -2))           # [B, S, P, P]
                gx = torch.matmul(xs, xs.transpose(-1, -2)).unsqueeze(1)  # [B, 1, P, P]
                dev = eps * (ga * gx).flatten(2).sum(-1).clamp(min=0).sqrt()
        mid = _dot(A, self.f(node, xa, c))
        return mid + dev if upper else mid - dev

    def channel_sum(self, node, A):
        if A.ndim == 3:
            return A
        return self._tokens(A, 2).sum(2)

    def window_count(self, node) -> int:
        return 1

    def _bias_term(self, node, b):
        return b.reshape(b.shape[0], *([1] * (len(node.shape) - 1)), b.shape[-1])

    def _general_range(self, node, x, W):
        """Exact: the min and max of the four corner products of every product, summed; rows
        of W in chunks to bound memory."""
        xl, xu = self._tokens(x.lower, 1), self._tokens(x.upper, 1)
        B, P, n_in = xl.shape
        step = max(1, _CORNER_ELEMENTS // max(1, B * P * n_in))
        xl, xu = xl[:, :, None, :], xu[:, :, None, :]
        lo, up = [], []
        for k in range(0, W.lower.shape[1], step):
            wl, wu = W.lower[:, None, k:k + step], W.upper[:, None, k:k + step]
            c = torch.stack([xl * wl, xl * wu, xu * wl, xu * wu])
            lo.append(c.min(0).values.sum(-1))
            up.append(c.max(0).values.sum(-1))
        shape = (*x.lower.shape[:-1], W.lower.shape[1])
        return torch.cat(lo, -1).reshape(shape), torch.cat(up, -1).reshape(shape)


@register("conv_w")
class ConvW(_Bilinear):
    """2-D convolution (groups 1) with a perturbed weight and/or bias; ``x: [B, C, H, W]``."""

    def f(self, node, x, W):
        p = node.params
        s = _shared(W)
        if s is not None:
            return F.conv2d(x, s, None, **_conv_args(p))
        B = x.shape[0]
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), W.reshape(-1, *W.shape[2:]), None,
                     stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=B)
        return y.reshape(B, -1, *y.shape[2:])

    def adj_x(self, node, A, W):
        p = node.params
        in_shape = p["in_shape"]
        s = _shared(W)
        if s is not None:
            r = conv_adjoint(_fold(A), s, p["stride"], p["padding"], p["dilation"], 1, in_shape[1:])
            return r.reshape(A.shape[0], A.shape[1], *in_shape)
        return torch.stack([conv_adjoint(A[i], W[i], p["stride"], p["padding"], p["dilation"], 1,
                                         in_shape[1:]) for i in range(A.shape[0])])

    def adj_w(self, node, A, x):
        p = node.params
        Wshape = node.params["weight"].shape
        cols = F.unfold(x, Wshape[2:], dilation=p["dilation"], padding=p["padding"], stride=p["stride"])
        aw = torch.einsum("bsol,bkl->bsok", A.flatten(3), cols)
        return aw.reshape(A.shape[0], A.shape[1], *Wshape)

    def adj_b(self, node, A):
        return A.flatten(3).sum(-1)

    def patch_norms(self, node, t):
        p = node.params
        sq = F.unfold(t * t, p["weight"].shape[2:], dilation=p["dilation"], padding=p["padding"],
                      stride=p["stride"]).sum(1)
        return sq.sqrt().reshape(t.shape[0], 1, *node.shape[1:])

    def channel_sum(self, node, A):
        return A.flatten(3).sum(-1)

    def window_count(self, node) -> int:
        return window_count(node.params)

    def _bias_term(self, node, b):
        return b[:, :, None, None]


@register("param_affine")
class ParamAffine(AffineRule):
    """``W = W0 + t·delta`` for a scalar ``t: [1]``; params ``base``, ``direction``."""

    def interval(self, node, inputs):
        (t,) = inputs
        W0, d = node.params["base"].unsqueeze(0), node.params["direction"].unsqueeze(0)
        shape = (-1,) + (1,) * (W0.ndim - 1)
        a, b = t.lower.reshape(shape) * d, t.upper.reshape(shape) * d
        return Interval(W0 + torch.minimum(a, b), W0 + torch.maximum(a, b))

    def transpose(self, node, A):
        return [(A * node.params["direction"]).flatten(2).sum(-1, keepdim=True)]

    def deviation(self, node, centers, devs):
        """``W0 + t·delta`` moves by ``|t - t_c| ||delta||_F``."""
        return devs[0] * frobenius(node.params["direction"])

    def bias(self, node, A):
        return (A * node.params["base"]).flatten(2).sum(-1)
