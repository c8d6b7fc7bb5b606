"""Tables that map fx nodes (modules, functions, methods) to bound rules.

Each entry is ``handler(builder, fx_node, target, *args, **kwargs)`` where perturbed arguments
arrive as ``Ref`` and every other argument as its recorded constant value. A handler adds one
node (``builder.add``), makes an alias (identity ops), or reports a problem.
"""
from __future__ import annotations

import math
import operator
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import as_tensor
from ..shapes import broadcast_shapes
from ..ops.bilinear import check_equation
from . import composite
from .nodes import Ref


def _refs(x) -> list[Ref]:
    if isinstance(x, Ref):
        return [x]
    if isinstance(x, (list, tuple)):
        return [r for a in x for r in _refs(a)]
    if isinstance(x, dict):
        return [r for a in x.values() for r in _refs(a)]
    return []


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd


def _float_const(b, v):
    t = as_tensor(v)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _stored(n, pos: int, key: str | None = None) -> str | None:
    """The name of the stored tensor (fx get_attr target) passed as argument ``pos`` of ``n``."""
    a = n.args[pos] if pos < len(n.args) else n.kwargs.get(key) if key else None
    return a.target if getattr(a, "op", None) == "get_attr" else None


def _param_names(**roles) -> dict:
    """``{role: (parameter name, layout)}`` for the roles whose tensor is a named parameter;
    layout "t" means the node holds the parameter transposed (weight perturbations use it)."""
    return {r: v for r, v in roles.items() if v is not None and v[0] is not None}


# --- generic handlers ------------------------------------------------------------------------
def alias(b, n, target, *args, **kwargs):
    refs = _refs(args)
    b.make_alias(n, refs[0])


def select(b, n, target, *args, **kwargs):
    """A pure data movement: probe it with numbered tensors to get its index map."""
    refs = _refs((args, kwargs))
    if len(refs) != 1:
        return b.problem(n, "a shape op over several perturbed tensors")
    ref = refs[0]
    src = [a for a in n.all_input_nodes if a.name in b.perturbed]
    numel = math.prod(ref.shape)
    t1 = torch.arange(1, numel + 1, dtype=torch.float64, device="cpu").reshape(1, *ref.shape)
    t2 = -t1 - 0.5
    with torch.no_grad():
        o1 = b.rerun(n, {src[0].name: t1})
        o2 = b.rerun(n, {src[0].name: t2})
    out_shape = b.out_shape(n)
    if not (isinstance(o1, torch.Tensor) and tuple(o1.shape) == (1, *out_shape) and o1.shape == o2.shape):
        return b.problem(n, "a shape op whose output does not keep the batch dimension")
    o1, o2 = o1.flatten().double(), o2.flatten().double()
    moved = o1 != o2
    idx = torch.where(moved, o1 - 1, torch.full_like(o1, -1)).round().long()
    ok = (~moved) | ((o2 == -o1 - 0.5) & (o1 - 1 == idx.double()) & (idx >= 0) & (idx < numel))
    if not bool(ok.all()):
        return b.problem(n, "not a pure data movement (elements are combined)")
    # the fill stays float64 (as probed; the graph is cast to its dtype later): a float64 graph
    # pads with the exact value, e.g. 0.7, not its float32 rounding
    fill = None if bool(moved.all()) else torch.where(moved, 0.0, o1)
    identity = fill is None and idx.numel() == numel and bool((idx == torch.arange(numel, device=idx.device)).all())
    permutation = (fill is None and idx.numel() == numel
                   and bool((torch.bincount(idx, minlength=numel) == 1).all()))
    b.add(n, "select", [ref], index=idx, fill=fill, identity=identity, permutation=permutation,
          in_shape=ref.shape)


def _affine(b, n, ref, w=None, bias=None):
    full_ndim = len(b.out_shape(n)) + 1

    def norm(c):
        if c is None:
            return None
        c = _float_const(b, c)
        if c.ndim == full_ndim:
            if c.shape[0] != 1:
                raise ValueError(f"a constant of shape {list(c.shape)} varies along the batch")
            c = c[0]
        elif c.ndim > full_ndim:
            raise ValueError(f"a constant of shape {list(c.shape)} has more dims than the output")
        return c

    b.add(n, "affine", [ref], w=norm(w), b=norm(bias), in_shape=ref.shape)


def binary(kind):
    def handler(b, n, target, x, y, *rest, **kwargs):
        alpha = kwargs.get("alpha", 1)
        if alpha != 1 or kwargs.get("rounding_mode"):
            return b.problem(n, f"{kind} with alpha/rounding_mode")
        xr, yr = isinstance(x, Ref), isinstance(y, Ref)
        if xr and yr:
            if kind != "matmul" and len(x.shape) != len(y.shape):
                return b.problem(n, f"{kind} of two perturbed tensors of different ranks per "
                                    f"sample ({list(x.shape)}, {list(y.shape)}): the batch "
                                    "dimension would not line up (unsqueeze the smaller one)")
            if kind in ("add", "sub"):
                return b.add(n, "add", [x, y], signs=(1, 1 if kind == "add" else -1),
                             in_shapes=(x.shape, y.shape))
            if kind == "mul":
                return b.add(n, "mul", [x, y], in_shapes=(x.shape, y.shape))
            if kind == "matmul":
                return _matmul_two(b, n, x, y)
            if kind == "div":   # x * (1 / y)
                r = b.add_inner(n, "reciprocal", "reciprocal", [y], y.shape)
                return b.add(n, "mul", [x, r], in_shapes=(x.shape, y.shape))
            return b.problem(n, f"{kind} of two perturbed tensors is not supported")
        if kind == "matmul":
            if xr:
                W = _float_const(b, y)
                if W.ndim != 2:
                    return b.problem(n, f"matmul with a constant of shape {list(W.shape)} (need 2-D)")
                return b.add(n, "linear", [x], weight=W.t().contiguous(), bias=None,
                             param_names=_param_names(weight=(_stored(n, 1), "t")))
            M = _float_const(b, x)
            if M.ndim != 2 or len(y.shape) < 2:
                return b.problem(n, "constant @ perturbed needs a 2-D constant and a >= 2-D operand")
            return b.add(n, "matmul_left", [y], M=M)
        ref, c = (x, y) if xr else (y, x)
        c = _float_const(b, c)
        if kind == "add":
            return _affine(b, n, ref, None, c)
        if kind == "sub":
            return _affine(b, n, ref, None, -c) if xr else _affine(b, n, ref, -torch.ones((), device="cpu"), c)
        if kind == "mul":
            return _affine(b, n, ref, c, None)
        if kind == "div":
            if not xr:   # c / y = c * (1 / y)
                r = b.add_inner(n, "reciprocal", "reciprocal", [ref], ref.shape)
                return _affine(b, n, r, c, None)
            return _affine(b, n, ref, 1.0 / c.double(), None)  # exact in a float64 graph
        return b.problem(n, f"unknown arithmetic {kind}")
    return handler


