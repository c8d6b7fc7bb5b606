"""CROWN for intermediate nodes of convolutional networks, with A stored as patches.

The bound of one neuron (c, i, j) of a convolutional node depends only on a window of each
earlier feature map (its receptive field). Dense ``A: [B, K, C, H, W]`` is mostly zeros there;
patches keep only the window: ``value: [B, K, C, ph, pw]`` whose top-left corner in the map
is ``(i·S - P, j·S - P)`` for row k at start position (i, j), with ``S`` the product of the
strides passed and ``P`` the accumulated padding. Going back through a convolution
(stride s, padding p, kernel k, dilation d) maps the window to
``ph' = (ph - 1)·s + d·(k - 1) + 1``, ``S' = S·s``, ``P' = P·s + p``; element-wise ops multiply
the window by the matching window of their slope maps. Positions outside the map (the
convolution's zero padding) are masked to 0, so a window holds zeros wherever it leaves its map.

Used by ``crown.backward_bound`` when every node between the start and the leaves has a patch
rule here (conv, element-wise affine, add, activations); otherwise the dense path runs. At the
input, patches are concretized as they are (over windows of the set's center and radius).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops import RULES
from ..ops.linear import fold_adjoint, folds_faster
from ..perturbation import Box, LpBall


@dataclass
class Geometry:
    """Where each row's window lies: rows k at start positions (oi[k], oj[k]) on a grid of
    ``grid`` positions; top-left = (oi·S - P); window size ``size``. ``cache``, shared by the
    geometries of one node's bounds (all its chunks of rows), keeps the windows of constant
    maps at every grid position."""
    oi: torch.Tensor
    oj: torch.Tensor
    grid: tuple
    S: tuple
    P: tuple
    size: tuple
    cache: dict | None = field(default=None, repr=False, compare=False)

    def back_through_conv(self, k, s, p, d):
        return Geometry(self.oi, self.oj, self.grid, (self.S[0] * s[0], self.S[1] * s[1]),
                        (self.P[0] * s[0] + p[0], self.P[1] * s[1] + p[1]),
                        ((self.size[0] - 1) * s[0] + d[0] * (k[0] - 1) + 1,
                         (self.size[1] - 1) * s[1] + d[1] * (k[1] - 1) + 1), self.cache)

    def _columns(self, T: torch.Tensor):
        """The windows of ``T: [N, C, H, W]`` at every grid position -> (``[N, L, C*ph*pw]``,
        positions per grid row)."""
        N, C, H, W = T.shape
        (ph, pw), (Sh, Sw), (Ph, Pw) = self.size, self.S, self.P
        Gh, Gw = self.grid
        bottom = max(0, (Gh - 1) * Sh - Ph + ph - H)
        right = max(0, (Gw - 1) * Sw - Pw + pw - W)
        Tp = F.pad(T, (Pw, right, Ph, bottom))
        cols = F.unfold(Tp, (ph, pw), stride=(Sh, Sw))            # [N, C*ph*pw, Lh*Lw]
        return cols.transpose(1, 2), (Tp.shape[3] - pw) // Sw + 1

    def windows(self, T, key=None) -> torch.Tensor:
        """Windows of maps ``T: [N, C, H, W]`` for every row -> ``[N, K, C, ph, pw]`` (zeros
        outside the map). With a ``key`` naming a constant map, ``T`` may be a function that
        makes it, called only when the cache does not hold its windows yet."""
        ck = None if key is None or self.cache is None else (key, self.size, self.S, self.P)
        if ck is not None and ck in self.cache:
            cols, Lw = self.cache[ck]
        else:
            cols, Lw = self._columns(T() if callable(T) else T)
            if ck is not None:
                self.cache[ck] = cols, Lw
        K = self.oi.numel()
        return cols[:, self.oi * Lw + self.oj].view(cols.shape[0], K, -1, *self.size)

    def mask(self, H, W, dtype):
        """1 inside the map, 0 outside: ``[1, K, 1, ph, pw]``."""
        return self.windows(lambda: torch.ones(1, 1, H, W, dtype=dtype), ("mask", H, W, dtype))

    def to_dense(self, v: torch.Tensor, shape) -> torch.Tensor:
        """Patches ``v: [B, K, C, ph, pw]`` -> dense ``A: [B, K, C, H, W]`` (the entries of a
        window outside the map are zeros: they are added to position 0 harmlessly)."""
        B, K, C, ph, pw = v.shape
        _, H, W = shape
        (Sh, Sw), (Ph, Pw) = self.S, self.P
        r = (self.oi * Sh - Ph).view(K, 1, 1) + torch.arange(ph).view(1, ph, 1)
        c = (self.oj * Sw - Pw).view(K, 1, 1) + torch.arange(pw).view(1, 1, pw)
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        idx = torch.where(inside, r * W + c, 0).view(1, K, 1, ph * pw)
        out = v.new_zeros(B, K, C, H * W)
        out.scatter_add_(3, idx.expand(B, K, C, ph * pw), v.reshape(B, K, C, ph * pw))
        return out.view(B, K, C, H, W)


def _common(g1: Geometry, g2: Geometry) -> Geometry | None:
    """The smallest window holding both (same rows); None for different strides."""
    if g1.S != g2.S:
        return None
    P = (max(g1.P[0], g2.P[0]), max(g1.P[1], g2.P[1]))
    end = (max(g1.size[0] - g1.P[0], g2.size[0] - g2.P[0]),
           max(g1.size[1] - g1.P[1], g2.size[1] - g2.P[1]))
    return Geometry(g1.oi, g1.oj, g1.grid, g1.S, P, (end[0] + P[0], end[1] + P[1]), g1.cache)


def _add_into(g: Geometry, parts) -> torch.Tensor:
    """Sum of patches ``[(geometry, value), ...]`` whose windows lie inside ``g``'s."""
    v0 = parts[0][1]
    out = v0.new_zeros(*v0.shape[:3], *g.size)
    for gx, v in parts:
        top, left = g.P[0] - gx.P[0], g.P[1] - gx.P[1]
        out[..., top:top + gx.size[0], left:left + gx.size[1]] += v
    return out


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


