"""CROWN for intermediate nodes of convolutional networks, with A stored as patches.

The bound of one neuron (c, i, j) of a convolutional node depends only on a window of each
earlier feature map (its receptive field). Dense ``A: [B, K, C, H, W]`` is mostly zeros there;
patches keep only the window: ``value: [B, K, C, ph, pw]`` whose top-left corner in the map
is ``(i·S - P, j·S - P)`` for row k at start position (i, j), with ``S`` the product of the
strides passed and ``P`` the accumulated padding. Going back through a convolution
(stride s, padding p, kernel k, dilation d) maps the window to
``ph' = (ph - 1)·s + d·(k - 1) + 1``, ``S' = S·s``, ``P' = P·s + p``; element-wise ops multiply
the window by the matching window of their slope maps. Positions outside the map (the
convolution's zero padding) are masked to 0.

Used by ``crown.backward_bound`` when every node between the start and the leaves has a patch
rule here (conv, element-wise affine, add, activations); otherwise the dense path runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import RULES
from ..perturbation import Box, LpBall


class NotPatchable(Exception):
    """This pass cannot run in patch form (the caller falls back to dense A)."""


@dataclass
class Geometry:
    """Where each row's window lies: rows k at start positions (oi[k], oj[k]) on a grid of
    ``grid`` positions; top-left = (oi·S - P); window size ``size``."""
    oi: torch.Tensor
    oj: torch.Tensor
    grid: tuple
    S: tuple
    P: tuple
    size: tuple

    def back_through_conv(self, k, s, p, d):
        return Geometry(self.oi, self.oj, self.grid, (self.S[0] * s[0], self.S[1] * s[1]),
                        (self.P[0] * s[0] + p[0], self.P[1] * s[1] + p[1]),
                        ((self.size[0] - 1) * s[0] + d[0] * (k[0] - 1) + 1,
                         (self.size[1] - 1) * s[1] + d[1] * (k[1] - 1) + 1))

    def windows(self, T: torch.Tensor) -> torch.Tensor:
        """Windows of a map ``T: [B, C, H, W]`` for every row -> ``[B, K, C, ph, pw]``
        (zeros outside the map)."""
        B, C, H, W = T.shape
        (ph, pw), (Sh, Sw), (Ph, Pw) = self.size, self.S, self.P
        Gh, Gw = self.grid
        bottom = max(0, (Gh - 1) * Sh - Ph + ph - H)
        right = max(0, (Gw - 1) * Sw - Pw + pw - W)
        Tp = F.pad(T, (Pw, right, Ph, bottom))
        cols = F.unfold(Tp, (ph, pw), stride=(Sh, Sw))            # [B, C*ph*pw, Lh*Lw]
        Lw = (Tp.shape[3] - pw) // Sw + 1
        idx = self.oi * Lw + self.oj
        return cols[:, :, idx].permute(0, 2, 1).reshape(B, len(idx), C, ph, pw)

    def mask(self, H, W, dtype):
        return self.windows(torch.ones(1, 1, H, W, dtype=dtype))  # [1, K, 1, ph, pw]

    def to_dense(self, v: torch.Tensor, shape) -> torch.Tensor:
        """Patches ``v: [B, K, C, ph, pw]`` -> dense ``A: [B, K, C, H, W]``."""
        B, K, C, ph, pw = v.shape
        _, H, W = shape
        (Sh, Sw), (Ph, Pw) = self.S, self.P
        top = self.oi * Sh  # in the padded map (shifted by P)
        left = self.oj * Sw
        Hp = max(H + Ph, int(top.max()) + ph) if K else H + Ph
        Wp = max(W + Pw, int(left.max()) + pw) if K else W + Pw
        out = v.new_zeros(K, Hp, Wp, B, C)
        r = (top.view(K, 1, 1) + torch.arange(ph).view(1, ph, 1)).expand(K, ph, pw)
        c = (left.view(K, 1, 1) + torch.arange(pw).view(1, 1, pw)).expand(K, ph, pw)
        k = torch.arange(K).view(K, 1, 1).expand(K, ph, pw)
        out[k, r, c] = v.permute(1, 3, 4, 0, 2)
        return out[:, Ph:Ph + H, Pw:Pw + W].permute(3, 0, 4, 1, 2)


def _align(g1: Geometry, v1, g2: Geometry, v2):
    """Pad two patch sets of the same rows to a common window."""
    if g1.S != g2.S:
        raise NotPatchable("patches with different strides meet")
    P = (max(g1.P[0], g2.P[0]), max(g1.P[1], g2.P[1]))
    end = (max(g1.size[0] - g1.P[0], g2.size[0] - g2.P[0]), max(g1.size[1] - g1.P[1], g2.size[1] - g2.P[1]))
    size = (end[0] + P[0], end[1] + P[1])

    def pad(g, v):
        top, left = P[0] - g.P[0], P[1] - g.P[1]
        return F.pad(v, (left, size[1] - g.size[1] - left, top, size[0] - g.size[0] - top))

    g = Geometry(g1.oi, g1.oj, g1.grid, g1.S, P, size)
    return g, pad(g1, v1), pad(g2, v2)


def _full(t, shape):
    """A constant broadcast to the full per-sample map, with a batch dim of 1 if it has none."""
    t = torch.as_tensor(t)
    if t.ndim <= len(shape):
        t = t.expand(*shape).unsqueeze(0)
    return t


def _can_step(graph, node, leaves) -> bool:
    """Whether ``node`` has a patch rule here (else its A is made dense)."""
    if len(node.shape) != 3:
        return False
    if node.op == "input":
        return isinstance(leaves[node.name], (Box, LpBall))
    if node.op == "conv":
        return node.params["weight"].ndim == 4
    if node.op == "affine":
        return tuple(node.params["in_shape"]) == tuple(node.shape)
    if node.op == "add":
        return all(tuple(s) == tuple(node.shape) for s in node.params["in_shapes"])
    return node.op in _STEP


def patchable(graph, start, leaves) -> bool:
    """Patch form pays off when the start is a feature map whose node has a patch rule."""
    return _can_step(graph, graph[start], leaves) and graph[start].op != "input"


# a window larger than this share of its map is cheaper as dense A
DENSE_SHARE = 0.5


def backward_bound_patches(graph, start, rows, bounds, leaves):
    """Bounds ``[B, K]`` of the neurons ``rows`` (flat indices) of ``start``, like
    ``crown.backward_bound`` with one-hot rows. A starts as patches and turns dense once a
    window covers more than ``DENSE_SHARE`` of its feature map."""
    from .crown import _accumulate, dense_step
    C, H, W = graph[start].shape
    ref = bounds[start].lower
    B, dtype = ref.shape[0], ref.dtype
    c = rows // (H * W)
    oi = (rows % (H * W)) // W
    oj = rows % W
    K = rows.numel()
    v = torch.zeros(B, K, C, 1, 1, dtype=dtype)
    v[:, torch.arange(K), c, 0, 0] = 1.0
    g = Geometry(oi, oj, (H, W), (1, 1), (0, 0), (1, 1))
    patches = {start: (g, v, v)}
    dense: dict = {}
    lower = upper = 0.0
    for name in reversed(graph.ancestors_order(start)):
        node = graph[name]
        if name in patches:
            g, vl, vu = patches.pop(name)
            if (name in dense or not _can_step(graph, node, leaves)
                    or g.size[0] * g.size[1] > DENSE_SHARE * node.shape[1] * node.shape[2]):
                _accumulate(dense, name, g.to_dense(vl, node.shape), g.to_dense(vu, node.shape))
            else:
                if node.op == "input":
                    lower = lower + _concretize(g, vl, leaves[name], upper=False)
                    upper = upper + _concretize(g, vu, leaves[name], upper=True)
                    continue
                outs, bl, bu = _STEP[node.op](graph, node, g, vl, vu, bounds)
                lower, upper = lower + bl, upper + bu
                for inp, (gi, al, au) in zip(node.inputs, outs):
                    if inp in dense:
                        _accumulate(dense, inp, gi.to_dense(al, graph[inp].shape),
                                    gi.to_dense(au, graph[inp].shape))
                    elif inp in patches:
                        g0, l0, u0 = patches[inp]
                        try:
                            gn, l0, al = _align(g0, l0, gi, al)
                            _, u0, au = _align(g0, u0, gi, au)
                            patches[inp] = (gn, l0 + al, u0 + au)
                        except NotPatchable:
                            shp = graph[inp].shape
                            del patches[inp]
                            _accumulate(dense, inp, g0.to_dense(l0, shp), g0.to_dense(u0, shp))
                            _accumulate(dense, inp, gi.to_dense(al, shp), gi.to_dense(au, shp))
                    else:
                        patches[inp] = (gi, al, au)
                continue
        if name not in dense:
            continue
        A_l, A_u = dense.pop(name)
        parts, bl, bu = dense_step(graph, node, A_l, A_u, bounds, leaves)
        lower, upper = lower + bl, upper + bu
        for inp, (al, au) in zip(node.inputs, parts):
            if inp in patches:  # meet a patch entry: make it dense
                g0, l0, u0 = patches.pop(inp)
                shp = graph[inp].shape
                _accumulate(dense, inp, g0.to_dense(l0, shp), g0.to_dense(u0, shp))
            _accumulate(dense, inp, al, au)
    return lower, upper


def _concretize(g, v, leaf, upper):
    box = leaf.interval()
    c = g.windows(box.center)
    Bk = v.flatten(2)
    mid = (Bk * c.flatten(2)).sum(-1)
    if isinstance(leaf, LpBall) and leaf.norm != math.inf:
        q = 2.0 if leaf.norm == 2.0 else math.inf
        cen = (Bk * g.windows(leaf.center).flatten(2)).sum(-1)
        dev = leaf._eps_t.view(-1, 1) * torch.linalg.vector_norm(Bk, ord=q, dim=-1)
        val = cen + dev if upper else cen - dev
        if leaf.clip is None:
            return val
    dev = (Bk.abs() * g.windows(box.radius).flatten(2)).sum(-1)
    boxval = mid + dev if upper else mid - dev
    if isinstance(leaf, LpBall) and leaf.norm != math.inf:
        return torch.minimum(val, boxval) if upper else torch.maximum(val, boxval)
    return boxval


def _tconv(x, W, stride, groups, dilation, out_size):
    """``conv_transpose2d(x, W)`` without padding, by the fastest route on CPU for its shape."""
    N, co, h, w = x.shape
    if groups == 1 and h * w == 1 and all(d == 1 for d in dilation):  # one position: a matmul
        return (x.reshape(N, co) @ W.reshape(co, -1)).reshape(N, *W.shape[1:])
    if groups == 1 and W.shape[1] <= 4:  # few input channels: columns, then scatter-add
        cols = (x.reshape(N, co, h * w).transpose(1, 2) @ W.reshape(co, -1)).transpose(1, 2)
        return F.fold(cols, out_size, W.shape[2:], dilation=dilation, stride=stride)
    return F.conv_transpose2d(x, W, None, stride=stride, groups=groups, dilation=dilation)


def _conv_step(graph, node, g, vl, vu, bounds):
    p = node.params
    Wt = p["weight"]
    B, K = vl.shape[:2]
    gi = g.back_through_conv(Wt.shape[2:], p["stride"], p["padding"], p["dilation"])
    _, Hin, Win = p["in_shape"]
    mask = g_mask = gi.mask(Hin, Win, vl.dtype)
    both = vl if vl is vu else torch.cat([vl, vu], 1)
    x = both.reshape(-1, *both.shape[2:])
    y = _tconv(x, Wt, p["stride"], p["groups"], p["dilation"], gi.size)
    y = y.reshape(B, both.shape[1], *y.shape[1:])
    bias = p.get("bias")
    if bias is not None:
        bb = (both.sum(dim=(-1, -2)) * bias).sum(-1)
    else:
        bb = torch.zeros(B, both.shape[1], dtype=vl.dtype)
    if vl is vu:
        y = y * mask
        return [(gi, y, y)], bb, bb
    ml = torch.cat([g_mask, g_mask], 1)
    y = y * ml
    return [(gi, y[:, :K], y[:, K:])], bb[:, :K], bb[:, K:]


def _affine_step(graph, node, g, vl, vu, bounds):
    p = node.params
    out = []
    bl = bu = 0.0
    w, b = p.get("w"), p.get("b")
    shape = node.shape
    if w is not None:
        ww = g.windows(_full(w, shape).to(vl.dtype).expand(vl.shape[0], *shape))
        nl, nu = vl * ww, (vu * ww if vu is not vl else None)
    else:
        nl, nu = vl, (vu if vu is not vl else None)
    if b is not None:
        bw = g.windows(_full(b, shape).to(vl.dtype).expand(vl.shape[0], *shape)).flatten(2)
        bl = (vl.flatten(2) * bw).sum(-1)
        bu = bl if vu is vl else (vu.flatten(2) * bw).sum(-1)
    out.append((g, nl, nl if nu is None else nu))
    return out, bl, bu


def _add_step(graph, node, g, vl, vu, bounds):
    outs = []
    for s in node.params["signs"]:
        if s > 0:
            outs.append((g, vl, vu))
        else:
            outs.append((g, -vl, -vu))
    return outs, 0.0, 0.0


def _act_step(graph, node, g, vl, vu, bounds):
    rule = RULES[node.op]
    x = bounds[node.inputs[0]]
    kl, bl, ku, bu = (g.windows(t) for t in rule.relax(node, x.lower, x.upper))

    def one(v, k_pos, k_neg, b_pos, b_neg):
        nv = torch.where(v >= 0, v * k_pos, v * k_neg)
        bias = (v.clamp(min=0) * b_pos).flatten(2).sum(-1) + (v.clamp(max=0) * b_neg).flatten(2).sum(-1)
        return nv, bias

    al, b_l = one(vl, kl, ku, bl, bu)
    au, b_u = one(vu, ku, kl, bu, bl)
    return [(g, al, au)], b_l, b_u


_STEP = {"conv": _conv_step, "affine": _affine_step, "add": _add_step, "relu": _act_step,
         "leaky_relu": _act_step, "sigmoid": _act_step, "tanh": _act_step}