def _add_einsum(b, n, x, y, equation):
    why = check_equation(equation, x.shape, y.shape)
    if why is not None:
        return b.problem(n, why)
    return b.add(n, "einsum", [x, y], equation=equation, in_shapes=(tuple(x.shape), tuple(y.shape)))


def _matmul_two(b, n, x, y):
    """torch.matmul of two perturbed tensors as a per-sample einsum: both of the same rank >= 2
    per sample (then the batch dims, the sample's included, line up and broadcast)."""
    if len(x.shape) < 2 or len(y.shape) < 2:
        return b.problem(n, "matmul of two perturbed tensors with a 1-D operand per sample (the "
                            "sample's batch dimension would be multiplied; unsqueeze it to 2-D)")
    if len(x.shape) != len(y.shape):
        return b.problem(n, f"matmul of two perturbed tensors of different ranks per sample "
                            f"({list(x.shape)}, {list(y.shape)}): the batch dimension would not "
                            "line up (unsqueeze the smaller one)")
    k = len(x.shape) - 2
    lead = "abcdefgh"[:k] if k <= 8 else None
    if lead is None:
        return b.problem(n, "matmul with more than 8 batch dimensions")
    src = b.by_name.get(x.name)
    simplex = (src is not None and src.params.get("softmax_dim") == len(x.shape) - 1
               and tuple(x.shape[-1:]) == tuple(y.shape[-2:-1]))
    node = _add_einsum(b, n, x, y, f"{lead}ij,{lead}jk->{lead}ik")
    if simplex and node is not None:  # attention: weights (a softmax over j) @ values
        node.params["simplex"] = True
    return node


def _einsum_letters(eq: str, ndims: list[int]):
    """A full torch.einsum equation (with the batch dim) as explicit letters, ``...`` expanded
    and an implicit output made explicit: -> (operand strings, output string) or a reason."""
    eq = eq.replace(" ", "")
    ins, arrow, out = eq.partition("->")
    ops = ins.split(",")
    if len(ops) != len(ndims):
        return f"einsum equation {eq!r} for {len(ndims)} operands"
    used = set(eq) - set(",->.")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    widths = [nd - len(o.replace("...", "")) if "..." in o else 0 for o, nd in zip(ops, ndims)]
    w = max(widths + [0])
    ell = "".join(free[:w])
    ops = [o.replace("...", ell[w - k:]) for o, k in zip(ops, widths)]
    if arrow:
        out = out.replace("...", ell)
    else:
        counts = {c: "".join(ops).count(c) for c in "".join(ops)}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return ops, out


