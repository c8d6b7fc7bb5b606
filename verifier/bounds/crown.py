"""CROWN: backward linear bound propagation over the graph.

Starting from ``C`` at a node (``A = C: [B, S, *shape]``), the backward interpreter
(``verifier.bounds.backward``) passes ``A`` through every node's rule to the leaves. Nonlinear
rules need their inputs' intervals: ``crown_bounds`` computes them first with the forward
interpreter, node by node in topological order, with CROWN itself (method "crown") or with IBP
(method "crown-ibp"), always intersected with IBP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..bound_types import Interval, concretize_interval
from ..errors import VerifierError
from ..graph.nodes import Graph
from ..ops import RULES
from ..perturbation import Box, LpBall, Perturbation, Zonotope
from .backward import backward, backward_bound
from .forward import forward
from .ibp import ibp_bounds
from .patches import patchable, start_patches

# Budget for one backward pass, in tensor elements of the widest A: rows of C are split into
# chunks so that batch * rows * widest_node stays below it.
MAX_A_ELEMENTS = 2 ** 25
# Patch-form passes run in smaller chunks, of about this many elements of the widest node's
# dense A (but at least PATCH_MIN_ROWS rows): their tensors then stay in the CPU cache and are
# reused by the allocator, where fresh large buffers cost a page fault per 4 KiB (about 20%
# faster on resnet4b).
PATCH_CHUNK = 2 ** 20
PATCH_MIN_ROWS = 128
# Refine each sample's own unstable neurons (one batch element per pair) when the dense pass over
# the neurons unstable in any sample would do this many times more rows of work.
SPARSE_GAIN = 1.5


def _rows_per_chunk(graph: Graph, start: str, batch: int) -> int:
    widest = max(math.prod(graph[n].shape) for n in graph.ancestors_order(start))
    return max(1, MAX_A_ELEMENTS // max(1, batch * widest))


def chunked_backward(graph, start, C, bounds, leaves, record=None, upper: bool = True):
    """``backward_bound`` over chunks of spec rows (bounded memory); ``record`` (see
    ``backward_bound``) is filled only when the rows fit in one chunk; ``upper=False``: the
    lower bound only (the upper one is None)."""
    step = _rows_per_chunk(graph, start, C.shape[0])
    if C.shape[1] <= step:
        return backward_bound(graph, start, C, bounds, leaves, record=record, upper=upper)
    lo, up = [], []
    for k in range(0, C.shape[1], step):
        l, u = backward_bound(graph, start, C[:, k:k + step], bounds, leaves, upper=upper)
        lo.append(l)
        up.append(u)
    return torch.cat(lo, 1), (torch.cat(up, 1) if upper else None)


def _identity_spec(batch: int, shape, dtype, device, rows=None) -> torch.Tensor:
    """One-hot rows ``[B, k, *shape]`` selecting the flat positions ``rows`` (all by default)."""
    n = math.prod(shape)
    if rows is None:
        eye = torch.eye(n, dtype=dtype, device=device)
    else:
        eye = torch.zeros(len(rows), n, dtype=dtype, device=device)
        eye[torch.arange(len(rows), device=device), rows] = 1.0
    return eye.view(1, -1, *shape).expand(batch, -1, *shape)


def _take_interval(b: Interval, index: torch.Tensor) -> Interval:
    out = Interval(b.lower.index_select(0, index), b.upper.index_select(0, index))
    if b.relax is not None:
        out.relax = _take_interval(b.relax, index)
    return out


def _sparse_rows(graph, name, unstable_b, bounds, leaves):
    """CROWN bounds of the (sample, neuron) pairs where ``unstable_b: [B, n]`` is set, each pair
    its own batch element with one spec row: the cost follows the number of pairs, not
    ``B x`` the neurons unstable in any sample (in branch and bound, domains deep in the tree
    leave few neurons unstable, and not the same ones). -> (lower, upper) ``[pairs]``."""
    node = graph[name]
    bi, ji = unstable_b.nonzero(as_tuple=True)
    own = RULES[node.op] if node.op != "input" else None
    lin = own is not None and own.has_rows(node)
    start = node.inputs[0] if lin else name
    ancestors = graph.ancestors_order(start)
    widest = max(math.prod(graph[n].shape) for n in ancestors)
    step = max(1, MAX_A_ELEMENTS // (4 * widest))
    n = math.prod(node.shape)
    lo, up = [], []
    for k in range(0, bi.numel(), step):
        b, j = bi[k:k + step], ji[k:k + step]
        sub_bounds = {}
        for a in ancestors:
            anode = graph[a]
            if anode.op == "input" or not RULES[anode.op].needs_bounds:
                continue
            rule = RULES[anode.op]
            for i in anode.inputs:
                if i not in sub_bounds:
                    sub_bounds[i] = _take_interval(bounds[i], b)
            if hasattr(rule, "seed_relaxation"):
                # gathered from the whole batch's relaxation (computed once, then cached)
                full = rule.relaxation(anode, bounds[anode.inputs[0]])
                rule.seed_relaxation(anode, sub_bounds[anode.inputs[0]],
                                     [t.index_select(0, b) for t in full])
        sub_leaves = {a: leaf.take(b) for a, leaf in leaves.items() if a in ancestors}
        dtype = bounds[name].lower.dtype
        if lin:
            W, bias = own.rows(node, j)
            C = W.unsqueeze(1)
        else:
            C = torch.zeros(b.numel(), 1, n, dtype=dtype, device=b.device)
            C[torch.arange(b.numel(), device=b.device), 0, j] = 1.0
            C = C.view(b.numel(), 1, *node.shape)
        l, u = backward_bound(graph, start, C, sub_bounds, sub_leaves)
        l, u = l[:, 0], u[:, 0]
        if lin and bias is not None:
            l, u = l + bias, u + bias
        lo.append(l)
        up.append(u)
    return bi, ji, torch.cat(lo), torch.cat(up)


def _sparse_ok(graph, name, B, bounds, leaves) -> bool:
    """Per-pair refinement needs every ancestor's interval per sample and box leaves."""
    for a in graph.ancestors_order(name):
        if a in leaves:
            if not isinstance(leaves[a], Box) or leaves[a].lower.shape[0] != B:
                return False
        elif a in bounds and bounds[a].lower.shape[0] != B:
            return False
    return True


