"""Products of two perturbed tensors ``z = einsum(equation, X, Y)``: ``torch.matmul`` / ``@`` /
``bmm`` / ``einsum`` of two perturbed operands (attention's ``Q K^T`` and ``attn V``), relaxed
term by term with McCormick planes. The element-wise product (``mul``) shares the planes.

Each output element is a sum of terms ``x·y``, one element of X times one of Y, over the box
``[lx, ux] x [ly, uy]``. The plane through a corner ``(cx, cy)`` of the box,
``P(cx, cy) = cy x + cx y - cx cy``, satisfies ``x y - P = (x - cx)(y - cy)``, so on the box

    x y >= P(lx, ly), P(ux, uy)        (the two lower planes)
    x y <= P(lx, uy), P(ux, ly)        (the two upper planes)

and so does every convex combination of the two lower (two upper) planes: ``(1 - m) P(lx, ly)
+ m P(ux, uy)`` with ``m`` in [0, 1]. When every term of one output element takes the same
planes, with the same weights, the relaxation of z is itself made of einsums: with weights
``w_c`` on the corners ``c`` (per spec row and output element), the x-coefficient of a term is
``sum_c w_c cy``, its y-coefficient ``sum_c w_c cx`` and its constant ``-sum_c w_c cx cy``, so
the A of X is the adjoint of ``X -> einsum(X, LY)`` applied to ``w_ll + w_ul`` plus that of
``X -> einsum(X, UY)`` applied to ``w_uu + w_lu``, and so on: no tensor of all the terms of all
the spec rows is ever formed.

In the backward pass, positive entries of A take the lower planes for the lower bound and the
upper planes for the upper bound (negative entries the other ones). The mix ``m`` of the lower
planes and that of the upper planes are free per spec row and output element (alpha-CROWN:
``alpha_init`` gives ``[2, B, S, *out]`` in [0, 1]); CROWN's choice, and alpha's start, is
``m`` in {0, 1} per output element (``corner_mix``): of each pair, the plane whose coefficients
move least over the box (``m = 0``, ``P(lx, ly)`` below and ``P(lx, uy)`` above, on ties).
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass

import torch

from ..shapes import broadcast_shapes
from ..bound_types import Interval
from .base import BoundRule, NotSupported, register, unbroadcast

# the interval of an einsum is exact term by term (its terms formed) up to this many elements of
# all the terms of the batch; past it, two cheaper bounds of einsums are intersected
EXACT_TERMS = 2 ** 21
# CROWN picks each output element's planes by ``corner_mix`` (False: P(lx, ly) and P(lx, uy))
CROWN_MIX = True


def mccormick_step(A: torch.Tensor, upper: bool, mix, x: Interval, y: Interval, prod, adj_x,
                   adj_y):
    """One bound direction of the McCormick relaxation of a bilinear map ``z = prod(X, Y)``:
    -> (A of X, A of Y, bias ``[B, S]``) with ``A·z >= A_x·X + A_y·Y + bias`` (the upper bound:
    ``<=``) on the box. ``prod(a, b)``: the map on two operands' tensors ``[B, *in] -> [B,
    *out]``; ``adj_x(w, t)``: the A of X for the linear map ``X -> prod(X, t)`` and the A ``w``
    of z (``adj_y`` likewise). ``mix``: None (CROWN's planes) or ``(m_lower, m_upper)``, each
    broadcastable to A and in [0, 1].

    For the lower bound the positive part of A takes the lower planes, ``(1 - m) P(lx, ly) +
    m P(ux, uy)``, and the negative part the upper ones, ``(1 - m') P(lx, uy) + m' P(ux, ly)``
    (the reverse for the upper bound). Writing ``WL`` for the part on the lower planes, ``a1 =
    WL m``, ``a2 = (A - WL) m'``, the corner weights are ``w_ll = WL - a1``, ``w_uu = a1``,
    ``w_lu = A - WL - a2``, ``w_ul = a2``, and with ``wx = ux - lx``, ``wy = uy - ly`` the sums
    ``sum_c w_c cy``, ``sum_c w_c cx``, ``sum_c w_c cx cy`` become

        A_x = adj_x(A, uy) - adj_x(WL - a1 + a2, wy)
        A_y = adj_y(A, lx) + adj_y(a1 + a2, wx)
        bias = -[A·prod(lx, uy) - WL·prod(lx, wy) + a1·(prod(ux, uy) - prod(lx, ly))
                 + a2·(prod(ux, ly) - prod(lx, uy))]

    (two adjoints and two dot products of A's size for CROWN's planes, four of each with a mix)."""
    lx, ux, ly, uy = x.lower, x.upper, y.lower, y.upper
    wx, wy = ux - lx, uy - ly
    WL = A.clamp(max=0) if upper else A.clamp(min=0)
    bias = _dot(WL, prod(lx, wy)) - _dot(A, prod(lx, uy))
    # in place where autograd tracks none of the tensors (those written are A's size)
    inplace = not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (A, lx, ux, ly, uy, *(() if mix is None else mix))))
    if mix is None:
        u, t = WL, None
    else:
        a1 = WL * mix[0]
        a2 = (A - WL).mul_(mix[1]) if inplace else (A - WL) * mix[1]
        bias = bias - _dot(a1, prod(ux, uy) - prod(lx, ly)) - _dot(a2, prod(ux, ly) - prod(lx, uy))
        if inplace:
            u = WL.sub_(a1).add_(a2)
            t = a1.add_(a2)
        else:
            u, t = WL - a1 + a2, a1 + a2
        del a1, a2
    del WL
    a_x, d = adj_x(A, uy), adj_x(u, wy)
    del u
    a_x = a_x.sub_(d) if inplace else a_x - d
    del d
    a_y = adj_y(A, lx)
    if t is not None:
        d = adj_y(t, wx)
        a_y = a_y.add_(d) if inplace else a_y + d
    return a_x, a_y, bias


def mccormick_backward(A_lower, A_upper, alpha, x: Interval, y: Interval, prod, adj_x, adj_y,
                       sx, sy):
    """A rule's whole backward step from ``mccormick_step`` for both bounds (``alpha``: the
    plane mixes for the lower and the upper bound, or None), each input's A summed down to its
    shape (``sx``, ``sy``): -> ([(A_l, A_u) of x, of y], bias_l, bias_u)."""
    out = []
    for A, upper, k in ((A_lower, False, 0), (A_upper, True, 1)):
        a_x, a_y, b = mccormick_step(A, upper, None if alpha is None else alpha[k], x, y, prod,
                                     adj_x, adj_y)
        out.append((unbroadcast(a_x, sx), unbroadcast(a_y, sy), b))
    (axl, ayl, bl), (axu, ayu, bu) = out
    return [(axl, axu), (ayl, ayu)], bl, bu


def corner_mix(x: Interval, y: Interval, prod) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CROWN's choice of planes, per output element: of the two lower planes, the one whose
    coefficients move least over the box, ``P(ux, uy)`` (mix 1) where ``prod(wx, |uy|) +
    prod(|ux|, wy) < prod(wx, |ly|) + prod(|lx|, wy)``, else ``P(lx, ly)`` (0); of the upper
    ones, ``P(ux, ly)`` (1) where ``prod(wx, |ly|) + prod(|ux|, wy) < prod(wx, |uy|) +
    prod(|lx|, wy)``, else ``P(lx, uy)`` (0). -> (mix of the lower planes, of the upper ones)
    ``[B, *out]`` in {0, 1}, or None where every element takes mix 0.

    Every plane of the pair is sound; the cost is a proxy for how much the line's own variation
    over the box adds (an adaptive choice, as CROWN's ReLU slope). In a LayerNorm's ``c * r``
    (``r = 1 / sqrt(var) > 0`` in a narrow box, ``c`` straddling 0) it takes ``P(lc, lr)``
    below and ``P(uc, lr)`` above: both lines have the coefficient ``lr`` on ``c`` and differ
    only on ``r`` (the fixed choice shares ``lc`` on ``r`` and differs on ``c``). On
    ``vit_tiny`` box 2 the worst CROWN margin bound goes from -25.5 to -8.6 with this choice in
    the LayerNorms' products alone, -8.1 with the attention products too. NaN costs (``0 *
    inf`` at an infinite end) keep mix 0."""
    wx, wy = x.upper - x.lower, y.upper - y.lower
    alx, aux, aly, auy = x.lower.abs(), x.upper.abs(), y.lower.abs(), y.upper.abs()
    # differences of the costs: wx (|uy| - |ly|) + (|ux| - |lx|) wy, wx (|ly| - |uy|) + ...
    dy, dx = auy - aly, aux - alx
    lower = prod(wx, dy) + prod(dx, wy) < 0
    upper = prod(wx, -dy) + prod(dx, wy) < 0
    if not bool(lower.any() or upper.any()):
        return None
    dt = x.lower.dtype
    return lower.to(dt), upper.to(dt)


def crown_alpha(x: Interval, y: Interval, prod):
    """``backward``'s ``alpha`` for CROWN's own planes (``corner_mix``'s, the same for the lower
    and the upper bound, broadcast over the spec rows), or None (mix 0 everywhere, or
    ``CROWN_MIX`` off)."""
    mix = corner_mix(x, y, prod) if CROWN_MIX else None
    if mix is None:
        return None
    m = (mix[0].unsqueeze(1), mix[1].unsqueeze(1))
    return (m, m)


def mix_init(x: Interval, y: Interval, prod, B: int, S: int, shape, dtype):
    """``alpha_init`` of a product: CROWN's mixes (``crown_alpha``) as ``[2, B, S, *shape]``,
    with the range [0, 1]; None where no plane can move (``free_corners``)."""
    if not free_corners(x, y):
        return None
    a = crown_alpha(x, y, prod)
    if a is None:
        return torch.zeros((), dtype=dtype, device=x.lower.device).expand(2, B, S, *shape), 0.0, 1.0
    init = torch.stack(a[0]).to(dtype).expand(2, B, S, *shape)
    return init, 0.0, 1.0


def _dot(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_o w[b, s, o] t[b?, o]`` -> ``[B, S]`` (``t``'s batch may be 1)."""
    return torch.einsum("bso,bo->bs", w.flatten(2), t.flatten(1))


def free_corners(x: Interval, y: Interval) -> bool:
    """Whether the planes of a pair of corners can differ somewhere: some x and some y with a
    non-degenerate interval (else every mix gives the same relaxation)."""
    return bool((x.upper > x.lower).any()) and bool((y.upper > y.lower).any())


@dataclass(frozen=True)
class Plan:
    """The einsums of one per-sample equation ``xs,ys->out`` with a batch letter ``b`` (and a
    spec-row letter ``s`` for the A tensors)."""

    xs: str
    ys: str
    out: str
    forward: str      # "bxs,bys->bout"
    adj_x: str        # "bsout,bys->bsxk": the A of X (xk: X's letters also in out or Y)
    adj_y: str
    dot: str          # "bsout,bout->bs"
    x_only: tuple     # positions in xs of the letters neither in out nor in Y
    y_only: tuple
    letters: str      # batch letter, then every letter once (the terms' dims)


@functools.lru_cache(maxsize=256)
def plan(equation: str) -> Plan:
    ins, out = equation.replace(" ", "").split("->")
    xs, ys = ins.split(",")
    used = set(xs + ys + out)
    b, s = [c for c in string.ascii_letters if c not in used][:2]
    xk = "".join(c for c in xs if c in out or c in ys)
    yk = "".join(c for c in ys if c in out or c in xs)
    x_only = tuple(i for i, c in enumerate(xs) if c not in xk)
    y_only = tuple(i for i, c in enumerate(ys) if c not in yk)
    letters = b + xs + "".join(c for c in ys if c not in xs)
    return Plan(xs, ys, out, f"{b}{xs},{b}{ys}->{b}{out}", f"{b}{s}{out},{b}{ys}->{b}{s}{xk}",
                f"{b}{s}{out},{b}{xs}->{b}{s}{yk}", f"{b}{s}{out},{b}{out}->{b}{s}", x_only, y_only,
                letters)


def check_equation(equation: str, x_shape, y_shape) -> str | None:
    """Why a per-sample equation cannot be a node of the ``einsum`` rule (None: it can)."""
    try:
        ins, out = equation.split("->")
        xs, ys = ins.split(",")
    except ValueError:
        return f"einsum equation {equation!r}: need two operands and an explicit output"
    if not all(c in string.ascii_letters for c in xs + ys + out):
        return f"einsum equation {equation!r}: letters only"
    if len(xs) != len(x_shape) or len(ys) != len(y_shape):
        return f"einsum equation {equation!r} does not match the shapes {list(x_shape)}, {list(y_shape)}"
    for t in (xs, ys, out):
        if len(set(t)) != len(t):
            return f"einsum equation {equation!r} repeats an index within one operand (a diagonal)"
    if any(c not in xs + ys for c in out):
        return f"einsum equation {equation!r}: an output index in no operand"
    if len(set(xs + ys + out)) > len(string.ascii_letters) - 2:
        return f"einsum equation {equation!r} uses too many indices"
    return None


def domain_norm_bound(ctx, name: str, batch_dims: list[int]) -> float:
    """``N >= sup_{x in D} max_b ||v_b(x)||_F`` for node ``name``'s value ``v`` split into
    slices ``v_b`` by the per-sample dims ``batch_dims`` (``ctx``: see ``BoundRule.lipschitz_on``):
    per slice the smaller of (1) ``||v_b(c)||_F + L_v R`` (``||v(x) - v(c)|| <= L_v ||x - c||
    <= L_v R`` and a slice's norm is at most the whole's), (2) the Frobenius norm of the
    element-wise ``max(|lower|, |upper|)`` of the node's interval on D and (3) ``ctx.N[name]``
    (the whole tensor's norm bound, composed by the rules' ``norm_on``)."""
    c = ctx.center[name][0].double()
    iv = ctx.box[name]
    m = torch.maximum(iv.lower[0].abs(), iv.upper[0].abs()).double()
    rest = [d for d in range(c.ndim) if d not in batch_dims]
    nb = math.prod(c.shape[d] for d in batch_dims)

    def per_slice(t):
        return t.permute(*batch_dims, *rest).reshape(nb, -1).norm(dim=1)

    Lv = ctx.L[name]
    by_center = per_slice(c) + (Lv * ctx.radius if Lv else 0.0)
    return min(float(torch.minimum(by_center, per_slice(m)).max()), ctx.N[name])


def _with_only(t: torch.Tensor, only: tuple, shape) -> torch.Tensor:
    """The A of an operand from the adjoint einsum, which lacks the operand's own summed-out
    letters (``only``: their positions): the same coefficient along them."""
    for p in only:
        t = t.unsqueeze(2 + p)
    if only:
        t = t.expand(*t.shape[:2], *[shape[i] if i in only else t.shape[2 + i]
                                     for i in range(len(shape))]).contiguous()
    return t


def _align(t: torch.Tensor, letters_t: str, letters: str) -> torch.Tensor:
    """``t`` (dims named by ``letters_t``) permuted into the order of ``letters``, with a dim of
    size 1 for each letter it lacks."""
    order = sorted(range(len(letters_t)), key=lambda i: letters.index(letters_t[i]))
    t = t.permute(order)
    shape, k = [], 0
    for c in letters:
        if c in letters_t:
            shape.append(t.shape[k])
            k += 1
        else:
            shape.append(1)
    return t.reshape(shape)


def _knapsack(la: torch.Tensor, ua: torch.Tensor, c: torch.Tensor, largest: bool) -> torch.Tensor:
    """``max`` (``largest``) or ``min`` of ``sum_j a_j c_j`` over ``la <= a <= ua``,
    ``sum_j a = 1`` (last dim): from ``a = la``, the rest of the mass goes to the largest (or
    least) ``c_j`` first, each up to ``ua_j`` (a fractional knapsack: exact). NaN where the
    constraints are infeasible."""
    order = torch.sort(c, dim=-1, descending=largest).indices
    cs = torch.gather(c, -1, order)
    w = torch.gather((ua - la).clamp(min=0), -1, order)
    rest = 1 - la.sum(-1, keepdim=True)
    before = torch.cumsum(w, -1) - w
    add = torch.minimum((rest - before).clamp(min=0), w)
    val = (la * c).sum(-1) + (add * cs).sum(-1)
    ok = (rest.squeeze(-1) >= 0) & (w.sum(-1) >= rest.squeeze(-1))
    return torch.where(ok, val, torch.full_like(val, math.nan))


def simplex_interval(a: Interval, v: Interval) -> Interval:
    """The range of ``out[..., i, k] = sum_j a[..., i, j] v[..., j, k]`` where each row of ``a``
    is a probability vector (``a >= 0``, ``sum_j a = 1``: softmax weights) within its bounds and
    ``v`` within its box: for ``a >= 0`` the extremes take ``v`` at its ends, then a knapsack
    over ``a`` (exact for the box and the simplex). The sum may miss 1 by rounding: the bounds
    are widened by ``|c|`` times a few ulps. Where the bounds are inconsistent, +-inf (no
    information)."""
    la = a.lower.clamp(min=0).double().unsqueeze(-2)          # [..., i, 1, j]
    ua = a.upper.clamp(max=1).double().unsqueeze(-2)
    lv = v.lower.double().transpose(-1, -2).unsqueeze(-3)     # [..., 1, k, j]
    uv = v.upper.double().transpose(-1, -2).unsqueeze(-3)
    shape = broadcast_shapes(la.shape, lv.shape)
    la, ua = la.expand(shape), ua.expand(shape)
    hi = _knapsack(la, ua, uv.expand(shape), True)
    lo = _knapsack(la, ua, lv.expand(shape), False)
    dt = a.lower.dtype
    tol = 64 * torch.finfo(dt).eps * (1 + torch.maximum(lv.abs(), uv.abs()).amax(-1))
    lo = torch.nan_to_num(lo - tol, nan=-math.inf)
    hi = torch.nan_to_num(hi + tol, nan=math.inf)
    return Interval(lo.to(dt), hi.to(dt))


def simplex_shift(A: torch.Tensor, a: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """``A·a = (A - lam)·a + sum lam`` for weights ``a`` whose rows (last dim) sum to 1, any
    ``lam`` per row: -> (``A - lam``, ``sum lam: [B, S]``). ``A: [B, S, *a_shape]``. The lines
    of ``a`` that bound ``(A - lam)·a`` are each off by up to ``|A_j - lam|`` times their gap,
    so ``lam`` is the median of the row's ``A_j`` weighted by the widths of ``a_j`` (the least
    ``sum_j |A_j - lam| (ua_j - la_j)``): a row's coefficients shared by every ``a_j`` (e.g. a
    value ``v`` common to all tokens of ``softmax @ V``) then meet no relaxation at all."""
    w = (a.upper - a.lower).clamp(min=0).to(A.dtype)
    w = w + 1e-6 * w.amax(-1, keepdim=True) + torch.finfo(A.dtype).tiny   # no all-zero rows
    w = w.unsqueeze(1).expand_as(A)
    vals, order = torch.sort(A, dim=-1)
    cw = torch.cumsum(torch.gather(w, -1, order), -1)
    k = torch.searchsorted(cw.contiguous(), cw[..., -1:].contiguous() / 2).clamp(max=A.shape[-1] - 1)
    lam = torch.gather(vals, -1, k)
    return A - lam, lam.flatten(2).sum(-1)


@register("einsum")
class Einsum(BoundRule):
    """``z = einsum(equation, X, Y)`` per sample (params ``equation``, e.g. ``"hij,hkj->hik"``,
    over the per-sample dims; ``in_shapes``: the operands' shapes, whose dims of size 1 broadcast
    as in torch.einsum), relaxed by McCormick planes (see the module doc). ``simplex``: X is a
    softmax over its last dim and the product is ``X @ Y`` (attention's ``weights @ values``):
    the interval is also intersected with ``simplex_interval``."""

    needs_bounds = True
    operand_widths = True

    def lipschitz(self, node, Ls):
        raise NotSupported(self.op, "lipschitz",
                           "a product of two perturbed tensors has no global Lipschitz constant")

    def deviation(self, node, centers, devs):
        raise NotSupported(self.op, "deviation", "a product of two perturbed tensors")

    def _operand_norms(self, node, ctx) -> tuple[float, float, str]:
        """``(N_X, N_Y, how)``: bounds on ``sup_{D, b} ||X_b||_2`` and ``||Y_b||_2`` (see
        ``lipschitz_on``)."""
        xn, yn = node.inputs
        p = plan(node.params["equation"])
        sx, sy = node.params["in_shapes"]
        size = {}
        for letters, shp in ((p.xs, sx), (p.ys, sy)):
            for c, n in zip(letters, shp):
                if size.setdefault(c, n) != n:
                    raise NotSupported(self.op, "lipschitz",
                                       f"einsum {p.xs},{p.ys}: letter {c!r} broadcasts")
        if p.x_only or p.y_only:
            raise NotSupported(self.op, "lipschitz",
                               f"einsum {p.xs},{p.ys}->{p.out} sums a letter within one operand")
        batch = [c for c in p.xs if c in p.ys and c in p.out]
        nx = domain_norm_bound(ctx, xn, [p.xs.index(c) for c in batch])
        ny = domain_norm_bound(ctx, yn, [p.ys.index(c) for c in batch])
        x_free = [c for c in p.xs if c in p.out and c not in p.ys]
        how = "product on the domain: L_X N_Y + N_X L_Y"
        if node.params.get("simplex") and len(x_free) == 1 and p.xs[-1] not in p.out:
            up = ctx.box[xn].upper[0].double().clamp(min=0, max=1)   # [*sx]
            col = up.sum(dim=p.xs.index(x_free[0]))                   # sums over the rows i
            nx = min(nx, math.sqrt(max(float(col.max()), 0.0)))
            how += " (softmax rows: ||X_b||_2 <= sqrt(max column sum))"
        return nx, ny, how

    def lipschitz_on(self, node, ctx):
        """On a domain D: per index ``b`` of the letters shared by X, Y and the output, the
        product is a matrix product ``Z_b = X_b Y_b`` (rows: X's own output letters, columns:
        Y's, inner: the contracted letters), and ``Z_b - Z'_b = (X_b - X'_b) Y_b + X'_b (Y_b -
        Y'_b)``, so ``||Z_b - Z'_b||_F <= ||dX_b||_F ||Y_b||_2 + ||X'_b||_2 ||dY_b||_F``; summing
        over b (Minkowski) with ``N_X >= sup_{D, b} ||X_b||_2`` (likewise N_Y):
        ``L_Z = L_X N_Y + N_X L_Y``. ``N`` from ``domain_norm_bound`` (Frobenius), and for
        softmax weights X (``simplex``; rows on the contracted last letter are probability
        vectors) also ``||X_b||_2 <= sqrt(||X_b||_1 ||X_b||_inf) = sqrt(max_j sum_i X_ij)``
        with ``X_ij <= min(1, upper_ij)``. Broadcast letters and letters summed within one
        operand are not supported here."""
        nx, ny, how = self._operand_norms(node, ctx)
        Lx, Ly = ctx.L[node.inputs[0]], ctx.L[node.inputs[1]]
        L = (Lx * ny if Lx else 0.0) + (nx * Ly if Ly else 0.0)
        return L, max(nx, ny), how

    def norm_on(self, node, ctx):
        """``||Z||_F^2 = sum_b ||X_b Y_b||_F^2 <= max_b ||X_b||_2^2 ||Y||_F^2`` (and the same
        with X and Y swapped)."""
        nx, ny, _ = self._operand_norms(node, ctx)
        xn, yn = node.inputs
        return min(nx * ctx.N[yn], ny * ctx.N[xn])

    def point(self, node, inputs):
        x, y = inputs
        return torch.einsum(plan(node.params["equation"]).forward, x, y)

    def interval(self, node, inputs):
        x, y = inputs
        p = plan(node.params["equation"])
        sizes = {}
        for t, letters in ((x.lower, p.letters[0] + p.xs), (y.lower, p.letters[0] + p.ys)):
            for c, n in zip(letters, t.shape):
                sizes[c] = max(sizes.get(c, 1), n)
        if math.prod(sizes.values()) <= EXACT_TERMS:
            iv = self._exact_interval(p, x, y)
        else:
            iv = self._factored_interval(p, x, y)
        if node.params.get("simplex"):
            iv = iv.intersect(simplex_interval(x, y))
        return iv

    def _exact_interval(self, p: Plan, x: Interval, y: Interval) -> Interval:
        """Each term's exact range (the least and the greatest corner product), summed."""
        b = p.letters[0]
        lx, ux = (_align(t, b + p.xs, p.letters) for t in (x.lower, x.upper))
        ly, uy = (_align(t, b + p.ys, p.letters) for t in (y.lower, y.upper))
        c = (lx * ly, lx * uy, ux * ly, ux * uy)
        lo = torch.minimum(torch.minimum(c[0], c[1]), torch.minimum(c[2], c[3]))
        up = torch.maximum(torch.maximum(c[0], c[1]), torch.maximum(c[2], c[3]))
        summed = tuple(i for i, ch in enumerate(p.letters) if ch != b and ch not in p.out)
        kept = "".join(ch for ch in p.letters if ch == b or ch in p.out)
        order = [kept.index(ch) for ch in b + p.out]

        def fold(t):
            if summed:
                t = t.sum(dim=summed)
            return t.permute(order).contiguous()
        return Interval(fold(lo), fold(up))

    def _factored_interval(self, p: Plan, x: Interval, y: Interval) -> Interval:
        """Without forming the terms: the intersection of (1) x = x+ + x- (x+ = max(x, 0) in
        [lx+, ux+], x- = min(x, 0) in [lx-, ux-], the same for y), whose four products each
        have a known sign, so their ranges are corner products (exact where x or y keeps one
        sign); (2) centre and radius, x y = cx cy + cx dy + dx cy + dx dy with |dx| <= rx,
        |dy| <= ry: within ``|cx| ry + rx |cy| + rx ry`` of ``cx cy`` (exact on boxes centred
        at 0)."""
        e = lambda a, b: torch.einsum(p.forward, a, b)  # noqa: E731
        lxp, uxp, lxn, uxn = (x.lower.clamp(min=0), x.upper.clamp(min=0), x.lower.clamp(max=0),
                              x.upper.clamp(max=0))
        lyp, uyp, lyn, uyn = (y.lower.clamp(min=0), y.upper.clamp(min=0), y.lower.clamp(max=0),
                              y.upper.clamp(max=0))
        lo = e(lxp, lyp) + e(uxp, lyn) + e(lxn, uyp) + e(uxn, uyn)
        up = e(uxp, uyp) + e(lxp, uyn) + e(uxn, lyp) + e(lxn, lyn)
        cx, rx, cy, ry = x.center, x.radius, y.center, y.radius
        mid = e(cx, cy)
        rad = e(cx.abs(), ry) + e(rx, cy.abs()) + e(rx, ry)
        return Interval(torch.maximum(lo, mid - rad), torch.minimum(up, mid + rad))

    def alpha_init(self, node, inputs, B, S, dtype):
        """The mix of the two lower planes and of the two upper planes (``[2, B, S, *out]``, in
        [0, 1]) per spec row and output element, starting at CROWN's choice (``corner_mix``)."""
        p = plan(node.params["equation"])
        return mix_init(*inputs, lambda a, b: torch.einsum(p.forward, a, b), B, S, node.shape,
                        dtype)

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """``alpha``: optional ``(for the lower bound, for the upper bound)``, each ``[2, B, S,
        *out]`` in [0, 1]: the mix of the lower planes (index 0) and of the upper planes (1)."""
        x, y = inputs
        p = plan(node.params["equation"])
        sx, sy = node.params["in_shapes"]

        def prod(a, b):
            return torch.einsum(p.forward, a, b)

        def adj_x(w, t):
            return _with_only(torch.einsum(p.adj_x, w, t), p.x_only, sx)

        def adj_y(w, t):
            return _with_only(torch.einsum(p.adj_y, w, t), p.y_only, sy)

        if alpha is None:
            alpha = crown_alpha(x, y, prod)

        parts, b_l, b_u = mccormick_backward(A_lower, A_upper, alpha, x, y, prod, adj_x, adj_y,
                                             sx, sy)
        if node.params.get("simplex"):
            (axl, axu), ay = parts
            axl, sl = simplex_shift(axl, x)
            axu, su = simplex_shift(axu, x)
            parts, b_l, b_u = [(axl, axu), ay], b_l + sl, b_u + su
        return parts, b_l, b_u