def einsum_fn(b, n, target, equation, *operands, **kwargs):
    """torch.einsum of two perturbed operands, each keeping the batch dim first (as does the
    output): the ``einsum`` rule over the per-sample dims."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        return b.problem(n, "einsum in the sublist format (give an equation string)")
    if len(operands) != 2 or not all(isinstance(o, Ref) for o in operands):
        return b.problem(n, "einsum with other than two perturbed operands (a constant operand "
                            "or a third operand has no rule)")
    x, y = operands
    got = _einsum_letters(equation, [len(x.shape) + 1, len(y.shape) + 1])
    if isinstance(got, str):
        return b.problem(n, got)
    (xs, ys), out = got
    bl = xs[:1]
    if not (bl and ys[:1] == bl and out[:1] == bl and bl not in xs[1:] + ys[1:] + out[1:]):
        return b.problem(n, f"einsum {equation!r} does not keep the batch dimension as the first "
                            "dimension of both operands and of the output")
    return _add_einsum(b, n, x, y, f"{xs[1:]},{ys[1:]}->{out[1:]}")


def neg(b, n, target, x, *a, **k):
    _affine(b, n, x, -torch.ones((), device="cpu"), None)


def activation(op):
    def handler(b, n, target, x, *args, **kwargs):
        params = {}
        if op == "leaky_relu":
            slope = kwargs.get("negative_slope", args[0] if args else 0.01)
            if isinstance(target, nn.LeakyReLU):
                slope = target.negative_slope
            if not 0 <= slope <= 1:
                return b.problem(n, f"LeakyReLU with negative_slope {slope} outside [0, 1]")
            params["negative_slope"] = float(slope)
        b.add(n, op, [x], **params)
    return handler


def cat(b, n, target, tensors, dim=0, *a, **k):
    dim = k.get("axis", dim)
    return _concat(b, n, list(tensors), dim)


def _concat(b, n, tensors, dim):
    full = len(b.out_shape(n)) + 1
    dim = dim + full if dim < 0 else dim
    if dim == 0:
        return b.problem(n, "concatenation along the batch dimension")
    refs, parts, sizes = [], [], []
    for t in tensors:
        if isinstance(t, Ref):
            if t.name not in [r.name for r in refs]:
                refs.append(t)
            parts.append([r.name for r in refs].index(t.name))
            sizes.append(t.shape[dim - 1])
        else:
            c = _float_const(b, t)
            if c.ndim != full or c.shape[0] != 1:
                return b.problem(n, "concatenation with a constant that varies along the batch")
            parts.append(c[0])
            sizes.append(c.shape[dim])
    b.add(n, "concat", refs, parts=parts, dim=dim - 1, sizes=sizes)


# --- layers --------------------------------------------------------------------------------
def _module_params(n, mod) -> dict:
    return _param_names(weight=(f"{n.target}.weight", None),
                        bias=None if mod.bias is None else (f"{n.target}.bias", None))


def linear_module(b, n, mod, x):
    b.add(n, "linear", [x], weight=mod.weight.detach(),
          bias=None if mod.bias is None else mod.bias.detach(), param_names=_module_params(n, mod))


def linear_fn(b, n, target, x, weight, bias=None):
    if isinstance(weight, Ref) or isinstance(bias, Ref):
        return b.problem(n, "a linear layer with perturbed weights (use a weight perturbation)")
    b.add(n, "linear", [x], weight=_float_const(b, weight), bias=None if bias is None else _float_const(b, bias),
          param_names=_param_names(weight=(_stored(n, 1, "weight"), None),
                                   bias=(_stored(n, 2, "bias"), None)))


def _conv_padding(padding, k, dilation, nd):
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an asymmetric pad")
        return tuple(t // 2 for t in total)
    return _tuple(padding, nd)


def _add_conv(b, n, x, weight, bias, stride, padding, dilation, groups, param_names=None):
    if isinstance(weight, Ref) or isinstance(bias, Ref):
        return b.problem(n, "a convolution with perturbed weights (use a weight perturbation)")
    nd = weight.ndim - 2
    if nd not in (1, 2):
        return b.problem(n, f"{nd}-D convolution (1-D and 2-D are supported)")
    k = tuple(weight.shape[2:])
    dilation = _tuple(dilation, nd)
    b.add(n, "conv", [x], weight=weight.detach(), bias=None if bias is None else bias.detach(),
          stride=_tuple(stride, nd), padding=_conv_padding(padding, k, dilation, nd),
          dilation=dilation, groups=int(groups), in_shape=x.shape, param_names=param_names or {})


def conv_module(b, n, mod, x):
    if mod.padding_mode != "zeros":
        return b.problem(n, f"convolution with padding_mode={mod.padding_mode!r}")
    _add_conv(b, n, x, mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups,
              _module_params(n, mod))


def conv_fn(b, n, target, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    _add_conv(b, n, x, _float_const(b, weight), None if bias is None else _float_const(b, bias),
              stride, padding, dilation, groups,
              _param_names(weight=(_stored(n, 1, "weight"), None), bias=(_stored(n, 2, "bias"), None)))


def conv_transpose_module(b, n, mod, x, output_size=None):
    if mod.padding_mode != "zeros":
        return b.problem(n, f"transposed convolution with padding_mode={mod.padding_mode!r}")
    nd = mod.weight.ndim - 2
    out_pad = mod.output_padding
    if output_size is not None:  # nn.ConvTranspose picks output_padding from output_size
        full = b.out_shape(n)
        out_pad = tuple(full[1 + i] - ((x.shape[1 + i] - 1) * mod.stride[i] - 2 * mod.padding[i]
                                       + mod.dilation[i] * (mod.kernel_size[i] - 1) + 1) for i in range(nd))
    b.add(n, "conv_transpose", [x], weight=mod.weight.detach(),
          bias=None if mod.bias is None else mod.bias.detach(), stride=_tuple(mod.stride, nd),
          padding=_tuple(mod.padding, nd), output_padding=_tuple(out_pad, nd),
          dilation=_tuple(mod.dilation, nd), groups=mod.groups, in_shape=x.shape)


def _batchnorm(b, n, x, weight, bias, mean, var, eps, module=None):
    if mean is None or var is None:
        return b.problem(n, "BatchNorm without running statistics (it would use batch statistics)")
    # folded in float64 (the graph is cast to its dtype later): exact in a float64 graph
    scale = 1.0 / torch.sqrt(var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    view = (-1,) + (1,) * (len(x.shape) - 1)
    extra = {}
    if module is not None:  # the live graph (verifier.graph.live) folds it again from the module
        extra["batchnorm"] = {"module": module, "eps": float(eps)}
    b.add(n, "affine", [x], w=scale.reshape(view), b=shift.reshape(view), in_shape=x.shape, **extra)


def batchnorm_module(b, n, mod, x):
    _batchnorm(b, n, x, mod.weight, mod.bias, mod.running_mean, mod.running_var, mod.eps,
               module=n.target)


def batchnorm_fn(b, n, target, x, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5):
    if training:
        return b.problem(n, "batch_norm in training mode")
    _batchnorm(b, n, x, weight, bias, running_mean, running_var, eps)


def avgpool_module(b, n, mod, x):
    nd = 1 if isinstance(mod, nn.AvgPool1d) else 2
    _avgpool(b, n, x, nd, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
             mod.count_include_pad, getattr(mod, "divisor_override", None))


def _avgpool(b, n, x, nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    stride = kernel if stride is None or stride == [] or stride == () else stride
    b.add(n, "avgpool", [x], nd=nd, kernel_size=_tuple(kernel, nd), stride=_tuple(stride, nd),
          padding=_tuple(padding, nd), ceil_mode=bool(ceil_mode),
          count_include_pad=bool(count_include_pad), divisor_override=divisor_override,
          in_shape=x.shape)


def avgpool_fn(b, n, target, x, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    nd = 1 if target is F.avg_pool1d else 2
    _avgpool(b, n, x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def adaptive_avgpool(b, n, mod, x):
    nd = 1 if isinstance(mod, nn.AdaptiveAvgPool1d) else 2
    out = b.out_shape(n)[1:]
    ins = x.shape[1:]
    if any(i % o for i, o in zip(ins, out)):
        return b.problem(n, f"adaptive average pooling {list(ins)} -> {list(out)} (sizes must divide)")
    k = tuple(i // o for i, o in zip(ins, out))
    _avgpool(b, n, x, nd, k, k, 0, False, True, None)


def global_avgpool(b, n, mod, x):
    sp = tuple(x.shape[1:])
    if len(sp) not in (1, 2):
        return b.problem(n, f"global average pooling over {len(sp)} spatial dims")
    _avgpool(b, n, x, len(sp), sp, sp, 0, False, True, None)


def _maxpool(b, n, x, kernel, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        return b.problem(n, "max pooling that returns indices")
    if len(x.shape) != 3:
        return b.problem(n, "max pooling over other than 2 spatial dims")
    kernel = _tuple(kernel, 2)
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, 2)
    padding, dilation = _tuple(padding, 2), _tuple(dilation, 2)
    if ceil_mode:
        floor = tuple((x.shape[1 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                      for i in range(2))
        if floor != tuple(b.out_shape(n)[1:]):
            return b.problem(n, "max pooling with ceil_mode=True that adds a partial window")
    b.add(n, "maxpool", [x], kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
          in_shape=x.shape)


def maxpool_module(b, n, mod, x):
    _maxpool(b, n, x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
             mod.return_indices)


def maxpool_fn(b, n, target, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    _maxpool(b, n, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


# --- reductions and element-wise max / min ----------------------------------------------------
_REDUCERS = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}


def _reduce(b, n, x, kind, dim, keepdim, probe=None):
    """``kind`` (sum, mean, max, min) of ``x`` over ``dim`` (dims of the batched tensor, as the
    source op takes them): the ``reduce_sum`` / ``reduce_max`` rule over per-sample dims.
    ``probe``: the fx node whose op is run again to confirm the reading (default ``n``; the
    (values, indices) node of ``torch.max(x, dim)``, whose values ``n`` reads)."""
    if not isinstance(x, Ref):
        return b.problem(n, f"{kind} of a constant with a perturbed argument")
    full = len(x.shape) + 1
    if isinstance(dim, torch.Tensor):
        dim = dim.flatten().tolist()
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return b.problem(n, f"{kind} over every dimension, the batch included (name the "
                            "per-sample dims, e.g. dim=(1, ..., n))")
    dims = sorted({int(d) + full if int(d) < 0 else int(d)
                   for d in (dim if isinstance(dim, (list, tuple)) else (dim,))})
    if any(not 0 <= d < full for d in dims):
        return b.problem(n, f"{kind} over dim {dim} of a {full}-D tensor")
    if 0 in dims:
        return b.problem(n, f"{kind} over the batch dimension")
    dims = tuple(d - 1 for d in dims)
    keepdim = bool(keepdim)
    # the source op on a random batch of two must compute exactly this reduction (a reading of
    # its arguments that is wrong, or an op that mixes the batch, is reported, never bounded)
    probe = n if probe is None else probe
    src = [a for a in probe.all_input_nodes if a.name in b.perturbed]
    t = torch.randn((2, *x.shape), generator=torch.Generator(device="cpu").manual_seed(0),
                    dtype=torch.float64, device="cpu")
    want = _REDUCERS[kind](t, dim=tuple(d + 1 for d in dims), keepdim=keepdim)
    try:
        with torch.no_grad():
            got = b.rerun(probe, {src[0].name: t}) if len(src) == 1 else None
    except Exception:
        got = None
    if isinstance(got, (tuple, list)):
        got = got[0]
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.double(), want, rtol=1e-6, atol=1e-9)):
        return b.problem(n, f"{kind}: the op does not compute the reduction over per-sample dims "
                            f"{[d + 1 for d in dims]} read from its arguments")
    op = "reduce_sum" if kind in ("sum", "mean") else "reduce_max"
    b.add(n, op, [x], kind=kind, dims=dims, keepdim=keepdim, in_shape=x.shape)


def reduction(kind):
    """``torch.sum / mean / amax / amin`` and their tensor methods: ``(x, dim, keepdim)``."""
    def handler(b, n, target, x, *args, **kwargs):
        dim = kwargs.get("dim", kwargs.get("axis", args[0] if args else None))
        keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
        dtype = kwargs.get("dtype")
        if dtype is not None and not dtype.is_floating_point:
            return b.problem(n, f"{kind} with dtype={dtype}")
        return _reduce(b, n, x, kind, dim, keepdim)
    return handler


def _lift(b, n, ref: Ref, ndim: int, tag: str) -> Ref:
    """``ref`` viewed with leading dims of size 1 up to ``ndim`` per-sample dims (a batched
    tensor broadcasts against the others only once the ranks agree)."""
    if len(ref.shape) >= ndim:
        return ref
    numel = math.prod(ref.shape)
    return b.add_inner(n, tag, "select", [ref], (1,) * (ndim - len(ref.shape)) + tuple(ref.shape),
                       index=torch.arange(numel, device="cpu"), fill=None, identity=True, permutation=True,
                       in_shape=ref.shape)


def _max_pair(b, n, kind, x, y, shape, tag, last):
    """``max(x, y)`` (or min) of a Ref ``x`` and a Ref or per-sample constant ``y``, written
    exactly with one ReLU: ``max(x, y) = y + relu(x - y)``, ``min(x, y) = x - relu(x - y)``;
    with a constant c: ``max(x, c) = c + relu(x - c)``, ``min(x, c) = c - relu(c - x)``. The
    last node is the fx node's own (``last``), the others inner nodes ``<tag>/...``."""
    pre = f"{tag}/" if tag else ""
    x = _lift(b, n, x, len(shape), f"{pre}x_view")
    if isinstance(y, Ref):
        y = _lift(b, n, y, len(shape), f"{pre}y_view")
        d = b.add_inner(n, f"{pre}diff", "add", [x, y], shape, signs=(1, -1),
                        in_shapes=(x.shape, y.shape))
        r = b.add_inner(n, f"{pre}relu", "relu", [d], shape)
        inputs, params = [y if kind == "max" else x, r], dict(
            signs=(1, 1 if kind == "max" else -1),
            in_shapes=((y if kind == "max" else x).shape, shape))
        op = "add"
    else:
        sign = 1.0 if kind == "max" else -1.0
        w = None if kind == "max" else -torch.ones((), device="cpu")
        d = b.add_inner(n, f"{pre}diff", "affine", [x], shape, w=w, b=-sign * y, in_shape=x.shape)
        r = b.add_inner(n, f"{pre}relu", "relu", [d], shape)
        inputs, params, op = [r], dict(w=w, b=y, in_shape=shape), "affine"
    if last:
        b.add(n, op, inputs, **params)
        return None
    return b.add_inner(n, tag, op, inputs, shape, **params)