# a window larger than this share of its map is cheaper as dense A (at the input: larger than
# the whole map)
DENSE_SHARE = 0.5


def _stays_patch(node, g: Geometry) -> bool:
    area = g.size[0] * g.size[1]
    limit = node.shape[1] * node.shape[2]
    return area <= (limit if node.op == "input" else DENSE_SHARE * limit)


class _Store:
    """The A of each node reached so far: patches ``(geometry, A_l, A_u)`` or dense
    ``(A_l, A_u)``; a node whose A arrives in both forms (or as patches of different strides)
    is made dense."""

    def __init__(self, graph):
        self.graph = graph
        self.patches: dict = {}
        self.dense: dict = {}

    def add_dense(self, name, al, au):
        if name in self.patches:
            self.densify(name)
        if name not in self.dense:
            self.dense[name] = (al, au)
            return
        ol, ou = self.dense[name]
        nl = ol + al
        self.dense[name] = (nl, nl if (ol is ou and al is au) else ou + au)

    def add_patch(self, name, g, al, au):
        if name in self.patches:
            g0, l0, u0 = self.patches[name]
            gc = _common(g0, g)
            if gc is not None:
                nl = _add_into(gc, [(g0, l0), (g, al)])
                nu = nl if (l0 is u0 and al is au) else _add_into(gc, [(g0, u0), (g, au)])
                self.patches[name] = (gc, nl, nu)
                return
            self.densify(name)
        if name in self.dense:
            self.add_dense(name, *self._dense_pair(name, g, al, au))
        else:
            self.patches[name] = (g, al, au)

    def densify(self, name):
        g, al, au = self.patches.pop(name)
        self.add_dense(name, *self._dense_pair(name, g, al, au))

    def _dense_pair(self, name, g, al, au):
        shape = self.graph[name].shape
        dl = g.to_dense(al, shape)
        return dl, (dl if au is al else g.to_dense(au, shape))


