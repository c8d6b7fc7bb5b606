"""Part of the graph mapping: source ops written as a chain of rules (``Builder.add_inner``
nodes named ``<node>/<part>``, the last one under the source op's own name).

* LayerNorm over the last ``k`` dims: ``m = mean(x)``, ``c = x - m``, ``v = var(x)`` (one
  rule, ``verifier.ops.layernorm``), ``r = rsqrt(v + eps)``, ``y = c * r`` (a product that knows ``r``'s
  definition, ``verifier.ops.layernorm``), then ``gamma y + beta``. The variance is a convex function of ``x``: its lower bound is the exact least
  variance over ``x``'s box (IBP), a tangent plane of ``x`` and the square of CROWN's bound of one centred direction of ``x`` (CROWN), not a sum of
  intervals of the squared centred values (0 as soon as each may change sign), so it stays
  above 0 where ``x`` varies little and ``1 / sqrt`` does not blow up.
* RMSNorm: the same without the centring; GroupNorm: LayerNorm over each group of channels
  (a reshape to ``[G, rest]``, the chain, a reshape back, the per-channel affine).
* softmax / log_softmax over a dim: ``1 / sum_j exp(x_j - x_i)`` and ``-log sum_j exp(x_j -
  x_i)`` (see ``verifier.ops.pairwise``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..devices import as_tensor
from .nodes import Ref


def _sample_dim(b, n, x: Ref, dim) -> int | None:
    """A dim of the source op (batch included, may be negative) as a per-sample dim; None (and
    a reported problem) for the batch dim or a missing dim."""
    if dim is None:
        b.problem(n, "softmax without an explicit dim")
        return None
    full = len(x.shape) + 1
    d = int(dim) + full if int(dim) < 0 else int(dim)
    if not 1 <= d < full:
        b.problem(n, f"a reduction over dim {dim}, which is the batch dim or out of range")
        return None
    return d - 1


def _const(v, like_dtype=torch.float64):
    return None if v is None else as_tensor(v).detach().to(like_dtype)


def _norm_chain(b, n, x: Ref, k: int, eps: float, center: bool, prefix: str = "") -> tuple:
    """The normalization of ``x`` over its last ``k`` dims -> (op, inputs, params) of the last
    node (``c * rsqrt(var + eps)``), for the caller to add."""
    shape = tuple(x.shape)
    dims = tuple(range(len(shape) - k, len(shape)))
    kept = tuple(1 if i in dims else s for i, s in enumerate(shape))

    def mean(src: Ref, part: str) -> Ref:
        return b.add_inner(n, prefix + part, "reduce_sum", [src], kept, kind="mean", dims=dims,
                           keepdim=True, in_shape=src.shape)

    if center:
        m = mean(x, "mean")
        c = b.add_inner(n, prefix + "center", "add", [x, m], shape, signs=(1, -1),
                        in_shapes=(shape, kept))
        v = b.add_inner(n, prefix + "var", "variance", [x], kept, dims=dims, keepdim=True,
                        in_shape=shape)
    else:
        c = x
        sq = b.add_inner(n, prefix + "square", "pow", [x], shape, exponent=2.0)
        v = mean(sq, "meansquare")
    ve = b.add_inner(n, prefix + "var_eps", "affine", [v], kept, w=None,
                     b=torch.tensor(float(eps), dtype=torch.float64, device="cpu"), in_shape=kept)
    r = b.add_inner(n, prefix + "rstd", "rsqrt", [ve], kept)
    return "normalize", [c, r], {"in_shapes": (shape, kept), "dims": dims, "eps": float(eps)}


def _finish(b, n, x: Ref, last: tuple, weight, bias, names: dict, view=None):
    """Add the chain's last node, then the affine ``weight y + bias`` (if any) under ``n``."""
    op, ins, params = last
    if weight is None and bias is None:
        return b.add(n, op, ins, **params)
    y = b.add_inner(n, "normed", op, ins, x.shape, **params)
    w, bb = _const(weight), _const(bias)
    if view is not None:
        w = None if w is None else w.reshape(view)
        bb = None if bb is None else bb.reshape(view)
    pn = {r: (v, None) for r, v in names.items() if v is not None and view is None}
    b.add(n, "affine", [y], w=w, b=bb, in_shape=x.shape, **({"param_names": pn} if pn else {}))


def _module_names(n, mod) -> dict:
    """``{"w": name, "b": name}`` of the module's affine parameters (for live / weight use)."""
    out = {}
    for role, attr in (("w", "weight"), ("b", "bias")):
        if isinstance(getattr(mod, attr, None), nn.Parameter):
            out[role] = f"{n.target}.{attr}"
    return out


def _layer_norm(b, n, x, normalized_shape, weight, bias, eps, names=None):
    k = len(normalized_shape) if isinstance(normalized_shape, (list, tuple, torch.Size)) else 1
    if not isinstance(x, Ref) or any(isinstance(t, Ref) for t in (weight, bias)):
        return b.problem(n, "layer_norm with a perturbed weight or bias")
    if k > len(x.shape) or tuple(x.shape[len(x.shape) - k:]) != tuple(
            normalized_shape if isinstance(normalized_shape, (list, tuple, torch.Size))
            else (normalized_shape,)):
        return b.problem(n, f"layer_norm over {list(normalized_shape)} of a sample {list(x.shape)}")
    last = _norm_chain(b, n, x, k, float(eps), center=True)
    _finish(b, n, x, last, weight, bias, names or {})