def _per_sample_const(b, n, c, full: int):
    """A constant operand as a per-sample tensor (no batch dim), or None where it varies
    along the batch or has more dims than the output."""
    c = _float_const(b, c)
    if c.ndim == full:
        if c.shape[0] != 1:
            return None
        c = c[0]
    return None if c.ndim > full else c


def _elementwise_extremum(b, n, kind, operands):
    """max / min of several operands (Refs and constants), folded pairwise; the constants are
    combined into one first."""
    out = b.out_shape(n)
    refs = [a for a in operands if isinstance(a, Ref)]
    consts = []
    for a in operands:
        if not isinstance(a, Ref):
            c = _per_sample_const(b, n, a, len(out) + 1)
            if c is None:
                return b.problem(n, f"element-wise {kind} with a constant that varies along the "
                                    "batch or has more dims than the output")
            consts.append(c)
    if not refs:
        return b.problem(n, f"element-wise {kind} without a perturbed operand")
    f = torch.maximum if kind == "max" else torch.minimum
    items = list(refs)
    if consts:
        c = consts[0]
        for other in consts[1:]:
            c = f(c, other)
        items.append(c)
    if len(items) == 1:
        return b.make_alias(n, items[0])
    acc = items[0]
    for k, other in enumerate(items[1:], 1):
        last = k == len(items) - 1
        oshape = other.shape if isinstance(other, Ref) else tuple(other.shape)
        shape = out if last else tuple(broadcast_shapes(tuple(acc.shape), tuple(oshape)))
        acc = _max_pair(b, n, kind, acc, other, shape, "" if len(items) == 2 else f"m{k}", last)