def backward_bound_patches(graph, start, rows, bounds, leaves, cache=None):
    """Bounds ``[B, K]`` of the neurons ``rows`` (flat indices) of ``start``, like
    ``crown.backward_bound`` with one-hot rows. A starts as patches and turns dense once a
    window covers more than ``DENSE_SHARE`` of its feature map. ``cache``: a dict shared by the
    calls for chunks of rows of the same start and bounds (windows of constant maps)."""
    from .crown import dense_step
    C, H, W = graph[start].shape
    ref = bounds[start].lower
    B, dtype = ref.shape[0], ref.dtype
    K = rows.numel()
    v = torch.zeros(B, K, C, 1, 1, dtype=dtype)
    v[:, torch.arange(K), rows // (H * W), 0, 0] = 1.0
    store = _Store(graph)
    g = Geometry((rows % (H * W)) // W, rows % W, (H, W), (1, 1), (0, 0), (1, 1), cache)
    store.patches[start] = (g, v, v)
    lower = upper = 0.0
    for name in reversed(graph.ancestors_order(start)):
        node = graph[name]
        if name in store.patches and not (_can_step(graph, node, leaves)
                                          and _stays_patch(node, store.patches[name][0])):
            store.densify(name)
        if name in store.patches:
            g, vl, vu = store.patches.pop(name)
            if node.op == "input":
                lower = lower + _concretize(g, vl, leaves[name], name, upper=False)
                upper = upper + _concretize(g, vu, leaves[name], name, upper=True)
                continue
            outs, bl, bu = _STEP[node.op](graph, node, g, vl, vu, bounds)
            lower, upper = lower + bl, upper + bu
            for inp, (gi, al, au) in zip(node.inputs, outs):
                store.add_patch(inp, gi, al, au)
        elif name in store.dense:
            A_l, A_u = store.dense.pop(name)
            parts, bl, bu = dense_step(graph, node, A_l, A_u, bounds, leaves)
            lower, upper = lower + bl, upper + bu
            for inp, (al, au) in zip(node.inputs, parts):
                if al is not None:  # None: the rule concretized that input itself
                    store.add_dense(inp, al, au)
    return lower, upper


def _concretize(g, v, leaf, name, upper):
    """min (or max) of ``A·x`` over the set of the leaf ``name`` for patches ``v`` there."""
    box = leaf.interval()
    ball = isinstance(leaf, LpBall) and leaf.norm != math.inf
    maps = [box.center, box.radius] + ([leaf.center] if ball else [])
    B = max(t.shape[0] for t in maps)
    win = g.windows(lambda: torch.cat([t.expand(B, *t.shape[1:]) for t in maps]),
                    ("input", name)).flatten(2)
    Bk = v.flatten(2)
    mid = (Bk * win[:B]).sum(-1)
    dev = (Bk.abs().mul_(win[B:2 * B])).sum(-1)
    boxval = mid + dev if upper else mid - dev
    if not ball:
        return boxval
    q = 2.0 if leaf.norm == 2.0 else math.inf
    cen = (Bk * win[2 * B:]).sum(-1)
    dev = leaf._eps_t.view(-1, 1) * torch.linalg.vector_norm(Bk, ord=q, dim=-1)
    val = cen + dev if upper else cen - dev
    if leaf.clip is None:
        return val
    return torch.minimum(val, boxval) if upper else torch.maximum(val, boxval)


def _tconv(x, W, stride, groups, dilation, out_size):
    """``conv_transpose2d(x, W)`` without padding, by the fastest route on CPU for its shape."""
    N, co, h, w = x.shape
    if groups == 1 and h * w == 1 and all(d == 1 for d in dilation):  # one position: a matmul
        return (x.reshape(N, co) @ W.reshape(co, -1)).reshape(N, *W.shape[1:])
    if any(s > 1 for s in stride) and folds_faster(W, groups, N):  # columns, then scatter-add
        return fold_adjoint(x, W, out_size, stride, dilation=dilation)
    return F.conv_transpose2d(x, W, None, stride=stride, groups=groups, dilation=dilation)


def _conv_step(graph, node, g, vl, vu, bounds):
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


def _affine_step(graph, node, g, vl, vu, bounds):
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


def _add_step(graph, node, g, vl, vu, bounds):
    outs = []
    for s in node.params["signs"]:
        if s > 0:
            outs.append((g, vl, vu))
        else:
            nl = -vl
            outs.append((g, nl, nl if vu is vl else -vu))
    return outs, 0.0, 0.0


def _act_step(graph, node, g, vl, vu, bounds):
    """Entries of A >= 0 take the lower line for the lower bound and the upper line for the
    upper bound, the others the opposite line (as ``ElementwiseRelaxation.backward``)."""
    rule = RULES[node.op]
    x = bounds[node.inputs[0]]
    kl, bl, ku, bu = rule.relaxation(node, x)
    B = kl.shape[0]
    maps = [kl, ku, bu] + ([bl] if rule.has_lower_bias else [])
    win = g.windows(lambda: torch.cat(maps), ("relax", node.name)).split(B)
    kl, ku, bu = win[:3]
    bl = win[3] if rule.has_lower_bias else None

    def one(v, k_pos, k_neg, b_pos, b_neg):
        """v- k_neg + v+ k_pos (exact: one of the two products is 0), with one scratch buffer."""
        part = v.clamp(max=0)
        nv = part * k_neg
        bias = 0.0
        if b_neg is not None:
            bias = part.mul_(b_neg).flatten(2).sum(-1)
        part = torch.clamp(v, min=0, out=part)
        nv.addcmul_(part, k_pos)
        if b_pos is not None:
            bias = bias + part.mul_(b_pos).flatten(2).sum(-1)
        return nv, bias

    al, b_l = one(vl, kl, ku, bl, bu)
    au, b_u = one(vu, ku, kl, bu, bl)
    return [(g, al, au)], b_l, b_u


_STEP = {"conv": _conv_step, "affine": _affine_step, "add": _add_step, "relu": _act_step,
         "leaky_relu": _act_step, "sigmoid": _act_step, "tanh": _act_step}
