"""The ONNX readers of shape computations and data movement (``verifier.graph.onnx_ops``
explains the signature): constants and ``Shape`` chains fold at read time; target shapes that
hold the batch size become ``-1`` there (``_batch_shape``), so that the module takes any batch.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from .onnx_ops import _axis, _const, _in, _ints, _rank, _scalar, op
from .onnx_base import _DTYPES, V, ReadProblem


# --- shapes and data movement ----------------------------------------------------------------
@op("Identity", "Dropout")
def _identity(r, node, ins, attrs):
    if node.op_type == "Dropout":
        if attrs.get("is_test", 1) == 0 and r.opset < 7:
            raise ReadProblem("Dropout in training mode (is_test=0)")
        train = _in(ins, 2)
        if train is not None and bool(_const(train, "training_mode")):
            raise ReadProblem("Dropout in training mode")
    return ins[0]


@op("Constant")
def _constant(r, node, ins, attrs):
    if "value" in attrs:
        return r.const(attrs["value"])
    for k, dt in (("value_float", torch.float32), ("value_floats", torch.float32),
                  ("value_int", torch.int64), ("value_ints", torch.int64)):
        if k in attrs:
            return r.const(torch.tensor(attrs[k], dtype=dt, device="cpu"))
    raise ReadProblem(f"Constant with {sorted(attrs)}")


@op("Cast", "CastLike")
def _cast(r, node, ins, attrs):
    x = ins[0]
    dt = ins[1].v1.dtype if node.op_type == "CastLike" else _DTYPES.get(int(attrs["to"]))
    if dt is None:
        raise ReadProblem(f"Cast to ONNX type {attrs.get('to')}")
    if x.const:
        return r.call(lambda t: t.to(dt), x)
    if x.v1.dtype == dt or (x.v1.dtype == torch.float32 and dt == torch.float64):
        return x            # exact: the value does not change
    return r.call("to", x, dt, kind="call_method")


@op("Shape")
def _shape(r, node, ins, attrs):
    x = ins[0]
    start, end = attrs.get("start", 0), attrs.get("end")

    def shape(t):
        return None if t is None else torch.tensor(list(t.shape)[start:end], dtype=torch.int64,
                                                   device=t.device)
    s1 = shape(x.v1)
    if x.const and not x.batch_dependent:
        return r.const(s1)
    return V(None, s1, shape(x.v2))


@op("Size")
def _size(r, node, ins, attrs):
    x = ins[0]
    n1 = torch.tensor(x.v1.numel(), dtype=torch.int64, device=x.v1.device)
    if x.const and not x.batch_dependent:
        return r.const(n1)
    return V(None, n1, None if x.v2 is None else torch.tensor(x.v2.numel(), dtype=torch.int64,
                                                                         device=x.v2.device))


@op("ConstantOfShape")
def _constant_of_shape(r, node, ins, attrs):
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32, device="cpu"))
    if not ins[0].const:
        raise ReadProblem("its shape is computed from the input's values")
    return r.call(lambda s: torch.full([int(i) for i in s.tolist()], value.reshape(-1)[0].item(),
                                       dtype=value.dtype, device=s.device), ins[0])


@op("Range")
def _range(r, node, ins, attrs):
    if not all(v.const for v in ins):
        raise ReadProblem("Range of values computed from the input")
    return r.call(lambda a, b, c: torch.arange(a.item(), b.item(), c.item(), dtype=a.dtype,
                                                      device=a.device), *ins)


def _resolve_shape(xshape, target, allowzero):
    t = [int(v) for v in target.reshape(-1).tolist()]
    if not allowzero:
        t = [xshape[i] if v == 0 and i < len(xshape) else v for i, v in enumerate(t)]
    if t.count(-1) > 1:
        raise ReadProblem(f"Reshape to {t} (several -1)")
    if -1 in t:
        rest = math.prod(v for v in t if v != -1)
        k = t.index(-1)
        t[k] = math.prod(xshape) // rest if rest else 0
    return t


def _batch_shape(x: V, s1, s2):
    """A target shape written so that it holds for every batch: the shapes at batch 1 and 2
    that differ only in dim 0 become ``-1`` there; otherwise the batch-1 shape."""
    if s2 is None or s1 == s2:
        return tuple(s1)
    if len(s1) == len(s2) and s1[1:] == s2[1:]:
        return (-1,) + tuple(s1[1:])
    return tuple(s1)


@op("Reshape")
def _reshape(r, node, ins, attrs):
    x = ins[0]
    allowzero = int(attrs.get("allowzero", 0))
    if r.opset < 5 or len(ins) < 2:
        target = r.const(torch.tensor(attrs["shape"], dtype=torch.int64, device="cpu"))
    else:
        target = ins[1]
    if not target.const:
        raise ReadProblem("its target shape is computed from the input's values")
    s1 = _resolve_shape(list(x.v1.shape), target.v1, allowzero)
    s2 = None
    if x.v2 is not None and target.v2 is not None:
        try:
            s2 = _resolve_shape(list(x.v2.shape), target.v2, allowzero)
        except ReadProblem:
            s2 = None
    return r.call(torch.reshape, x, _batch_shape(x, s1, s2))


@op("Flatten")
def _flatten(r, node, ins, attrs):
    x = ins[0]
    rank = _rank(x)
    axis = int(attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if axis == 1 and rank >= 2:
        return r.call(torch.flatten, x, 1)
    if axis == 0:
        return r.call(torch.reshape, x, (1, -1))
    return r.call(torch.reshape, x, (-1, math.prod(x.v1.shape[axis:])))


@op("Transpose")
def _transpose(r, node, ins, attrs):
    x = ins[0]
    perm = attrs.get("perm", list(reversed(range(_rank(x)))))
    return r.call(torch.permute, x, tuple(int(p) for p in perm))


@op("Concat")
def _concat(r, node, ins, attrs):
    parts = [v for v in ins if v is not None]
    return r.call(torch.cat, parts, int(attrs["axis"]))


@op("Slice")
def _slice(r, node, ins, attrs):
    x = ins[0]
    rank = _rank(x)
    if r.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1], "starts"), _ints(ins[2], "ends")
        axes = _ints(_in(ins, 3), "axes") or list(range(len(starts)))
        steps = _ints(_in(ins, 4), "steps") or [1] * len(starts)
    idx = [slice(None)] * rank
    flips = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        a = _axis(a, rank)
        if st == 0:
            raise ReadProblem("Slice with step 0")
        if st > 0:
            idx[a] = slice(s, e, st)
        else:
            flips.append((a, s, e, st))
    y = x
    if flips:
        for a, s, e, st in flips:
            keep = list(range(*slice(s, e, st).indices(x.v1.shape[a])))
            y = r.call(torch.index_select, y, a, r.const(torch.tensor(keep, dtype=torch.int64, device="cpu")),
                       tag=f"rev{a}")
    while idx and idx[-1] == slice(None):
        idx.pop()
    if not idx:
        return y if y is not x else r.call(operator.getitem, x, (slice(None),))
    return r.call(operator.getitem, y, tuple(idx))


@op("Gather")
def _gather(r, node, ins, attrs):
    x, ind = ins[0], ins[1]
    rank = _rank(x)
    axis = _axis(int(attrs.get("axis", 0)), rank)
    i = _const(ind, "indices").to(torch.int64)
    size = x.v1.shape[axis]
    i = torch.where(i < 0, i + size, i)
    if i.ndim == 0:
        return r.call(torch.select, x, axis, int(i))
    flat = r.call(torch.index_select, x, axis, r.const(i.reshape(-1)),
                  tag="select" if i.ndim != 1 else None)
    if i.ndim == 1:
        return flat
    shape = list(x.v1.shape[:axis]) + list(i.shape) + list(x.v1.shape[axis + 1:])
    if axis > 0 and not x.const:
        shape[0] = -1
    return r.call(torch.reshape, flat, tuple(shape))


@op("GatherElements")
def _gather_elements(r, node, ins, attrs):
    x = ins[0]
    axis = _axis(int(attrs.get("axis", 0)), _rank(x))
    i = _const(ins[1], "indices").to(torch.int64)
    i = torch.where(i < 0, i + x.v1.shape[axis], i)
    return r.call(torch.gather, x, axis, r.const(i))


@op("Squeeze")
def _squeeze(r, node, ins, attrs):
    x = ins[0]
    axes = attrs.get("axes") if r.opset < 13 else _ints(_in(ins, 1), "axes")
    if axes is None:
        axes = [k for k, d in enumerate(x.v1.shape) if d == 1]
    axes = tuple(sorted(_axis(int(a), _rank(x)) for a in axes))
    if not axes:
        return x
    return r.call(torch.squeeze, x, axes)


@op("Unsqueeze")
def _unsqueeze(r, node, ins, attrs):
    x = ins[0]
    axes = attrs.get("axes") if r.opset < 13 else _ints(_in(ins, 1), "axes")
    out_rank = _rank(x) + len(axes)
    axes = sorted(_axis(int(a), out_rank) for a in axes)
    y = x
    for k, a in enumerate(axes):
        y = r.call(torch.unsqueeze, y, a, tag=None if k == len(axes) - 1 else f"u{a}")
    return y


@op("Pad")
def _pad(r, node, ins, attrs):
    x = ins[0]
    rank = _rank(x)
    if r.opset < 11:
        pads = list(attrs.get("pads", attrs.get("paddings", [])))
        value = float(attrs.get("value", 0.0))
        axes = list(range(rank))
    else:
        pads = _ints(ins[1], "pads")
        value = _scalar(_in(ins, 2), "constant_value")
        value = 0.0 if value is None else float(value)
        axes = _ints(_in(ins, 3), "axes")
        axes = list(range(rank)) if axes is None else [_axis(a, rank) for a in axes]
    mode = attrs.get("mode", "constant")
    k = len(axes)
    begin = dict(zip(axes, pads[:k]))
    end = dict(zip(axes, pads[k:]))
    first = min([a for a in axes if begin[a] or end[a]], default=rank)
    torch_pad = []
    for a in range(rank - 1, first - 1, -1):
        torch_pad += [begin.get(a, 0), end.get(a, 0)]
    if not torch_pad:
        return x
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
             "wrap": "circular"}.get(mode)
    if tmode is None:
        raise ReadProblem(f"Pad with mode {mode!r}")
    if tmode == "constant":
        return r.call(F.pad, x, tuple(torch_pad), "constant", value)
    return r.call(F.pad, x, tuple(torch_pad), tmode)


def _broadcast(a: tuple, b: tuple) -> list:
    """numpy's broadcast of two shapes (torch.broadcast_shapes imports sympy on first use)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ReadProblem(f"shapes {list(a)} and {list(b)} do not broadcast")
        out.append(x if y == 1 else y)
    return out


