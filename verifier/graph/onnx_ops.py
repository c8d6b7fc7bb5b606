"""One reader per ONNX op: ``OPS[op_type](reader, node, inputs, attrs) -> V or [V, ...]``.

Each writes the op with plain torch modules / functions through ``reader.call`` (folded when
every input is a constant) and ``reader.module``; ``inputs`` are ``V`` (None for an omitted
optional input), ``attrs`` the node's attributes as Python values. Where an attribute moved
to an input across opsets (Slice-10, Pad-11, Clip-11, Squeeze/Unsqueeze-13, ReduceSum-13, the
other Reduce ops in 18, Split-13), both forms are read. What cannot be written is a
``ReadProblem`` naming the attribute.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .onnx_base import V, ReadProblem

OPS: dict = {}


def op(*names):
    def deco(f):
        for n in names:
            OPS[n] = f
        return f
    return deco


# --- helpers ---------------------------------------------------------------------------------
def _const(v: V | None, what: str):
    if v is None:
        return None
    if not v.const:
        raise ReadProblem(f"its {what} is computed from the input (a constant is needed)")
    if v.batch_dependent:
        raise ReadProblem(f"its {what} depends on the batch size")
    return v.v1


def _ints(v: V | None, what: str):
    t = _const(v, what)
    return None if t is None else [int(i) for i in t.reshape(-1).tolist()]


def _scalar(v: V | None, what: str):
    t = _const(v, what)
    if t is None:
        return None
    if t.numel() != 1:
        raise ReadProblem(f"its {what} has {t.numel()} elements (one number needed)")
    return t.reshape(()).item()


def _rank(v: V) -> int:
    return v.v1.ndim


def _axis(a: int, rank: int) -> int:
    if not -rank <= a < max(rank, 1):
        raise ReadProblem(f"axis {a} out of range for rank {rank}")
    return a + rank if a < 0 else a


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=True)


def _in(ins, k):
    return ins[k] if len(ins) > k else None


# --- element-wise ----------------------------------------------------------------------------
_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
    "Abs": torch.abs, "Neg": torch.neg, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Atan": torch.atan, "Softplus": F.softplus, "Softsign": F.softsign, "HardSwish": F.hardswish,
    "Sign": torch.sign, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Not": torch.logical_not, "IsNaN": torch.isnan,
}


def _unary(r, node, ins, attrs):
    return r.call(_UNARY[node.op_type], ins[0])


for _n in _UNARY:
    OPS[_n] = _unary


@op("Selu")
def _selu(r, node, ins, attrs):
    if abs(attrs.get("alpha", 1.67326319217681884765625) - 1.6732632423543772) > 1e-6 or \
            abs(attrs.get("gamma", 1.05070102214813232421875) - 1.0507009873554805) > 1e-6:
        raise ReadProblem("Selu with non-default alpha / gamma")
    return r.call(F.selu, ins[0])


@op("LeakyRelu")
def _leaky(r, node, ins, attrs):
    return r.call(F.leaky_relu, ins[0], float(attrs.get("alpha", 0.01)))


@op("Elu")
def _elu(r, node, ins, attrs):
    return r.call(F.elu, ins[0], float(attrs.get("alpha", 1.0)))


@op("Gelu")
def _gelu(r, node, ins, attrs):
    return r.call(F.gelu, ins[0], approximate=attrs.get("approximate", "none"))


@op("HardSigmoid")
def _hardsigmoid(r, node, ins, attrs):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if math.isclose(alpha, 1 / 6, rel_tol=1e-7) and beta == 0.5:
        return r.call(F.hardsigmoid, ins[0])
    y = r.call(torch.mul, ins[0], alpha, tag="scale")
    y = r.call(torch.add, y, beta, tag="shift")
    return r.call(torch.clamp, y, 0.0, 1.0)


@op("Clip")
def _clip(r, node, ins, attrs):
    if r.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = _scalar(_in(ins, 1), "min"), _scalar(_in(ins, 2), "max")
    if lo is None and hi is None:
        return ins[0]
    return r.call(torch.clamp, ins[0], None if lo is None else float(lo),
                  None if hi is None else float(hi))


@op("PRelu")
def _prelu(r, node, ins, attrs):
    x, slope = ins[0], ins[1]
    if slope.const and not slope.batch_dependent and not x.const:
        s = slope.v1
        full = torch.broadcast_to(s, x.v1.shape)[0] if s.ndim <= _rank(x) else None
        if s.numel() == 1:
            w = slope if s.shape == (1,) else r.const(s.reshape(1))
            return r.call(F.prelu, x, w)
        if full is not None and full.ndim >= 1:
            per_channel = full.reshape(full.shape[0], -1)
            if bool((per_channel == per_channel[:, :1]).all()):
                w = slope if s.shape == (full.shape[0],) else r.const(per_channel[:, 0].contiguous())
                return r.call(F.prelu, x, w)
    # general slope: relu(x) - slope * relu(-x)
    pos = r.call(torch.relu, x, tag="pos")
    neg = r.call(torch.relu, r.call(torch.neg, x, tag="negx"), tag="neg")
    return r.call(torch.sub, pos, r.call(torch.mul, neg, slope, tag="slope"))


def _old_broadcast(r, attrs, a: V, b: V) -> V:
    """Before opset 7, ``broadcast=1, axis=k`` aligned b's dims with a's from dim k on: not read
    (onnxruntime runs none of these ops either)."""
    if r.opset < 7 and attrs.get("broadcast") and "axis" in attrs:
        raise ReadProblem("old-style broadcast (broadcast=1 with axis, before opset 7)")
    return b


def _int_div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


@op("Add", "Sub", "Mul", "Div")
def _binary(r, node, ins, attrs):
    a, b = ins[0], _old_broadcast(r, attrs, ins[0], ins[1])
    if a.const and b.const:
        f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div}[node.op_type]
        return r.call(f, a, b)
    f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[node.op_type]
    return r.call(f, a, b)


@op("Pow")
def _pow(r, node, ins, attrs):
    x, p = ins[0], _old_broadcast(r, attrs, ins[0], ins[1])
    if x.const and p.const:
        return r.call(lambda a, b: torch.pow(a, b).to(a.dtype), x, p)
    if p.const and not p.batch_dependent and p.v1.numel() == 1:
        return r.call(torch.pow, x, float(p.v1.reshape(()).item()))
    return r.call(torch.pow, x, p)


@op("Max", "Min", "Sum", "Mean")
def _variadic(r, node, ins, attrs):
    f = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    acc = ins[0]
    last = len(ins) - 1 if node.op_type != "Mean" else len(ins)
    for k, other in enumerate(ins[1:], 1):
        acc = r.call(f, acc, other, tag=None if k == last else f"m{k}")
    if node.op_type == "Mean" and len(ins) > 1:
        acc = r.call(torch.mul, acc, 1.0 / len(ins))
    return acc


@op("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where",
    "Mod")
def _logic(r, node, ins, attrs):
    f = {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
         "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
         "Xor": torch.logical_xor, "Where": torch.where,
         "Mod": torch.fmod if attrs.get("fmod") else torch.remainder}[node.op_type]
    return r.call(f, *ins)


# --- linear layers ---------------------------------------------------------------------------
@op("MatMul")
def _matmul(r, node, ins, attrs):
    return r.call(torch.matmul, ins[0], ins[1])


def _linear_module(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta")
    lin.weight = _param(W)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


@op("Gemm")
def _gemm(r, node, ins, attrs):
    A, B, C = ins[0], ins[1], _in(ins, 2)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    if not A.const and B.const and not B.batch_dependent and B.v1.ndim == 2 and not ta and \
            (C is None or (C.const and not C.batch_dependent)):
        W = B.v1 if tb else B.v1.t()                                  # [out, in]
        n_out = W.shape[0]
        bias, bias_alias, add_c = None, None, None
        if C is not None:
            c = C.v1
            if c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1):
                bias = (c.reshape(-1) if c.ndim else c.reshape(1)).to(W.dtype) * beta
                bias = bias.expand(n_out).contiguous()
                if beta == 1 and tuple(c.shape) == (n_out,):
                    bias_alias = C.init
            else:
                add_c = C                                             # varies along the rows
        if alpha == 1 and not tb:   # x @ B keeps B as stored (the mapping names it, transposed)
            y = r.call(torch.matmul, A, B, tag=None if bias is None and add_c is None else "matmul")
            if bias is not None:
                cv = C if bias_alias else r.const(bias)
                y = r.call(torch.add, y, cv, tag=None if add_c is None else "bias")
        else:
            aliases = {}
            if alpha == 1 and B.init:
                aliases["weight"] = B.init
            if bias_alias:
                aliases["bias"] = bias_alias
            lin = _linear_module(W * alpha, bias)
            y = r.module(lin, A, aliases=aliases, tag=None if add_c is None else "linear")
        if add_c is not None:
            y = r.call(torch.add, y, r.call(torch.mul, add_c, beta) if beta != 1 else add_c)
        return y
    a = r.call(torch.t, A, tag="transA") if ta else A
    b = r.call(torch.t, B, tag="transB") if tb else B
    y = r.call(torch.matmul, a, b, tag="matmul" if (alpha != 1 or C is not None) else None)
    if alpha != 1:
        y = r.call(torch.mul, y, alpha, tag="alpha" if C is not None else None)
    if C is not None:
        y = r.call(torch.add, y, r.call(torch.mul, C, beta, tag="beta") if beta != 1 else C)
    return y


def _pads(attrs, x: V, kernel, strides, dilations, nd):
    """ONNX pads as (begin, end) per spatial dim, auto_pad resolved."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        sizes = x.v1.shape[2:]
        begin, end = [], []
        for i in range(nd):
            out = -(-sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - sizes[i])
            small = total // 2
            b = small if auto == "SAME_UPPER" else total - small
            begin.append(b)
            end.append(total - b)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _torch_pad(begin, end):
    """(begin, end) per trailing spatial dim -> F.pad's order (last dim first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return tuple(out)


@op("Conv")
def _conv(r, node, ins, attrs):
    x, w, b = ins[0], ins[1], _in(ins, 2)
    nd = _rank(w) - 2
    if nd not in (1, 2, 3):
        raise ReadProblem(f"a {nd}-D convolution")
    kernel = list(attrs.get("kernel_shape", w.v1.shape[2:]))
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    groups = int(attrs.get("group", 1))
    begin, end = _pads(attrs, x, kernel, strides, dil, nd)
    if begin != end:
        x = r.call(F.pad, x, _torch_pad(begin, end), tag="pad")
        begin = [0] * nd
    if w.const and not w.batch_dependent and (b is None or (b.const and not b.batch_dependent)):
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        W = w.v1
        conv = cls(W.shape[1] * groups, W.shape[0], tuple(W.shape[2:]), stride=tuple(strides),
                   padding=tuple(begin), dilation=tuple(dil), groups=groups, bias=b is not None,
                   device="meta")
        return r.module(conv, x, aliases=_weights(conv, w, b))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return r.call(fn, x, w, b, tuple(strides), tuple(begin), tuple(dil), groups)


def _weights(mod, w: V, b: V | None) -> dict:
    """Set a module's weight and bias (a convolution's, a LayerNorm's) from the constants ``w``
    and ``b``; -> the aliases of its parameters to the ONNX initializers they came from."""
    mod.weight = _param(w.v1)
    aliases = {"weight": w.init} if w.init else {}
    if b is not None:
        mod.bias = _param(b.v1)
        if b.init:
            aliases["bias"] = b.init
    return aliases


def _transpose_pads(attrs, x: V, w: V, strides, dil, out_pad, nd) -> list[int]:
    """ConvTranspose's pads (begins, then ends): given, or generated from ``output_shape`` /
    ``auto_pad=SAME_*`` by the operator's equations (total padding = the full output size minus
    the requested one, split with the odd unit at the end for SAME_UPPER, at the start
    otherwise)."""
    auto = attrs.get("auto_pad", "NOTSET")
    shape = attrs.get("output_shape")
    if shape is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        return [0] * (2 * nd) if auto == "VALID" else list(attrs.get("pads", [0] * (2 * nd)))
    sizes = x.v1.shape[2:]
    kernel = list(attrs.get("kernel_shape", w.v1.shape[2:]))
    shape = list(shape)[-nd:] if shape is not None else [sizes[i] * strides[i] for i in range(nd)]
    begin, end = [], []
    for i in range(nd):
        full = strides[i] * (sizes[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1
        total = full - shape[i]
        if total < 0:
            raise ReadProblem(f"ConvTranspose output_shape {shape} larger than its full output")
        half = total // 2
        first = half if auto == "SAME_UPPER" else total - half
        begin.append(first)
        end.append(total - first)
    return begin + end


@op("ConvTranspose")
def _conv_transpose(r, node, ins, attrs):
    x, w, b = ins[0], ins[1], _in(ins, 2)
    nd = _rank(w) - 2
    if nd not in (1, 2):
        raise ReadProblem(f"a {nd}-D transposed convolution")
    if not w.const or (b is not None and not b.const):
        raise ReadProblem("ConvTranspose with weights computed from the input")
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    groups = int(attrs.get("group", 1))
    out_pad = list(attrs.get("output_padding", [0] * nd))
    pads = _transpose_pads(attrs, x, w, strides, dil, out_pad, nd)
    begin, end = pads[:nd], pads[nd:]
    common = [min(p, q) for p, q in zip(begin, end)]
    W = w.v1
    cls = nn.ConvTranspose1d if nd == 1 else nn.ConvTranspose2d
    conv = cls(W.shape[0], W.shape[1] * groups, tuple(W.shape[2:]), stride=tuple(strides),
               padding=tuple(common), output_padding=tuple(out_pad), groups=groups,
               bias=b is not None, dilation=tuple(dil), device="meta")
    crop = begin != common or end != common
    y = r.module(conv, x, aliases=_weights(conv, w, b), tag="conv" if crop else None)
    if crop:
        idx = (slice(None), slice(None)) + tuple(
            slice(bb - c, (-(ee - c)) or None) for bb, ee, c in zip(begin, end, common))
        y = r.call(operator.getitem, y, idx)
    return y


@op("BatchNormalization")
def _batchnorm(r, node, ins, attrs):
    x, scale, bias, mean, var = ins[:5]
    if attrs.get("training_mode", 0):
        raise ReadProblem("BatchNormalization in training mode")
    if r.opset < 9 and attrs.get("spatial", 1) != 1:
        raise ReadProblem("BatchNormalization with spatial=0")
    eps = float(attrs.get("epsilon", 1e-5))
    consts = [scale, bias, mean, var]
    if all(v.const and not v.batch_dependent for v in consts) and 2 <= _rank(x) <= 5:
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[_rank(x)]
        bn = cls(scale.v1.shape[0], eps=eps)
        bn.weight = _param(scale.v1)
        bn.bias = _param(bias.v1)
        bn.running_mean = mean.v1.detach().clone()
        bn.running_var = var.v1.detach().clone()
        bn.eval()
        names = {"weight": scale.init, "bias": bias.init, "running_mean": mean.init,
                 "running_var": var.init}
        return r.module(bn, x, aliases={k: v for k, v in names.items() if v})
    return r.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


# --- pooling ---------------------------------------------------------------------------------
def _pool_args(attrs, x, nd):
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    begin, end = _pads(attrs, x, kernel, strides, dil, nd)
    return kernel, strides, dil, begin, end


@op("MaxPool")
def _maxpool(r, node, ins, attrs):
    x = ins[0]
    nd = _rank(x) - 2
    if nd not in (1, 2):
        raise ReadProblem(f"{nd}-D max pooling")
    if attrs.get("storage_order", 0):
        raise ReadProblem("MaxPool with storage_order=1")
    kernel, strides, dil, begin, end = _pool_args(attrs, x, nd)
    if begin != end:
        raise ReadProblem(f"MaxPool with asymmetric pads {begin + end}")
    fn = F.max_pool1d if nd == 1 else F.max_pool2d
    return r.call(fn, x, tuple(kernel), tuple(strides), tuple(begin), tuple(dil),
                  bool(attrs.get("ceil_mode", 0)))


@op("AveragePool")
def _avgpool(r, node, ins, attrs):
    x = ins[0]
    nd = _rank(x) - 2
    if nd not in (1, 2):
        raise ReadProblem(f"{nd}-D average pooling")
    kernel, strides, dil, begin, end = _pool_args(attrs, x, nd)
    if any(d != 1 for d in dil):
        raise ReadProblem("AveragePool with dilations")
    include = bool(attrs.get("count_include_pad", 0))
    ceil = bool(attrs.get("ceil_mode", 0))
    if begin != end:
        if not include or ceil:
            raise ReadProblem(f"AveragePool with asymmetric pads {begin + end} and "
                              "count_include_pad=0 or ceil_mode=1")
        x = r.call(F.pad, x, _torch_pad(begin, end), tag="pad")
        begin = [0] * nd
    fn = F.avg_pool1d if nd == 1 else F.avg_pool2d
    return r.call(fn, x, tuple(kernel), tuple(strides), tuple(begin), ceil, include)


@op("GlobalAveragePool")
def _gap(r, node, ins, attrs):
    x = ins[0]
    nd = _rank(x) - 2
    if nd in (1, 2) and not x.const:
        mod = nn.AdaptiveAvgPool1d(1) if nd == 1 else nn.AdaptiveAvgPool2d(1)
        return r.module(mod, x)
    return r.call(torch.mean, x, dim=tuple(range(2, _rank(x))), keepdim=True)


@op("GlobalMaxPool")
def _gmp(r, node, ins, attrs):
    x = ins[0]
    return r.call(torch.amax, x, dim=tuple(range(2, _rank(x))), keepdim=True)


# --- normalization, softmax, reductions, einsum ----------------------------------------------
@op("Softmax", "LogSoftmax")
def _softmax(r, node, ins, attrs):
    x = ins[0]
    rank = _rank(x)
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if r.opset >= 13:
        return r.call(fn, x, _axis(int(attrs.get("axis", -1)), rank))
    axis = _axis(int(attrs.get("axis", 1)), rank)
    if axis == rank - 1 or math.prod(x.v1.shape[axis:]) == x.v1.shape[-1]:
        return r.call(fn, x, rank - 1)
    # before opset 13: over the dims from axis on, flattened
    flat = (-1,) + tuple(x.v1.shape[1:axis]) + (math.prod(x.v1.shape[axis:]),) if axis > 0 \
        else (1, -1)
    y = r.call(torch.reshape, x, flat, tag="flat")
    y = r.call(fn, y, len(flat) - 1, tag="softmax")
    return r.call(torch.reshape, y, (-1,) + tuple(x.v1.shape[1:]))


@op("LayerNormalization")
def _layer_norm(r, node, ins, attrs):
    x, scale, bias = ins[0], ins[1], _in(ins, 2)
    axis = _axis(int(attrs.get("axis", -1)), _rank(x))
    eps = float(attrs.get("epsilon", 1e-5))
    shape = tuple(x.v1.shape[axis:])
    consts = scale.const and not scale.batch_dependent and (bias is None or bias.const)
    if consts and tuple(scale.v1.shape) == shape and (bias is None or tuple(bias.v1.shape) == shape):
        ln = nn.LayerNorm(shape, eps=eps, bias=bias is not None)
        return r.module(ln, x, aliases=_weights(ln, scale, bias))
    if consts:
        w = r.const(torch.broadcast_to(scale.v1, shape).contiguous())
        b = None if bias is None else r.const(torch.broadcast_to(bias.v1, shape).contiguous())
        return r.call(F.layer_norm, x, shape, w, b, eps)
    return r.call(F.layer_norm, x, shape, scale, bias, eps)


_REDUCE = {"ReduceSum": torch.sum, "ReduceMean": torch.mean, "ReduceMax": torch.amax,
           "ReduceMin": torch.amin, "ReduceProd": None, "ReduceL1": None, "ReduceL2": None,
           "ReduceSumSquare": None, "ReduceLogSumExp": torch.logsumexp}


@op(*_REDUCE)
def _reduce(r, node, ins, attrs):
    x = ins[0]
    rank = _rank(x)
    axes = attrs.get("axes")
    if axes is None:
        axes = _ints(_in(ins, 1), "axes")
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(rank))
    dims = tuple(sorted(_axis(int(a), rank) for a in axes))
    kind = node.op_type
    if kind == "ReduceProd":
        if len(dims) != 1:
            raise ReadProblem("ReduceProd over several axes")
        return r.call(torch.prod, x, dims[0], keepdim=keep)
    if kind in ("ReduceL1", "ReduceL2", "ReduceSumSquare"):
        t = r.call(torch.abs, x, tag="abs") if kind == "ReduceL1" else \
            r.call(torch.mul, x, x, tag="square")
        s = r.call(torch.sum, t, dim=dims, keepdim=keep, tag="sum" if kind == "ReduceL2" else None)
        return r.call(torch.sqrt, s) if kind == "ReduceL2" else s
    return r.call(_REDUCE[kind], x, dim=dims, keepdim=keep)


@op("Einsum")
def _einsum(r, node, ins, attrs):
    return r.call(torch.einsum, attrs["equation"], *ins)


@op("ArgMax", "ArgMin")
def _argmax(r, node, ins, attrs):
    x = ins[0]
    axis = _axis(int(attrs.get("axis", 0)), _rank(x))
    if attrs.get("select_last_index", 0):
        raise ReadProblem(f"{node.op_type} with select_last_index=1")
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return r.call(fn, x, axis, keepdim=bool(attrs.get("keepdims", 1)))