def refine_node(graph, name, bounds, leaves) -> Interval:
    """CROWN bounds of one intermediate node. Where every consumer is ReLU-like, only neurons
    unstable under the current bounds are bounded again (the others keep their bounds): the
    neurons unstable in any sample, or, when that would be much more work, each sample's own
    unstable neurons (``_sparse_rows``)."""
    node = graph[name]
    cur = bounds[name]
    B = cur.lower.shape[0]
    rows = None
    if all(RULES[c.op].sign_only for c in graph.consumers(name)):
        unstable_b = ((cur.lower < 0) & (cur.upper > 0)).reshape(B, -1)
        rows = unstable_b.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return cur
        pairs = int(unstable_b.sum())
        if (B > 1 and len(node.shape) == 1 and pairs * SPARSE_GAIN < B * rows.numel()
                and _sparse_ok(graph, name, B, bounds, leaves)):
            bi, ji, lo, up = _sparse_rows(graph, name, unstable_b, bounds, leaves)
            nl = cur.lower.reshape(B, -1).clone()
            nu = cur.upper.reshape(B, -1).clone()
            nl[bi, ji] = lo
            nu[bi, ji] = up
            return Interval(nl.view_as(cur.lower), nu.view_as(cur.upper))
    if len(node.shape) == 3 and patchable(graph, name, leaves):
        lo, up = _patch_bounds(graph, name, rows, bounds, leaves)
    elif RULES[node.op].has_rows(node):
        # one-hot rows through y = W x + b are rows of W: start one node earlier
        idx = torch.arange(node.shape[0], device=cur.lower.device) if rows is None else rows
        W, b = RULES[node.op].rows(node, idx)
        A0 = W.unsqueeze(0).expand(B, -1, -1)
        lo, up = chunked_backward(graph, node.inputs[0], A0, bounds, leaves)
        if b is not None:
            lo, up = lo + b, up + b
    elif rows is None and (mirror := RULES[node.op].mirror(node)) is not None:
        # half the rows: the others are their negations (pairwise differences, a softmax's
        # first step, are most of a transformer's CROWN time)
        own, partner = (t.to(cur.lower.device) for t in mirror)
        C = _identity_spec(B, node.shape, cur.lower.dtype, cur.lower.device, own)
        lo, up = chunked_backward(graph, name, C, bounds, leaves)
        nl = cur.lower.reshape(B, -1).clone()
        nu = cur.upper.reshape(B, -1).clone()
        nl[:, own], nu[:, own] = lo, up
        nl[:, partner], nu[:, partner] = -up, -lo
        return Interval(nl.view_as(cur.lower), nu.view_as(cur.upper))
    else:
        C = _identity_spec(B, node.shape, cur.lower.dtype, cur.lower.device, rows)
        lo, up = chunked_backward(graph, name, C, bounds, leaves)
    if rows is None:
        return Interval(lo.view_as(cur.lower), up.view_as(cur.upper))
    nl = cur.lower.reshape(B, -1).clone()
    nu = cur.upper.reshape(B, -1).clone()
    # only where the neuron is unstable in that sample: a sample's bounds never depend on the
    # rest of the batch
    keep = unstable_b[:, rows]
    nl[:, rows] = torch.where(keep, lo, nl[:, rows])
    nu[:, rows] = torch.where(keep, up, nu[:, rows])
    return Interval(nl.view_as(cur.lower), nu.view_as(cur.upper))


