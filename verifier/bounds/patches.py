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

The backward interpreter (``verifier.bounds.backward``) keeps a node's A as patches while its
rule has a ``patch_step`` (conv, element-wise affine, add, activations) and the window stays
small; otherwise A turns dense. At the input, patches are concretized as they are (over windows
of the set's center and radius).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops import RULES
from ..perturbation import Box, LpBall, Zonotope


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
        return self.windows(lambda: torch.ones(1, 1, H, W, dtype=dtype, device=self.oi.device), ("mask", H, W, dtype))

    def to_dense(self, v: torch.Tensor, shape) -> torch.Tensor:
        """Patches ``v: [B, K, C, ph, pw]`` -> dense ``A: [B, K, C, H, W]`` (the entries of a
        window outside the map are zeros: they are added to position 0 harmlessly)."""
        B, K, C, ph, pw = v.shape
        _, H, W = shape
        (Sh, Sw), (Ph, Pw) = self.S, self.P
        r = (self.oi * Sh - Ph).view(K, 1, 1) + torch.arange(ph, device=v.device).view(1, ph, 1)
        c = (self.oj * Sw - Pw).view(K, 1, 1) + torch.arange(pw, device=v.device).view(1, 1, pw)
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


def can_step(node, leaves) -> bool:
    """Whether ``node``'s A can stay patches (its rule's ``patch_step``, or a leaf whose set
    ``concretize`` handles); else it is made dense."""
    if len(node.shape) != 3:
        return False
    if node.op == "input":
        leaf = leaves[node.name]
        return isinstance(leaf, (Box, LpBall)) or (isinstance(leaf, Zonotope)
                                                   and leaf.k <= ZONOTOPE_PATCH_K)
    return RULES[node.op].patchable(node)


def patchable(graph, start, leaves) -> bool:
    """Patch form pays off when the start is a feature map whose node has a patch rule."""
    return can_step(graph[start], leaves) and graph[start].op != "input"


# a zonotope leaf keeps patches up to this many generators (each is one more map whose windows
# are read; beyond, the dense A's one product with G is cheaper)
ZONOTOPE_PATCH_K = 8


# a window larger than this share of its map is cheaper as dense A (at the input: larger than
# the whole map)
DENSE_SHARE = 0.5


def stays_patch(node, g: Geometry) -> bool:
    area = g.size[0] * g.size[1]
    limit = node.shape[1] * node.shape[2]
    return area <= (limit if node.op == "input" else DENSE_SHARE * limit)


class Store:
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
        if ou is None or au is None:  # the lower bound only
            self.dense[name] = (nl, None)
            return
        self.dense[name] = (nl, nl if (ol is ou and al is au) else ou + au)

    def add_patch(self, name, g, al, au):
        if name in self.patches:
            g0, l0, u0 = self.patches[name]
            gc = _common(g0, g)
            if gc is not None:
                nl = _add_into(gc, [(g0, l0), (g, al)])
                if u0 is None or au is None:  # the lower bound only
                    nu = None
                else:
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
        return dl, (None if au is None else dl if au is al else g.to_dense(au, shape))


def start_patches(graph, start, rows, dtype, B, cache=None) -> "Store":
    """A store holding one-hot patches for the neurons ``rows`` (flat indices) of ``start``:
    the A of ``crown.backward_bound`` with one-hot rows, as 1x1 windows."""
    C, H, W = graph[start].shape
    K = rows.numel()
    v = torch.zeros(B, K, C, 1, 1, dtype=dtype, device=rows.device)
    v[:, torch.arange(K, device=rows.device), rows // (H * W), 0, 0] = 1.0
    store = Store(graph)
    g = Geometry((rows % (H * W)) // W, rows % W, (H, W), (1, 1), (0, 0), (1, 1), cache)
    store.patches[start] = (g, v, v)
    return store


def _concretize_zonotope(g, v, Z, name, upper):
    """``A·c ± ||G A||_q (+ |A|·slack)`` with A as patches: the windows of the center and of
    every generator map (cached per leaf)."""
    B, k = Z.center.shape[0], Z.k
    maps = [Z.center, Z.generators.reshape(B * k, *Z.center.shape[1:])]
    if Z.slack is not None:
        maps.append(Z.slack)
    win = g.windows(lambda: torch.cat(maps), ("zonotope", name)).flatten(2)   # [N, K, n_w]
    Bk = v.flatten(2)                                                         # [B, K, n_w]
    mid = (Bk * win[:B]).sum(-1)
    wG = win[B:B + B * k].view(B, k, *win.shape[1:])
    GA = torch.einsum("bKn,bjKn->bKj", Bk, wG)
    dev = torch.linalg.vector_norm(GA, ord=Z.dual, dim=-1)
    if Z.slack is not None:
        dev = dev + (Bk.abs() * win[B + B * k:]).sum(-1)
    return mid + dev if upper else mid - dev


def concretize(g, v, leaf, name, upper):
    """min (or max) of ``A·x`` over the set of the leaf ``name`` for patches ``v`` there."""
    if isinstance(leaf, Zonotope):
        return _concretize_zonotope(g, v, leaf, name, upper)
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