def extremum(kind):
    """``torch.maximum / minimum (x, y)``; ``torch.max / min`` and the methods ``.max / .min``
    with a second tensor (element-wise). With a dim they return (values, indices): see
    ``values_only``; without one they reduce the batch too (reported as the batch changes)."""
    def handler(b, n, target, x, *args, **kwargs):
        other = kwargs.get("other", args[0] if args else None)
        if other is None or "dim" in kwargs or len(args) > 1:
            return b.problem(n, f"{kind} with these arguments")
        return _elementwise_extremum(b, n, kind, [x, other])
    return handler


# torch.max / torch.min (function, method) with a dim return (values, indices)
_TUPLE_EXTREMA = {("call_function", torch.max): "max", ("call_function", torch.min): "min",
                  ("call_method", "max"): "max", ("call_method", "min"): "min"}


def reads_values(u) -> bool:
    """Whether fx node ``u`` reads the values of a (values, indices) result."""
    if u.op != "call_function" or len(u.args) != 2:
        return False
    return (u.target is operator.getitem and u.args[1] == 0) or \
        (u.target is getattr and u.args[1] == "values")


def values_only(n) -> bool:
    """``n`` is ``torch.max / min(x, dim, keepdim)`` (or the method) and every use of it reads
    its values (a use of the indices that is dead, e.g. ``v, _ = x.max(1)``, is allowed)."""
    if (n.op, n.target) not in _TUPLE_EXTREMA:
        return False
    return all(reads_values(u) or (u.op == "call_function" and u.target is operator.getitem
                                     and not u.users) for u in n.users)


def map_values(b, u, n):
    """Map ``u``, which reads the values of ``n = torch.max / min(x, dim, keepdim)``, as the
    reduction (the graph node gets ``u``'s name and value)."""
    kind = _TUPLE_EXTREMA[(n.op, n.target)]
    args, kwargs = b.resolve(n.args), b.resolve(n.kwargs)
    x, rest = args[0], args[1:]
    dim = kwargs.get("dim", rest[0] if rest else None)
    keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
    if not isinstance(dim, int):
        return b.problem(u, f"{kind} with dim {dim!r}")
    return _reduce(b, u, x, kind, dim, keepdim, probe=n)


# --- onnx2torch modules --------------------------------------------------------------------
def onnx_binary(b, n, mod, x, y):
    if getattr(mod, "broadcast", None) == 1 and getattr(mod, "axis", None) is not None:
        return b.problem(n, "old-style broadcast with axis")
    f = mod.math_op_function
    kind = {torch.add: "add", torch.sub: "sub", torch.mul: "mul"}.get(f, "div")
    return binary(kind)(b, n, mod, x, y)


def onnx_gemm(b, n, mod, a, w, c=None):
    if not isinstance(a, Ref) or isinstance(w, Ref) or isinstance(c, Ref) or mod.trans_a:
        return b.problem(n, "Gemm with a perturbed B or C, or transA=1")
    W = _float_const(b, w)
    W = W if mod.trans_b else W.t()  # -> [out, in]
    bias = None
    if c is not None:
        bias = _float_const(b, c) * mod.beta
        if bias.ndim == 2:
            if bias.shape[0] != 1:
                return b.problem(n, "Gemm with a C that varies along the batch")
            bias = bias[0]
        bias = bias.expand(W.shape[0]).contiguous()
    names = {}
    if mod.alpha == 1:  # a scaled weight is not the stored parameter
        names["weight"] = (_stored(n, 1), None if mod.trans_b else "t")
    if c is not None and mod.beta == 1 and c.ndim == 1 and c.shape[0] == W.shape[0]:
        names["bias"] = (_stored(n, 2), None)
    b.add(n, "linear", [a], weight=(W * mod.alpha).contiguous(), bias=bias,
          param_names=_param_names(**names))


def _arg(target, args, kwargs, name, pos, default):
    """An activation's attribute: from its module, else its call's keyword or position (None:
    keyword only)."""
    if isinstance(target, nn.Module):
        return getattr(target, name, default)
    return kwargs.get(name, args[pos] if pos is not None and len(args) > pos else default)


def smooth(op):
    """GELU (erf form), SiLU, Softplus, ELU: the smooth rules (``verifier.ops.smooth``)."""
    def handler(b, n, target, x, *args, **kwargs):
        params = {}
        if op == "gelu":
            form = _arg(target, args, kwargs, "approximate", None, "none")
            if form not in ("none", "tanh"):
                return b.problem(n, f"GELU with approximate={form!r} (the erf form 'none', or 'tanh')")
            if form == "tanh":
                params["approximate"] = "tanh"
        elif op == "softplus":
            params["beta"] = float(_arg(target, args, kwargs, "beta", 0, 1.0))
            params["threshold"] = float(_arg(target, args, kwargs, "threshold", 1, 20.0))
            if params["beta"] <= 0:
                return b.problem(n, f"Softplus with beta {params['beta']} <= 0")
        elif op == "elu":
            params["alpha"] = float(_arg(target, args, kwargs, "alpha", 0, 1.0))
            if params["alpha"] < 0:
                return b.problem(n, f"ELU with alpha {params['alpha']} < 0")
        b.add(n, op, [x], **params)
    return handler


