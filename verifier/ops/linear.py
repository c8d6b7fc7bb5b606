"""Dense and convolutional layers: y = x W^T + b, y = M x, y = conv(x, W) + b, conv_transpose.

IBP uses the center/radius form ``W c + b ± |W| r``; CROWN maps ``A`` to ``A W`` (for a
convolution, the transposed convolution of A).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bound_types import Interval
from .base import AffineRule, NotSupported, register
from .norms import conv_norm, dense_norm


def _row_bias(b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``b`` broadcast to the per-sample ``shape`` as one bias row of the last dim, or None when
    it does not broadcast or varies along a leading dim."""
    try:
        full = torch.broadcast_to(b, shape)
    except RuntimeError:
        return None
    rows = full.reshape(-1, shape[-1])
    if not bool((rows == rows[:1]).all()):
        return None
    return rows[0].clone()


def _fold(A):
    """[B, S, *shape] -> [B*S, *shape]"""
    return A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])


def _scaled_layer(node, w, b) -> dict:
    """A linear / conv node's params followed by ``* w + b`` per output channel (dim 0 of the
    weight): weight ``W * w``, bias ``b0 * w + b``; the parameter names are dropped (the new
    tensors are products, no longer the model's parameters)."""
    params = {k: v for k, v in node.params.items() if k != "param_names"}
    W, b0 = params["weight"], params.get("bias")
    if w is not None:
        W = W * w.reshape(-1, *[1] * (W.ndim - 1))
        b0 = None if b0 is None else b0 * w
    if b is not None:
        b0 = b if b0 is None else b0 + b
    params["weight"], params["bias"] = W, b0
    return params


@register("linear")
class Linear(AffineRule):
    """``y = x W^T + b`` over the last dim; params ``weight: [out, in]``, ``bias: [out] | None``."""

    weight_op = "linear_w"

    def op_norm(self, node):
        return dense_norm(node.params["weight"]), "exact SVD (float64)"

    def has_rows(self, node) -> bool:
        return len(node.shape) == 1

    def absorb_shift(self, node, b):
        """The bias plus ``b`` when ``b`` is one row over the last dim and the sum is exact in
        the weight's dtype; never into a bias a weight perturbation may replace (a named
        parameter: the perturbed value would lose the constant)."""
        if not node.shape or "bias" in node.params.get("param_names", {}):
            return None
        row = _row_bias(b, tuple(node.shape))
        if row is None:
            return None
        old = node.params.get("bias")
        W = node.params["weight"]
        exact = row.double() + (0.0 if old is None else old.double())
        bias = exact.to(W.dtype)
        if not torch.equal(bias.double(), exact):
            return None
        return {**node.params, "bias": bias.to(W.device)}

    def absorb_channel_scale(self, node, w, b):
        # a per-channel scale of a linear node over a sequence is not a scale of its rows
        return _scaled_layer(node, w, b) if len(node.shape) == 1 else None

    def rows(self, node, idx):
        b = node.params.get("bias")
        return node.params["weight"][idx], (None if b is None else b[idx])

    def interval(self, node, inputs):
        (x,) = inputs
        W, b = node.params["weight"], node.params.get("bias")
        mid = F.linear(x.center, W, b)
        rad = F.linear(x.radius, W.abs())
        return Interval(mid - rad, mid + rad)

    def point(self, node, inputs):
        return F.linear(inputs[0], node.params["weight"], node.params.get("bias"))

    def transpose(self, node, A):
        return [A.matmul(node.params["weight"])]

    def bias(self, node, A):
        b = node.params.get("bias")
        if b is None:
            return 0.0
        return A.matmul(b).flatten(2).sum(-1) if A.ndim > 3 else A.matmul(b)


@register("matmul_left")
class MatMulLeft(AffineRule):
    """``y = M x`` with a constant ``M: [m, k]`` and ``x: [..., k, n]`` (per sample)."""

    def interval(self, node, inputs):
        (x,) = inputs
        M = node.params["M"]
        mid = M.matmul(x.center)
        rad = M.abs().matmul(x.radius)
        return Interval(mid - rad, mid + rad)

    def transpose(self, node, A):
        return [node.params["M"].transpose(-1, -2).matmul(A)]

    def op_norm(self, node):
        return dense_norm(node.params["M"]), "exact SVD (float64)"


def _channel_bias(node, A):
    """``A·b`` for a per-channel bias over the spatial dims: [B, S]."""
    b = node.params.get("bias")
    if b is None:
        return 0.0
    nd = node.params["weight"].ndim - 2
    return A.sum(dim=tuple(range(-nd, 0))).matmul(b)


def _conv_fn(nd):
    return F.conv1d if nd == 1 else F.conv2d


def _conv_args(p):
    return dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])