def _patch_bounds(graph, name, rows, bounds, leaves):
    """Patch-form CROWN of the given neurons (all if rows is None), in chunks of rows."""
    node = graph[name]
    if rows is None:
        rows = torch.arange(math.prod(node.shape), device=bounds[name].lower.device)
    B = bounds[name].lower.shape[0]
    widest = max(math.prod(graph[n].shape) for n in graph.ancestors_order(name))
    size = max(1, B * widest)
    step = max(1, min((4 * MAX_A_ELEMENTS) // size, max(PATCH_MIN_ROWS, PATCH_CHUNK // size)))
    lo, up, cache = [], [], {}
    dtype = bounds[name].lower.dtype
    for k in range(0, rows.numel(), step):
        store = start_patches(graph, name, rows[k:k + step], dtype, B, cache)
        l, u = backward(graph, name, store, bounds, leaves)
        lo.append(l)
        up.append(u)
    return torch.cat(lo, 1), torch.cat(up, 1)


def _ibp_exact(graph, node, leaves) -> bool:
    """One affine op applied (through pure data movements such as Flatten) to one box-shaped
    leaf (a Box or an L-inf ball, not a zonotope, whose bounding box is looser than the set):
    its interval is already the exact range."""
    if not RULES[node.op].affine or len(set(node.inputs)) != 1:
        return False
    src = graph[node.inputs[0]]
    while src.op != "input" and RULES[src.op].data_movement:
        src = graph[src.inputs[0]]
    if src.op != "input":
        return False
    leaf = leaves[src.name]
    return isinstance(leaf, Box) or (isinstance(leaf, LpBall) and leaf.norm == math.inf)


def _zonotope_range(graph, node, leaves) -> Interval | None:
    """The exact range of one affine op applied (through data movements) to a zonotope leaf
    ``c + z G (+ a slack box)``, by pushing the center and the k generators forward: ``L(c) + b
    ± ||L(G)||_q (+ |L| slack)``, k evaluations of the op where CROWN would run one backward
    row per neuron (the same numbers, up to rounding). None for any other node."""
    chain = [node]
    while True:
        n = chain[-1]
        if n.op == "input" or len(n.inputs) != 1 or not RULES[n.op].affine:
            return None
        src = graph[n.inputs[0]]
        if src.op == "input":
            break
        if not RULES[src.op].data_movement:
            return None
        chain.append(src)
    Z = leaves[src.name]
    if not isinstance(Z, Zonotope):
        return None
    chain.reverse()

    def run(t):
        for n in chain:
            t = RULES[n.op].point(n, [t])
        return t

    B, k = Z.center.shape[0], Z.k
    G = Z.generators.reshape(B * k, *Z.center.shape[1:])
    y0 = run(Z.center)
    LG = (run(G) - run(torch.zeros_like(G[:1]))).reshape(B, k, *y0.shape[1:])
    rad = torch.linalg.vector_norm(LG, ord=Z.dual, dim=1)
    if Z.slack is not None:
        box = Interval(-Z.slack, Z.slack)
        for n in chain:
            box = RULES[n.op].interval(n, [box])
        rad = rad + box.radius
    return Interval(y0 - rad, y0 + rad)


def _tightens(a: Interval, b: Interval) -> bool:
    """Whether ``a`` is tighter than ``b`` somewhere (beyond float noise)."""
    tol = 1e-5 * (b.upper - b.lower).clamp(min=1e-6)
    return bool(((a.lower - b.lower > tol) | (b.upper - a.upper > tol)).any())


# relative slack of a fixed node's point value (the graph's float evaluation against the source
# model's; the same slack as the weight rules' deviation intersection)
POINT_SLACK = 1e-5


def fixed_nodes(graph: Graph, leaves: dict[str, Perturbation], names) -> set[str]:
    """The nodes among ``names`` (topological order) whose value is one point over the leaves'
    sets: every leaf they depend on is a single point (a fixed input while only some weights
    move)."""
    fixed: set[str] = set()
    for name in names:
        node = graph[name]
        if node.op == "input":
            if name in leaves:
                iv = leaves[name].interval()
                if torch.equal(iv.lower, iv.upper):
                    fixed.add(name)
        elif all(i in fixed for i in node.inputs):
            fixed.add(name)
    return fixed


def _at_point(iv: Interval, v: torch.Tensor) -> Interval:
    """``iv`` intersected with ``v ± POINT_SLACK (1 + |v|)`` (kept as ``iv`` where they miss)."""
    pad = POINT_SLACK * (1 + v.abs())
    lo, up = torch.maximum(iv.lower, v - pad), torch.minimum(iv.upper, v + pad)
    ok = lo <= up
    return Interval(torch.where(ok, lo, iv.lower), torch.where(ok, up, iv.upper))


def intermediate_bounds(graph: Graph, leaves: dict[str, Perturbation], method: str,
                        upto: str | None = None, prior: dict | None = None,
                        relax_lines: bool = True) -> dict[str, Interval]:
    """Intervals of every node that a nonlinear rule reads (and IBP ones for the rest).

    Walking in topological order, each node first gets IBP bounds from its inputs' current
    (possibly refined) bounds; with method "crown", a rule that can use CROWN bounds of linear
    functions of its inputs (``linear_refine``, e.g. the variance) intersects them in, and nodes
    read by a nonlinear rule are then tightened by a CROWN pass and intersected with IBP.

    Where IBP tightens CROWN's bounds, the intersection keeps CROWN's own as ``relax``: ReLU
    draws the lines of neurons that stay unstable over it, and uses the tighter interval only
    to find neurons that IBP proves stable. A chord over an IBP-clipped range is tighter on
    that range but tilts the back-substitution and can loosen later bounds (seen on the
    IBP-trained ``lirpa_mnist_cnn_small``); this way bounds stay at least as tight as plain
    CROWN's in practice, without a second pass of plain CROWN bounds.

    ``prior``: sound intervals already known for some nodes over a superset of the leaves' sets
    (in branch and bound, the parent domain's), intersected with IBP's before refining: neurons
    stable there are not bounded again. ``relax_lines=False``: the lines are drawn over the
    intersection (cheaper; branch and bound on small domains uses it).
    """
    bounds: dict[str, Interval] = {}
    names = graph.order if upto is None else graph.ancestors_order(upto)
    # nodes that do not move over the sets (below the first perturbed weight when the input is
    # fixed): their value at the point, no backward pass (IBP alone widens through them)
    fixed = fixed_nodes(graph, leaves, names) if method == "crown" else set()
    points: dict[str, torch.Tensor] = {}

    def leaf(node):
        iv = leaves[node.name].interval()
        if node.name in fixed:
            points[node.name] = iv.lower
        return iv

    def step(rule, node, ins):
        name = node.name
        iv = rule.interval(node, ins)
        if prior is not None and name in prior:
            iv = iv.intersect(prior[name])
        if name in fixed:
            points[name] = v = rule.point(node, [points[i] for i in node.inputs])
            return _at_point(iv, v)
        if method == "crown" and name != upto and rule.refines_linear:
            def bound_linear(i, C):
                return chunked_backward(graph, node.inputs[i], C, bounds, leaves)
            new = rule.linear_refine(node, ins, bound_linear)
            if new is not None:
                iv = iv.intersect(new)
        exact = None
        if (method == "crown" and name != upto
                and any(RULES[c.op].needs_bounds for c in graph.consumers(name))):
            exact = _zonotope_range(graph, node, leaves)
            if exact is not None:
                iv = iv.intersect(exact)
        if (exact is None and method == "crown" and name != upto
                and not _ibp_exact(graph, node, leaves)
                and any(RULES[c.op].needs_bounds for c in graph.consumers(name))):
            bounds[name] = iv  # refine_node reads the node's current bounds
            new = refine_node(graph, name, bounds, leaves)
            both = iv.intersect(new)
            if relax_lines and _tightens(iv, new):
                both.relax = new
            iv = both
        return iv

    return forward(graph, leaf, step, names, bounds)


@dataclass
class CrownBounds:
    """``lower, upper``: bounds of ``C·f`` (``[B, S]``), or of ``f`` (``[B, *out_shape]``)
    without C; ``nodes``: the intermediate intervals by node name. ``A``: for each node asked
    for (``keep``), the lower-bound A of the output pass that reached it (its rows are C's,
    then the output box's when that is bounded too). ``linear_lower``: the output pass's own
    lower bound of ``C·f`` (``[B, S]``), the least value over the leaves of the linear function
    ``A x + b`` whose A the input's entry holds, before any intersection (so ``A x + b <= C f``
    at every point of the leaves, and ``lower`` may be higher); None without C.

    With C, ``lower`` is the elementwise max of two sound bounds, each kept (``[B, S]``) so that
    a caller can tell which one proved a row: ``own_lower``, the backward passes' bound (with the
    clipped pass, before any interval bound), and ``ibp_lower``, the interval bound of ``C·f``
    over the intermediate bounds (``ibp_spec_bounds``: C merged into the last affine layer, or C
    over the output box). Every intermediate interval lies inside plain IBP's, so ``ibp_lower``
    is never below the IBP method's bound and neither is ``lower``."""

    lower: torch.Tensor
    upper: torch.Tensor
    nodes: dict[str, Interval]
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    linear_lower: torch.Tensor | None = None
    own_lower: torch.Tensor | None = None
    ibp_lower: torch.Tensor | None = None


def crown_bounds(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                 method: str = "crown", prior: dict | None = None, **options):
    """-> (lower, upper, bounds): ``crown``'s bounds and intermediate intervals."""
    res = crown(graph, leaves, C, method, prior, **options)
    return res.lower, res.upper, res.nodes


def crown(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
          method: str = "crown", prior: dict | None = None, keep=(), box_rows: bool = True,
          clipped_pass: bool = True, relax_lines: bool = True,
          ibp_spec: bool = True, intervals: dict | None = None, upper: bool = True) -> CrownBounds:
    """CROWN (method "crown") or CROWN-IBP bounds of ``C·f`` (see ``CrownBounds``).
    ``prior``: see ``intermediate_bounds``; ``keep``: node names whose A to return.
    ``box_rows``, ``clipped_pass``: the two refinements of the output pass below, and
    ``relax_lines`` (see ``intermediate_bounds``): input-split branch and bound, which bounds
    many small domains, turns all three off (on ACAS Xu about 2.3x the domains per second for
    about 8% more domains). ``ibp_spec``: intersect with the interval bound of ``C·f`` with C
    merged into the last affine layer (``ibp_spec_bounds``; on IBP-trained nets it is often
    tighter than CROWN's); False keeps only C over the output box (the certified-training loss
    does, so that its CROWN-IBP term keeps its own gradient).

    ``intervals`` (method "crown-ibp" only): the IBP intervals of the nodes over the same sets,
    already computed (e.g. by the IBP bounds of the same batch): used as they are, any node
    missing there is filled in by IBP. ``upper=False``: the backward passes bound the lower side
    only (about half their work: the certified-training loss reads only lower bounds of the
    spec rows); the upper bounds returned are then the interval ones, and no output-box rows
    are added (they need both sides)."""
    record = {k: None for k in keep}
    linear = None
    out = graph.output
    if intervals is not None:
        if method != "crown-ibp" or prior is not None:
            raise VerifierError("crown(intervals=...) takes IBP intervals for method crown-ibp, "
                                f"without prior; got method {method!r}"
                                + (" and a prior" if prior is not None else ""))
        bounds = ibp_bounds(graph, leaves, upto=out, known=intervals)
    else:
        bounds = intermediate_bounds(graph, leaves, method, upto=out, prior=prior,
                                     relax_lines=relax_lines)
    ref = bounds[out].lower
    B = ref.shape[0]
    n_out = math.prod(graph[out].shape)
    eye = _identity_spec(B, graph[out].shape, ref.dtype, ref.device)
    # With a spec, the output's own box (CROWN's without the spec, intersected with IBP's) is
    # bounded in the same pass: C applied to it is sound too, and keeping the tighter of each
    # row means bounds with a spec are never looser than bounds on f combined afterwards.
    # Skipped when the output is much wider than the spec (its cost would dominate).
    with_box = box_rows and upper and C is not None and n_out <= 4 * C.shape[1] + 16
    if C is None:
        spec = eye
    elif with_box:
        spec = torch.cat([C, eye], 1)
    else:
        spec = C
    lo, up = chunked_backward(graph, out, spec, bounds, leaves, record=record, upper=upper)
    if not upper:
        up = torch.full_like(lo, math.inf)
    if C is not None:
        linear = lo[:, :C.shape[1]]
    if clipped_pass and any(b.relax is not None for b in bounds.values()):
        # the output pass is cheap next to the intermediate ones: also run it with every chord
        # drawn over the IBP-clipped ranges (tighter on average on IBP-trained nets, looser on
        # some rows) and keep the better bound of each row
        clipped = {k: Interval(b.lower, b.upper) if b.relax is not None else b
                   for k, b in bounds.items()}
        lo2, up2 = chunked_backward(graph, out, spec, clipped, leaves, upper=upper)
        lo = torch.maximum(lo, lo2)
        if upper:
            up = torch.minimum(up, up2)
    if C is None:
        lo, up = lo.view_as(ref), up.view_as(ref)
        bounds[out] = bounds[out].intersect(Interval(lo, up))
        return CrownBounds(bounds[out].lower, bounds[out].upper, bounds, record)
    S = C.shape[1]
    box = bounds[out]
    if with_box:
        box = box.intersect(Interval(lo[:, S:].view_as(ref), up[:, S:].view_as(ref)))
        bounds[out] = box
        lo, up = lo[:, :S], up[:, :S]
    if ibp_spec:
        ilo, iup = ibp_spec_bounds(graph, bounds, C)
    else:
        ilo, iup = concretize_interval(C, box, upper=False), concretize_interval(C, box, upper=True)
    own = lo
    lo, up = torch.maximum(lo, ilo), torch.minimum(up, iup)
    return CrownBounds(lo, up, bounds, record, linear, own, ilo)


def ibp_spec_bounds(graph: Graph, bounds: dict[str, Interval], C: torch.Tensor):
    """Bounds of ``C·f`` from IBP intervals, with C merged into the output node when that node is
    affine (``C W`` concretized over the node's input intervals: tighter than C over f's box)."""
    out = graph.output
    node = graph[out]
    rule = RULES[node.op] if node.op != "input" else None
    lo = concretize_interval(C, bounds[out], upper=False)
    up = concretize_interval(C, bounds[out], upper=True)
    if rule is not None and rule.affine:
        parts, b_l, b_u = rule.backward(node, C, C, None)
        ml, mu = b_l, b_u
        for inp, (al, au) in zip(node.inputs, parts):
            ml = ml + concretize_interval(al, bounds[inp], upper=False)
            mu = mu + concretize_interval(au, bounds[inp], upper=True)
        lo, up = torch.maximum(lo, ml), torch.minimum(up, mu)
    return lo, up