def clamp(default_lo=None, default_hi=None):
    """Hardtanh / ReLU6 / clamp with constant bounds: the ``hardtanh`` rule."""
    def handler(b, n, target, x, *args, **kwargs):
        if isinstance(target, nn.Module):
            lo, hi = getattr(target, "min_val", default_lo), getattr(target, "max_val", default_hi)
        else:
            names = ("min_val", "max_val") if default_lo is not None else ("min", "max")
            lo = kwargs.get(names[0], args[0] if args else default_lo)
            hi = kwargs.get(names[1], args[1] if len(args) > 1 else default_hi)
        if isinstance(lo, Ref) or isinstance(hi, Ref) or isinstance(lo, torch.Tensor) \
                or isinstance(hi, torch.Tensor):
            return b.problem(n, "clamp with tensor bounds (constant numbers only)")
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        if not lo < hi:
            return b.problem(n, f"clamp with min {lo} >= max {hi}")
        b.add(n, "hardtanh", [x], min_val=lo, max_val=hi)
    return handler


def hardsigmoid(b, n, target, x, *args, **kwargs):
    alpha, beta = (float(target.alpha), float(target.beta)) if hasattr(target, "alpha") else (1 / 6, 0.5)
    if alpha <= 0:
        return b.problem(n, f"HardSigmoid with alpha {alpha} <= 0")
    b.add(n, "hardsigmoid", [x], alpha=alpha, beta=beta)


def _prelu(b, n, x, weight, name=None):
    """PReLU with slope ``weight``: one value, one per channel (dim 1 of the input), or (ONNX)
    a tensor broadcastable to a sample; ``name``: the parameter it is (certified training)."""
    if isinstance(weight, Ref):
        return b.problem(n, "PReLU with a perturbed slope")
    w = _float_const(b, weight).detach()
    shape = tuple(x.shape)
    if w.numel() == 1:
        w = w.reshape(1)
    elif w.ndim == 1 and len(shape) >= 1 and w.shape[0] == shape[0]:
        pass   # one per channel (the rule views it along dim 0 of a sample)
    else:
        full = len(shape) + 1
        if w.ndim == full:   # an ONNX slope with a batch dim of 1
            if w.shape[0] != 1:
                return b.problem(n, "PReLU with a slope that varies along the batch")
            w = w[0]
        try:
            w = w.expand(*shape).contiguous()
        except RuntimeError:
            return b.problem(n, f"PReLU with a slope of shape {list(weight.shape)} for inputs "
                                f"of shape {list(shape)}")
        if len(shape) == 1:
            name = name if tuple(weight.shape) == shape else None
        else:
            name = None   # stored broadcast: not the parameter's own shape
    b.add(n, "prelu", [x], weight=w, param_names=_param_names(weight=(name, None)))


def prelu_module(b, n, mod, x):
    _prelu(b, n, x, mod.weight, f"{n.target}.weight")


def prelu_fn(b, n, target, x, weight):
    _prelu(b, n, x, weight, _stored(n, 1, "weight"))


def onnx_prelu(b, n, mod, x, slope):
    _prelu(b, n, x, slope, _stored(n, 1))


def plain(op):
    """An element-wise op without attributes (exp, abs, erf, hardswish)."""
    def handler(b, n, target, x, *args, **kwargs):
        b.add(n, op, [x])
    return handler


def power(b, n, target, x, exponent=None, *args, **kwargs):
    """``x ** p``, ``torch.pow(x, p)``, ``.pow(p)`` for a constant number ``p``: the ``pow`` rule
    (``verifier.ops.domain``); ``torch.square`` / ``.square()`` (no exponent): p = 2."""
    exponent = kwargs.get("exponent", exponent)
    if target in (torch.square, "square"):
        exponent = 2.0
    if not isinstance(x, Ref):
        return b.problem(n, "a power with a perturbed exponent (only constant exponents)")
    if isinstance(exponent, Ref):
        return b.problem(n, "a power with a perturbed exponent (x ** y of two perturbed "
                                "tensors; only constant exponents)")
    if isinstance(exponent, torch.Tensor):
        if exponent.numel() != 1:
            return b.problem(n, f"a power with an exponent tensor of shape {list(exponent.shape)} "
                                "(one number only)")
        exponent = exponent.item()
    if not isinstance(exponent, (int, float)) or not math.isfinite(exponent):
        return b.problem(n, f"a power with exponent {exponent!r} (a finite number only)")
    b.add(n, "pow", [x], exponent=float(exponent))


def onnx_pow(b, n, mod, x, exponent):
    if getattr(mod, "broadcast", None) == 1 and getattr(mod, "axis", None) is not None:
        return b.problem(n, "old-style broadcast with axis")
    return power(b, n, mod, x, exponent)


def onnx_batchnorm(b, n, mod, x, weight, bias, mean, var):
    _batchnorm(b, n, x, weight, bias, mean, var, mod.epsilon)


def onnx_concat(b, n, mod, *tensors):
    return _concat(b, n, list(tensors), mod.axis)


