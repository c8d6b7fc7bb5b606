"""Shape operators as one rule: every output element is either a copy of one input element or a
constant. Reshape, Flatten, View, Squeeze/Unsqueeze, Transpose/Permute, Slice, Gather with
constant indices, Pad (any mode), Expand all become ``select`` with an index map (built once,
when the graph is made, by running the op on numbered tensors). Concat of several tensors is
``concat``.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import AffineRule, register
from .norms import selection_norm


@register("select")
class Select(AffineRule):
    """``y.flat[k] = x.flat[index[k]]`` where ``index[k] >= 0``, else the constant ``fill[k]``.

    params: ``index: [n_out] int64``, ``fill: [n_out]`` or None, ``identity``: the map is a
    plain reshape (no data movement), ``in_shape``.
    """

    data_movement = True

    def _apply(self, node, t):
        p = node.params
        B = t.shape[0]
        if p["identity"]:
            return t.reshape(B, *node.shape)
        flat = t.reshape(B, -1)
        idx = p["index"]
        if p["fill"] is None:
            out = flat[:, idx]
        else:
            out = flat[:, idx.clamp(min=0)]
            out = torch.where(idx >= 0, out, p["fill"].to(out.dtype))
        return out.reshape(B, *node.shape)

    def interval(self, node, inputs):
        (x,) = inputs
        return Interval(self._apply(node, x.lower), self._apply(node, x.upper))

    def transpose(self, node, A):
        p = node.params
        B, S = A.shape[:2]
        if p["identity"]:
            return [A.reshape(B, S, *p["in_shape"])]
        flat = A.reshape(B, S, -1)
        idx = p["index"]
        n_in = 1
        for s in p["in_shape"]:
            n_in *= s
        out = flat.new_zeros(B, S, n_in)
        if p["fill"] is None:
            if p["permutation"]:
                out[:, :, idx] = flat
            else:
                out.index_add_(2, idx, flat)
        else:
            keep = idx >= 0
            out.index_add_(2, idx[keep], flat[:, :, keep])
        return [out.reshape(B, S, *p["in_shape"])]

    def op_norm(self, node):
        p = node.params
        if p.get("identity") or p.get("permutation"):
            return 1.0, "reshape / permutation"
        return selection_norm(p["index"], math.prod(p["in_shape"])), "sqrt(max copies)"

    def bias(self, node, A):
        fill = node.params["fill"]
        if fill is None:
            return 0.0
        return A.reshape(A.shape[0], A.shape[1], -1).matmul(fill.to(A.dtype))


@register("concat")
class Concat(AffineRule):
    """``y = cat(parts, dim)``; params ``parts``: per part the input position (int) or a
    constant tensor (per sample, no batch dim), ``dim`` (per-sample), ``sizes`` along dim."""

    def interval(self, node, inputs):
        p = node.params
        lo, up = [], []
        B = inputs[0].lower.shape[0]
        for part in p["parts"]:
            if isinstance(part, int):
                lo.append(inputs[part].lower)
                up.append(inputs[part].upper)
            else:
                c = part.unsqueeze(0).expand(B, *part.shape)
                lo.append(c)
                up.append(c)
        d = p["dim"] + 1
        return Interval(torch.cat(lo, d), torch.cat(up, d))

    def lipschitz(self, node, Ls):
        parts = [Ls[k] for k in node.params["parts"] if isinstance(k, int)]
        return math.sqrt(sum(v * v for v in parts)), 1.0, "sqrt(sum of squares)"

    def deviation(self, node, centers, devs):
        """Over the parts (an input placed twice counts twice)."""
        return torch.sqrt(sum(devs[k] * devs[k] for k in node.params["parts"] if isinstance(k, int)))

    def _split(self, node, A):
        return torch.split(A, node.params["sizes"], dim=node.params["dim"] + 2)

    def transpose(self, node, A):
        outs = [None] * len(node.inputs)
        for part, a in zip(node.params["parts"], self._split(node, A)):
            if isinstance(part, int):
                outs[part] = a if outs[part] is None else outs[part] + a
        return outs

    def bias(self, node, A):
        b = 0.0
        for part, a in zip(node.params["parts"], self._split(node, A)):
            if not isinstance(part, int):
                b = b + (a * part).flatten(2).sum(-1)
        return b