@op("Expand")
def _expand(r, node, ins, attrs):
    x, shape = ins[0], ins[1]
    if not shape.const:
        raise ReadProblem("its shape is computed from the input's values")
    s1 = _broadcast(tuple(x.v1.shape), tuple(shape.v1.tolist()))
    s2 = None
    if x.v2 is not None and shape.v2 is not None:
        try:
            s2 = _broadcast(tuple(x.v2.shape), tuple(shape.v2.tolist()))
        except ReadProblem:
            s2 = None
    target = _batch_shape(x, s1, s2)
    if target[0] == -1 and len(target) != _rank(x):
        target = tuple(s1)
    return r.call("expand", x, *target, kind="call_method")


@op("Tile")
def _tile(r, node, ins, attrs):
    reps = _ints(ins[1], "repeats")
    return r.call("repeat", ins[0], *reps, kind="call_method")


@op("Split")
def _split(r, node, ins, attrs):
    x = ins[0]
    axis = _axis(int(attrs.get("axis", 0)), _rank(x))
    size = x.v1.shape[axis]
    if r.opset < 13:
        sizes = attrs.get("split")
    else:
        sizes = _ints(_in(ins, 1), "split")
    n = len(node.output)
    if not sizes:
        n = int(attrs.get("num_outputs", n))
        chunk = -(-size // n)
        sizes = [min(chunk, size - k * chunk) for k in range(n)]
    outs, start = [], 0
    for k, s in enumerate(sizes):
        idx = (slice(None),) * axis + (slice(start, start + s),)
        outs.append(r.call(operator.getitem, x, idx, tag=None if k == 0 else str(k)))
        start += s
    return outs


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(r, node, ins, attrs):
    x = ins[0]
    if _rank(x) != 4:
        raise ReadProblem(f"{node.op_type} of a rank-{_rank(x)} tensor")
    b = int(attrs["blocksize"])
    _, c, h, w = x.v1.shape
    if node.op_type == "SpaceToDepth":
        y = r.call(torch.reshape, x, (-1, c, h // b, b, w // b, b), tag="split")
        y = r.call(torch.permute, y, (0, 3, 5, 1, 2, 4), tag="move")
        return r.call(torch.reshape, y, (-1, c * b * b, h // b, w // b))
    if attrs.get("mode", "DCR") == "DCR":
        y = r.call(torch.reshape, x, (-1, b, b, c // (b * b), h, w), tag="split")
        y = r.call(torch.permute, y, (0, 3, 4, 1, 5, 2), tag="move")
    else:
        y = r.call(torch.reshape, x, (-1, c // (b * b), b, b, h, w), tag="split")
        y = r.call(torch.permute, y, (0, 1, 4, 2, 5, 3), tag="move")
    return r.call(torch.reshape, y, (-1, c // (b * b), h * b, w * b))