def onnx_function(b, n, mod, x, *args, **kwargs):
    """onnx2torch's generic element-wise module: map the functions that have a rule."""
    fn = getattr(mod, "function", None)
    op = {torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu"}.get(fn)
    if op is None:
        op = {torch.exp: "exp", torch.abs: "abs", torch.erf: "erf", torch.sin: "sin",
              torch.cos: "cos", torch.log: "log", torch.sqrt: "sqrt",
              torch.reciprocal: "reciprocal"}.get(fn)
        if op is None:
            return b.problem(n, f"no bound rule for the element-wise function "
                                f"{getattr(fn, '__name__', fn)}")
        return plain(op)(b, n, mod, x)
    return activation(op)(b, n, mod, x)


_ONNX_REDUCE = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min"}


def onnx_reduce(b, n, mod, x, axes=None):
    """onnx2torch's ReduceSum / ReduceMean / ReduceMax / ReduceMin (static or dynamic axes)."""
    if hasattr(mod, "operation_type"):            # OnnxReduceStaticAxes
        kind = _ONNX_REDUCE.get(mod.operation_type)
        if kind is None:
            return b.problem(n, f"no bound rule for {mod.operation_type}")
        axes, keep, noop = mod.axes, mod.keepdims, False
    else:                                         # OnnxReduceSum{Static,Dynamic}Axes
        kind = "sum"
        keep, noop = bool(mod._keepdims), bool(mod._noop_with_empty_axes)
        if hasattr(mod, "_axes"):
            axes = mod._axes
    if isinstance(axes, Ref):
        return b.problem(n, f"{kind} with perturbed axes")
    if isinstance(axes, torch.Tensor):
        axes = axes.flatten().tolist()
    if not axes:
        if noop:
            return alias(b, n, mod, x)
        return b.problem(n, f"{kind} over every axis, the batch included")
    return _reduce(b, n, x, kind, list(axes), keep)


def onnx_min_max(b, n, mod, *tensors):
    """onnx2torch's element-wise, variadic Max / Min."""
    kind = {torch.amax: "max", torch.amin: "min"}.get(getattr(mod, "_operator", None))
    if kind is None:
        return b.problem(n, "an element-wise Max / Min of unknown kind")
    return _elementwise_extremum(b, n, kind, list(tensors))


def _onnx_classes():
    """onnx2torch's module classes, only once onnx2torch is imported (by the ONNX loader's
    fallback): importing it here would cost start-up time (it imports torchvision)."""
    import importlib
    import sys
    if "onnx2torch" not in sys.modules:
        return {}
    names = {
        "reshape": ["OnnxReshape"], "transpose": ["OnnxTranspose"], "slice": ["OnnxSlice", "OnnxSliceV9"],
        "gather": ["OnnxGather", "OnnxGatherElements", "OnnxGatherND"],
        "squeeze": ["OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes"],
        "unsqueeze": ["OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes"],
        "flatten": ["OnnxFlatten"], "pad": ["OnnxPadStatic", "OnnxPadDynamic"], "expand": ["OnnxExpand"],
        "tile": ["OnnxTile"], "depth_to_space": ["OnnxDepthToSpace"],
        "identity": ["OnnxCopyIdentity"], "dropout": ["OnnxDropoutDynamic"],
        "binary_math_operations": ["OnnxBinaryMathOperation"], "matmul": ["OnnxMatMul"],
        "gemm": ["OnnxGemm"], "batch_norm": ["OnnxBatchNorm"], "concat": ["OnnxConcat"],
        "neg": ["OnnxNeg"], "functions": ["OnnxFunction"], "global_average_pool": ["OnnxGlobalAveragePool",
                                                    "OnnxGlobalAveragePoolWithKnownInputShape"],
        "activations": ["OnnxErf", "OnnxHardSigmoid", "OnnxSoftmaxV1V11", "OnnxPReLU"],
        "layer_norm": ["OnnxLayerNorm"],
        "pow": ["OnnxPow", "OnnxSqrt"], "reciprocal": ["OnnxReciprocal"],
        "reduce": ["OnnxReduceStaticAxes", "OnnxReduceSumStaticAxes", "OnnxReduceSumDynamicAxes"],
        "min_max": ["OnnxMinMax"],
    }
    found = {}
    for mod_name, classes in names.items():
        try:
            m = importlib.import_module(f"onnx2torch.node_converters.{mod_name}")
        except Exception:
            continue
        for c in classes:
            if hasattr(m, c):
                found[c] = getattr(m, c)
    return found


def _build_module_table():
    t = {
        nn.Linear: linear_module, nn.Conv1d: conv_module, nn.Conv2d: conv_module,
        nn.ConvTranspose1d: conv_transpose_module, nn.ConvTranspose2d: conv_transpose_module,
        nn.BatchNorm1d: batchnorm_module, nn.BatchNorm2d: batchnorm_module,
        nn.ReLU: activation("relu"), nn.LeakyReLU: activation("leaky_relu"),
        nn.Sigmoid: activation("sigmoid"), nn.Tanh: activation("tanh"),
        nn.SiLU: smooth("silu"), nn.GELU: smooth("gelu"), nn.Softplus: smooth("softplus"),
        nn.ELU: smooth("elu"), nn.Hardtanh: clamp(-1.0, 1.0), nn.ReLU6: clamp(0.0, 6.0),
        nn.Hardsigmoid: hardsigmoid, nn.Hardswish: plain("hardswish"), nn.PReLU: prelu_module,
        nn.Flatten: select, nn.Unflatten: select, nn.ZeroPad2d: select, nn.ConstantPad1d: select,
        nn.ConstantPad2d: select, nn.ReflectionPad1d: select, nn.ReflectionPad2d: select,
        nn.ReplicationPad1d: select, nn.ReplicationPad2d: select,
        nn.Identity: alias, nn.Dropout: alias, nn.Dropout1d: alias, nn.Dropout2d: alias,
        nn.AvgPool1d: avgpool_module, nn.AvgPool2d: avgpool_module,
        nn.AdaptiveAvgPool1d: adaptive_avgpool, nn.AdaptiveAvgPool2d: adaptive_avgpool,
        nn.MaxPool2d: maxpool_module,
        nn.LayerNorm: composite.layer_norm_module, nn.RMSNorm: composite.rms_norm_module,
        nn.GroupNorm: composite.group_norm_module, nn.Softmax: composite.softmax(False),
        nn.LogSoftmax: composite.softmax(True),
    }
    onnx = _onnx_classes()
    for c in ("OnnxReshape", "OnnxTranspose", "OnnxSlice", "OnnxSliceV9", "OnnxGather", "OnnxGatherElements",
              "OnnxGatherND", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
              "OnnxUnsqueezeDynamicAxes", "OnnxFlatten", "OnnxPadStatic", "OnnxPadDynamic", "OnnxExpand",
              "OnnxTile", "OnnxDepthToSpace"):
        if c in onnx:
            t[onnx[c]] = select
    for c, h in (("OnnxCopyIdentity", alias), ("OnnxDropoutDynamic", alias),
                 ("OnnxBinaryMathOperation", onnx_binary), ("OnnxMatMul", binary("matmul")),
                 ("OnnxGemm", onnx_gemm), ("OnnxBatchNorm", onnx_batchnorm), ("OnnxConcat", onnx_concat),
                 ("OnnxNeg", neg), ("OnnxFunction", onnx_function), ("OnnxErf", plain("erf")),
                 ("OnnxHardSigmoid", hardsigmoid), ("OnnxLayerNorm", composite.onnx_layer_norm),
                 ("OnnxSoftmaxV1V11", composite.onnx_softmax_v1),
                 ("OnnxPow", onnx_pow), ("OnnxPReLU", onnx_prelu),
                 ("OnnxSqrt", plain("sqrt")), ("OnnxReciprocal", plain("reciprocal")),
                 ("OnnxGlobalAveragePool", global_avgpool),
                 ("OnnxGlobalAveragePoolWithKnownInputShape", global_avgpool),
                 ("OnnxReduceStaticAxes", onnx_reduce), ("OnnxReduceSumStaticAxes", onnx_reduce),
                 ("OnnxReduceSumDynamicAxes", onnx_reduce), ("OnnxMinMax", onnx_min_max)):
        if c in onnx:
            t[onnx[c]] = h
    return t


FUNCTIONS = {
    operator.add: binary("add"), torch.add: binary("add"), operator.sub: binary("sub"),
    torch.sub: binary("sub"), operator.mul: binary("mul"), torch.mul: binary("mul"),
    operator.truediv: binary("div"), torch.div: binary("div"), operator.matmul: binary("matmul"),
    torch.matmul: binary("matmul"), torch.mm: binary("matmul"), torch.bmm: binary("matmul"),
    torch.einsum: einsum_fn, operator.neg: neg, torch.neg: neg,
    torch.relu: activation("relu"), F.relu: activation("relu"), F.leaky_relu: activation("leaky_relu"),
    torch.sigmoid: activation("sigmoid"), F.sigmoid: activation("sigmoid"),
    torch.tanh: activation("tanh"), F.tanh: activation("tanh"),
    F.silu: smooth("silu"), F.gelu: smooth("gelu"), F.softplus: smooth("softplus"),
    F.elu: smooth("elu"), torch.exp: plain("exp"), torch.abs: plain("abs"),
    torch.erf: plain("erf"), torch.special.erf: plain("erf"), F.hardswish: plain("hardswish"),
    torch.sin: plain("sin"), torch.cos: plain("cos"),
    torch.pow: power, operator.pow: power, torch.square: power, torch.sqrt: plain("sqrt"),
    torch.rsqrt: plain("rsqrt"), torch.reciprocal: plain("reciprocal"), torch.log: plain("log"),
    F.prelu: prelu_fn, F.hardsigmoid: hardsigmoid, F.hardtanh: clamp(-1.0, 1.0), F.relu6: clamp(0.0, 6.0),
    torch.clamp: clamp(), torch.clip: clamp(),
    torch.flatten: select, torch.reshape: select, torch.permute: select, torch.transpose: select,
    torch.squeeze: select, torch.unsqueeze: select, operator.getitem: select, F.pad: select,
    torch.narrow: select, torch.t: select, torch.movedim: select, torch.index_select: select,
    torch.select: select, torch.gather: select,
    torch.cat: cat, torch.concat: cat, F.linear: linear_fn, F.conv1d: conv_fn, F.conv2d: conv_fn,
    F.avg_pool1d: avgpool_fn, F.avg_pool2d: avgpool_fn, F.max_pool2d: maxpool_fn, F.dropout: alias,
    F.batch_norm: batchnorm_fn,
    F.layer_norm: composite.layer_norm_fn, F.rms_norm: composite.rms_norm_fn,
    F.group_norm: composite.group_norm_fn, F.softmax: composite.softmax(False),
    torch.softmax: composite.softmax(False), F.log_softmax: composite.softmax(True),
    torch.log_softmax: composite.softmax(True),
    torch.sum: reduction("sum"), torch.mean: reduction("mean"), torch.amax: reduction("max"),
    torch.amin: reduction("min"), torch.max: extremum("max"), torch.min: extremum("min"),
    torch.maximum: extremum("max"), torch.minimum: extremum("min"),
}

METHODS = {
    **{m: select for m in ("view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                           "expand", "repeat", "narrow", "t", "unflatten", "select", "index_select",
                           "__getitem__", "movedim")},
    "contiguous": alias, "clone": alias, "add": binary("add"), "sub": binary("sub"), "mul": binary("mul"),
    "div": binary("div"), "matmul": binary("matmul"), "bmm": binary("matmul"), "neg": neg, "relu": activation("relu"),
    "sigmoid": activation("sigmoid"), "tanh": activation("tanh"), "exp": plain("exp"),
    "abs": plain("abs"), "erf": plain("erf"), "clamp": clamp(), "clip": clamp(),
    "sin": plain("sin"), "cos": plain("cos"), "softmax": composite.softmax(False),
    "log_softmax": composite.softmax(True), "pow": power, "__pow__": power, "square": power,
    "sqrt": plain("sqrt"), "rsqrt": plain("rsqrt"), "reciprocal": plain("reciprocal"),
    "log": plain("log"), "__truediv__": binary("div"),
    "__add__": binary("add"), "__sub__": binary("sub"), "__mul__": binary("mul"),
    "sum": reduction("sum"), "mean": reduction("mean"), "amax": reduction("max"),
    "amin": reduction("min"), "max": extremum("max"), "min": extremum("min"),
    "maximum": extremum("max"), "minimum": extremum("min"),
}

_MODULES = None
_MODULES_ONNX2TORCH = False   # whether the table holds onnx2torch's classes


def map_node(b, n):
    global _MODULES, _MODULES_ONNX2TORCH
    args = b.resolve(n.args)
    kwargs = b.resolve(n.kwargs)
    if n.op == "call_module":
        if _MODULES is None or (not _MODULES_ONNX2TORCH and "onnx2torch" in sys.modules):
            _MODULES_ONNX2TORCH = "onnx2torch" in sys.modules
            _MODULES = _build_module_table()
        mod = b.gm.get_submodule(n.target)
        h = _MODULES.get(type(mod))
        if h is None:
            h = next((f for cls, f in _MODULES.items() if isinstance(mod, cls)), None)
        if h is None:
            return b.problem(n, "no bound rule for this module")
        return h(b, n, mod, *args, **kwargs)
    table = FUNCTIONS if n.op == "call_function" else METHODS
    h = table.get(n.target)
    if h is None:
        return b.problem(n, "no bound rule")
    if n.op == "call_method" and not isinstance(args[0], Ref):
        # a method on a constant with a perturbed argument, e.g. W.matmul(x)
        if n.target in ("add", "sub", "mul", "div", "matmul", "bmm", "__add__", "__sub__", "__mul__",
                        "maximum", "minimum", "max", "min"):
            return h(b, n, n.target, *args, **kwargs)
        return b.problem(n, "method on a constant with a perturbed argument")
    return h(b, n, n.target, *args, **kwargs)