# elements of the column buffer per chunk of rows in ``fold_adjoint``: small enough to stay in
# the CPU cache (one buffer for all rows runs about 3x slower)
FOLD_CHUNK = 2 ** 19


def folds_faster(W, groups, rows) -> bool:
    """Whether ``fold_adjoint`` beats the built-in transposed convolution (CPU, strided 2-D):
    it does for narrow columns (few input channels times kernel taps, e.g. an image's first
    layer or a 1x1 shortcut) and for many rows; the built-in one for wide kernels on few rows."""
    return W.ndim == 4 and groups == 1 and (W.shape[1] * W.shape[2] * W.shape[3] <= 96 or rows >= 512)


def fold_adjoint(A, W, out_size, stride, padding=(0, 0), dilation=(1, 1)):
    """``conv_transpose2d(A, W)`` (groups 1), cropped by ``padding`` to ``out_size``, as columns
    ``W^T A`` then a scatter-add (``F.fold``), in chunks of rows (see ``folds_faster`` for when
    it pays off). ``A: [N, C_out, h, w]`` -> ``[N, C_in, *out_size]``."""
    N, co = A.shape[:2]
    Wt = W.reshape(co, -1).t()
    A = A.reshape(N, co, -1)
    step = max(1, FOLD_CHUNK // (Wt.shape[0] * A.shape[2]))
    if torch.is_grad_enabled() and (A.requires_grad or W.requires_grad):
        step = N  # under autograd each chunk's slice would cost a full-size copy backwards
    out = None
    for k in range(0, N, step):
        y = F.fold(torch.matmul(Wt, A[k:k + step]), tuple(out_size), tuple(W.shape[2:]),
                   dilation=dilation, padding=padding, stride=stride)
        if step >= N:
            return y
        if out is None:
            out = y.new_empty(N, *y.shape[1:])
        out[k:k + step] = y
    return out


def conv_adjoint(A, W, stride, padding, dilation, groups, in_spatial):
    """The adjoint of ``conv(x, W)`` applied to ``A: [N, C_out, *out]`` -> ``[N, C_in, *in_spatial]``.

    With stride 1 it is written as a plain convolution of the padded A with the flipped kernel
    whose in/out channels are swapped per group: on CPU about 2x faster than ``conv_transpose``
    for the small channel counts of verification benchmarks. Strided: ``fold_adjoint`` or
    ``conv_transpose``, whichever ``folds_faster`` picks.
    """
    nd = W.ndim - 2
    k = W.shape[2:]
    # with a weight that takes gradients (certified training) the built-in transposed
    # convolution is much faster: fold's column matmul broadcasts W over the rows and W's
    # gradient sums them back (about 3x the time, forward and backward, on cnn_cert)
    tracked = torch.is_grad_enabled() and W.requires_grad
    if any(s > 1 for s in stride) and not tracked and folds_faster(W, groups, A.shape[0]):
        return fold_adjoint(A, W, in_spatial, stride, padding, dilation)
    if any(s > 1 for s in stride):  # strided: the built-in transposed convolution is faster
        out_pad = [in_spatial[i] - ((A.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                    + dilation[i] * (k[i] - 1) + 1) for i in range(nd)]
        tconv = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
        return tconv(A, W, None, stride=stride, padding=padding, output_padding=tuple(out_pad),
                     groups=groups, dilation=dilation)
    pads = []
    for i in reversed(range(nd)):
        lo = dilation[i] * (k[i] - 1) - padding[i]
        # rows of the input that no window reached (floor in the forward size) get zero
        hi = in_spatial[i] - A.shape[2 + i] - lo + dilation[i] * (k[i] - 1)
        pads += [lo, hi]
    A = F.pad(A, pads)
    co, ci_g = W.shape[0], W.shape[1]
    Wt = W.reshape(groups, co // groups, ci_g, *k).transpose(1, 2).reshape(groups * ci_g, co // groups, *k)
    Wt = Wt.flip(tuple(range(2, 2 + nd)))
    return _conv_fn(nd)(A, Wt, None, stride=1, padding=0, dilation=dilation, groups=groups)


def window_count(p) -> int:
    """The most output windows of a convolution (params ``p``) that read one input entry."""
    k = p["weight"].shape[2:]
    if any(d != 1 for d in p["dilation"]):
        return math.prod(k)
    return math.prod(math.ceil(kk / s) for kk, s in zip(k, p["stride"]))


def frobenius(W: torch.Tensor) -> float:
    """``||W||_F`` in float64."""
    return float(torch.linalg.vector_norm(W.double()))


def _tconv(x, W, stride, groups, dilation, out_size):
    """``conv_transpose2d(x, W)`` without padding, by the fastest route on CPU for its shape."""
    N, co, h, w = x.shape
    if groups == 1 and h * w == 1 and all(d == 1 for d in dilation):  # one position: a matmul
        return (x.reshape(N, co) @ W.reshape(co, -1)).reshape(N, *W.shape[1:])
    if any(s > 1 for s in stride) and folds_faster(W, groups, N):  # columns, then scatter-add
        return fold_adjoint(x, W, out_size, stride, dilation=dilation)
    return F.conv_transpose2d(x, W, None, stride=stride, groups=groups, dilation=dilation)


@register("conv")
class Conv(AffineRule):
    """1-D/2-D convolution; params weight, bias, stride, padding, dilation, groups
    (padding: ints per spatial dim, zeros)."""

    weight_op = "conv_w"

    def absorb_channel_scale(self, node, w, b):
        return _scaled_layer(node, w, b)

    def lifted(self, node, pname):
        w = node.params["weight"]
        if w.ndim != 4 or node.params["groups"] != 1:
            raise NotSupported(self.op, "a weight perturbation",
                               f"parameter {pname!r}: node {node.name!r} is a {w.ndim - 2}-D "
                               f"convolution with groups={node.params['groups']}; weight "
                               "perturbations support 2-D convolutions with groups=1")
        return self.weight_op

    def op_norm(self, node):
        p = node.params
        return conv_norm(p["weight"], p["in_shape"], node.shape, p["stride"], p["padding"],
                         p["dilation"], p["groups"])

    def deviation(self, node, centers, devs):
        """The cheap bound ``||K||_F sqrt(m)`` (m: ``window_count``), not ``op_norm``'s FFT."""
        return devs[0] * (frobenius(node.params["weight"]) * math.sqrt(window_count(node.params)))

    def patchable(self, node) -> bool:
        return node.params["weight"].ndim == 4

    def patch_step(self, node, g, vl, vu, inputs):
        """The window grows through the kernel (``g.back_through_conv``); A maps by the
        transposed convolution, masked to 0 outside the input map (the zero padding)."""
        p = node.params
        Wt, bias = p["weight"], p.get("bias")
        gi = g.back_through_conv(Wt.shape[2:], p["stride"], p["padding"], p["dilation"])
        _, Hin, Win = p["in_shape"]
        mask = gi.mask(Hin, Win, vl.dtype)
        inside = bool(mask.all())

        def one(v):
            B, K = v.shape[:2]
            y = _tconv(v.reshape(B * K, *v.shape[2:]), Wt, p["stride"], p["groups"], p["dilation"],
                       gi.size)
            y = y.reshape(B, K, *y.shape[1:])
            if not inside:
                y.mul_(mask)
            return y, (0.0 if bias is None else v.sum(dim=(-1, -2)).matmul(bias))

        al, bl = one(vl)
        au, bu = (al, bl) if vu is vl else one(vu)
        return [(gi, al, au)], bl, bu

    def interval(self, node, inputs):
        (x,) = inputs
        p = node.params
        conv = _conv_fn(p["weight"].ndim - 2)
        mid = conv(x.center, p["weight"], p.get("bias"), **_conv_args(p))
        rad = conv(x.radius, p["weight"].abs(), None, **_conv_args(p))
        return Interval(mid - rad, mid + rad)

    def transpose(self, node, A):
        p = node.params
        in_shape = p["in_shape"]
        r = conv_adjoint(_fold(A), p["weight"], p["stride"], p["padding"], p["dilation"],
                         p["groups"], in_shape[1:])
        return [r.reshape(A.shape[0], A.shape[1], *in_shape)]

    def bias(self, node, A):
        return _channel_bias(node, A)


@register("conv_transpose")
class ConvTranspose(AffineRule):
    """1-D/2-D transposed convolution; params weight, bias, stride, padding, output_padding,
    dilation, groups. Its adjoint is the plain convolution with the same weight."""

    @staticmethod
    def _fn(nd):
        return F.conv_transpose1d if nd == 1 else F.conv_transpose2d

    def _args(self, p):
        return dict(stride=p["stride"], padding=p["padding"], output_padding=p["output_padding"],
                    groups=p["groups"], dilation=p["dilation"])

    def interval(self, node, inputs):
        (x,) = inputs
        p = node.params
        f = self._fn(p["weight"].ndim - 2)
        mid = f(x.center, p["weight"], p.get("bias"), **self._args(p))
        rad = f(x.radius, p["weight"].abs(), None, **self._args(p))
        return Interval(mid - rad, mid + rad)

    def transpose(self, node, A):
        p = node.params
        W = p["weight"]
        nd = W.ndim - 2
        conv = _conv_fn(nd)
        r = conv(_fold(A), W, None, stride=p["stride"], padding=p["padding"], dilation=p["dilation"],
                 groups=p["groups"])
        in_shape = p["in_shape"]
        r = r[(...,) + tuple(slice(0, s) for s in in_shape[1:])]
        return [r.reshape(A.shape[0], A.shape[1], *in_shape)]

    def bias(self, node, A):
        return _channel_bias(node, A)