def layer_norm_module(b, n, mod, x):
    _layer_norm(b, n, x, tuple(mod.normalized_shape), mod.weight, getattr(mod, "bias", None),
                mod.eps, _module_names(n, mod))


def layer_norm_fn(b, n, target, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    _layer_norm(b, n, x, tuple(normalized_shape), weight, bias, eps)


def _rms_norm(b, n, x, normalized_shape, weight, eps, names=None):
    if isinstance(weight, Ref):
        return b.problem(n, "rms_norm with a perturbed weight")
    k = len(normalized_shape)
    if eps is None:
        eps = torch.finfo(torch.get_default_dtype()).eps
    last = _norm_chain(b, n, x, k, float(eps), center=False)
    _finish(b, n, x, last, weight, None, names or {})


def rms_norm_module(b, n, mod, x):
    _rms_norm(b, n, x, tuple(mod.normalized_shape), mod.weight, mod.eps, _module_names(n, mod))


def rms_norm_fn(b, n, target, x, normalized_shape, weight=None, eps=None):
    _rms_norm(b, n, x, tuple(normalized_shape), weight, eps)


def _group_norm(b, n, x, groups: int, weight, bias, eps):
    shape = tuple(x.shape)
    C = shape[0]
    if len(shape) < 1 or C % groups:
        return b.problem(n, f"group_norm with {groups} groups over {C} channels")
    numel = math.prod(shape)
    flat = (groups, numel // groups)
    idx = torch.arange(numel, device="cpu")
    grouped = b.add_inner(n, "groups", "select", [x], flat, index=idx, fill=None, identity=True,
                          permutation=True, in_shape=shape)
    op, ins, params = _norm_chain(b, n, grouped, 1, float(eps), center=True)
    normed = b.add_inner(n, "normed_groups", op, ins, flat, **params)
    view = (C,) + (1,) * (len(shape) - 1)
    back = ("select", [normed], dict(index=idx, fill=None, identity=True, permutation=True,
                                     in_shape=flat))
    _finish(b, n, x, back, weight, bias, {}, view=view)


def group_norm_module(b, n, mod, x):
    _group_norm(b, n, x, mod.num_groups, mod.weight, mod.bias, mod.eps)


def group_norm_fn(b, n, target, x, num_groups, weight=None, bias=None, eps=1e-5):
    _group_norm(b, n, x, int(num_groups), weight, bias, eps)


def _softmax(b, n, x, dim, log: bool):
    d = _sample_dim(b, n, x, dim)
    if d is None:
        return
    shape = tuple(x.shape)
    pairs = shape[:d + 1] + (shape[d],) + shape[d + 1:]
    diff = b.add_inner(n, "diff", "pairdiff", [x], pairs, dim=d, in_shape=shape)
    e = b.add_inner(n, "exp", "exp", [diff], pairs)
    s = b.add_inner(n, "sum", "reduce_sum", [e], shape, kind="sum", dims=(d + 1,), keepdim=False,
                    in_shape=pairs)
    if not log:  # softmax_dim: read by a product with these weights (attention)
        return b.add(n, "reciprocal", [s], softmax_dim=d)
    lg = b.add_inner(n, "log", "log", [s], shape)
    b.add(n, "affine", [lg], w=torch.tensor(-1.0, dtype=torch.float64, device="cpu"), b=None, in_shape=shape)


def softmax(log: bool):
    def handler(b, n, target, x, *args, **kwargs):
        if isinstance(target, nn.Module):
            dim = target.dim
        else:
            dim = kwargs.get("dim", args[0] if args else None)
        if kwargs.get("dtype") is not None:
            return b.problem(n, "softmax with a dtype argument")
        return _softmax(b, n, x, dim, log)
    return handler


def onnx_layer_norm(b, n, mod, x, scale, bias=None):
    """onnx2torch's LayerNormalization with a scale that is not an initializer."""
    full = len(x.shape) + 1
    axis = mod.axis + full if mod.axis < 0 else mod.axis
    if not 1 <= axis < full:
        return b.problem(n, f"LayerNormalization over axis {mod.axis} (includes the batch)")
    _layer_norm(b, n, x, tuple(x.shape[axis - 1:]), scale, bias, mod.epsilon)


def onnx_softmax_v1(b, n, mod, x):
    """Softmax / LogSoftmax before opset 13: over the dims from ``axis`` on, flattened; mapped
    where that is the last dim alone."""
    full = len(x.shape) + 1
    axis = mod.axis + full if mod.axis < 0 else mod.axis
    if axis != full - 1 and math.prod(x.shape[axis - 1:]) != x.shape[-1]:
        return b.problem(n, f"opset < 13 softmax over the flattened dims {axis}.. (only the last)")
    return _softmax(b, n, x, -1, mod.is_log)
