"""alpha-CROWN: CROWN whose relaxations' free parameters are optimized.

Each rule says which parameters its relaxation leaves free, their starting value (CROWN's lines)
and their valid range (``BoundRule.alpha_init``); this module optimizes them.

For an unstable ReLU (l < 0 < u) every line ``alpha x`` with ``0 <= alpha <= 1`` (``a <= alpha <=
1`` for LeakyReLU with slope a) lies below the activation on [l, u], so each choice gives a
sound CROWN bound; the bound is a differentiable function of the slopes. Starting from CROWN's
choice (1 if u > -l else 0), projected gradient steps (Adam, then clamping into the range)
raise the lower bounds and lower the upper bounds of the spec rows, with separate slopes per
spec row and per bound direction. The best value of each row seen is kept, so the result is
never looser than CROWN's.

Sigmoid and tanh (``SShaped``) take tangent positions instead: where a neuron's lower or upper
line may be the tangent at any point of a range [t0, t1] (``SShaped.tangent_ranges``), the
point ``t0 + tau (t1 - t0)`` with ``tau`` in [0, 1] is optimized in the same way, starting from
CROWN's lines. The smooth rules (``SmoothElementwise``: GELU, SiLU, Softplus, ...) take the
slope of each line (any slope gives a sound line; ``SmoothElementwise.optimized_lines``), as a
position in [0, 1] along a table of slopes, with a smaller learning rate (``alpha_lr``: their
best slopes lie inside the range); PReLU and the rules with a domain (``verifier.ops.domain``)
keep their own parameter (a line through the kink, a tangent point). A max pool's lower line is a convex combination of each window's elements with
optimized non-negative weights (normalized over the window; ``MaxPool.backward``), starting
from CROWN's one element. A product of two perturbed tensors (``mul``, ``einsum``) mixes its two
lower McCormick planes, and its two upper ones, with a weight in [0, 1] per spec row and output
element, starting from CROWN's planes (``verifier.ops.bilinear``).

Intermediate bounds are optimized first, layer by layer: in topological order, every
pre-activation node with neurons that an activation relaxes loosely (``rule.loose``: a ReLU's
unstable neurons, a smooth activation's whose lines are apart) and that depend on earlier
free relaxations gets its own parameters for those (per neuron of the node and per bound
direction), optimized to tighten that node's own bounds; the result is intersected with the node's current bounds and used by
every later node. Each row's objective depends only on its own slopes, so the rows of a node
are optimized in chunks that fit in memory (the same result up to early stopping). Tighter pre-activation
bounds give tighter ReLU relaxations for the output: on the reference CNN
``lirpa_mnist_a_adv`` (sample 0) the mean margin lower bound goes from -4.3 with output slopes
only (which reach the LP optimum over CROWN's intermediate bounds, checked with an LP solver)
to -1.19 (auto_LiRPA's alpha-CROWN: -1.27). On the GELU MLP ``gelu_mlp`` (modern suite, 5
boxes) it goes from CROWN's -3.48 to -2.63 (auto_LiRPA's alpha-CROWN: -2.82), about two thirds
of the gain from the tightened intermediate bounds. Every bound computed is a valid CROWN bound for
slopes in range, so the result stays sound.

On a transformer that order spends its time where it gains least (vit_tiny: 160 s per box,
most of it on the softmax sums and the MLP's pre-activations, each 1-30% tighter). What compounds
there is the width of the products' operands: a product's McCormick planes are loose in every
element, in proportion to both operands' widths, and block 1's Q and K only 5% tighter turn the
worst CROWN margin bound of box 4 from -11.2 into -8.2. So on graphs with products of two
perturbed tensors the default (``intermediate="auto"``) optimizes those instead: every row of
the linear projections that the products of the later blocks read (``product_operands``: Q, K,
V of every block after the first), a few steps each, then CROWN's intermediate bounds again
over them, so that every later relaxation (the scores' planes, the softmax, the LayerNorms, the
MLP) is drawn over the tighter intervals; then the output slopes. With a spec the output slopes
come first, and the operands only where a row stays at or below ``target`` (0: margins).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ..bound_types import Interval
from ..errors import VerifierError
from ..graph.nodes import Graph
from ..ops import RULES
from ..perturbation import Perturbation
from .crown import CrownBounds, backward_bound, crown, ibp_spec_bounds, intermediate_bounds
from .optimize import projected_optimize

# elements of the A tensors of one chunk of rows in the intermediate optimization
INTERMEDIATE_CHUNK = 2 ** 24
# an intermediate node is optimized only where its loose rows times the width of the graph
# below it stay under this (the MLPs' layers are far under it; vit_tiny's softmax differences,
# 8192 rows each, are 2x and 6x over: optimizing them took 600 s of alpha-CROWN's 650 s per box,
# for a mean margin bound of 10.16 instead of 10.13)
INTERMEDIATE_WORK = 2 ** 26
# optimizer steps per intermediate node: layer by layer, and for every row of a product's operand
# (vit_tiny box 2: 5 steps on block 1's Q and K give a worst margin bound of -1.97, 10 steps -1.91,
# in about half the time)
LAYER_ITERATIONS = 20
OPERAND_ITERATIONS = 5


def _slopes(graph, bounds, target, B, S, dtype):
    """The free relaxation parameters of every node that ``target`` depends on
    (``rule.alpha_init``): ``{node: (for the lower bound, for the upper bound)}``, each starting
    at the value that gives CROWN's lines, and their ranges and learning-rate factors
    ``{node: (low, high, rule.alpha_lr)}``."""
    alphas, ranges = {}, {}
    for name in graph.ancestors_order(target):
        node = graph[name]
        if node.op == "input" or name == target:
            continue
        got = RULES[node.op].alpha_init(node, [bounds[i] for i in node.inputs], B, S, dtype)
        if got is None:
            continue
        init, low, high = got
        alphas[name] = (init.clone().requires_grad_(True), init.clone().requires_grad_(True))
        ranges[name] = (low, high, RULES[node.op].alpha_lr)
    return alphas, ranges


def _optimize(bound_fn, alphas, ranges, lo0, up0, iterations, lr, lr_decay, patience, deadline):
    """Projected Adam steps on ``alphas`` against ``sum(upper) - sum(lower)`` of ``bound_fn()``;
    -> the best lower and upper bound of each row seen, never looser than ``lo0, up0``."""
    # one parameter group per node: its rule scales the learning rate (``alpha_lr``)
    params = [{"params": list(pair), "lr": lr * ranges[name][2]} for name, pair in alphas.items()]
    ranges = [(p, *ranges[name][:2]) for name, pair in alphas.items() for p in pair]
    res = projected_optimize(bound_fn, params, lambda v, best: v[1].sum() - v[0].sum(),
                             (lo0, up0), ("max", "min"), iterations, project=ranges, lr=None,
                             lr_decay=lr_decay, patience=patience, deadline=deadline)
    best_l, best_u = res.best
    with torch.no_grad():  # the slopes after the last step
        lo, up = bound_fn()
    return torch.maximum(best_l, lo), torch.minimum(best_u, up)


def _tighten_rows(graph, bounds, leaves, name, rows, iterations, lr, lr_decay, patience,
                  deadline) -> Interval | None:
    """The bounds of node ``name`` with the flat positions ``rows`` (``[k]``) optimized, each
    row its own parameters for every free relaxation below the node, in chunks of rows that fit
    in memory (``INTERMEDIATE_CHUNK``); the other rows keep their bounds. None where no free
    relaxation lies below the node."""
    iv = bounds[name]
    B = iv.lower.shape[0]
    width = sum(math.prod(graph[n].shape) for n in graph.ancestors_order(name))
    step = max(1, INTERMEDIATE_CHUNK // (3 * B * width))
    fl, fu = iv.lower.reshape(B, -1), iv.upper.reshape(B, -1)
    nl, nu = fl.clone(), fu.clone()
    shape = graph[name].shape
    changed = False
    for k in range(0, rows.numel(), step):
        if changed and deadline is not None and time.perf_counter() > deadline:
            break
        part = rows[k:k + step]
        alphas, ranges = _slopes(graph, bounds, name, B, part.numel(), iv.lower.dtype)
        if not alphas:  # no free relaxation before it: nothing to optimize
            break
        C = fl.new_zeros(part.numel(), fl.shape[1])
        C[torch.arange(part.numel(), device=C.device), part] = 1.0
        C = C.view(1, part.numel(), *shape).expand(B, -1, *shape)
        lo, up = _optimize(lambda: backward_bound(graph, name, C, bounds, leaves, alpha=alphas),
                           alphas, ranges, fl[:, part], fu[:, part], iterations, lr, lr_decay,
                           patience, deadline)
        nl[:, part], nu[:, part] = lo, up
        changed = True
    if not changed:
        return None
    return Interval(nl.view_as(iv.lower), nu.view_as(iv.upper))


def _tighten_intermediate(graph, bounds, leaves, out, iterations, lr, lr_decay, patience, deadline):
    """The pre-activation bounds optimized layer by layer (see the module doc)."""
    bounds = dict(bounds)
    for name in graph.ancestors_order(out):
        # inputs of element-wise relaxations (a max pool's windows are not judged by sign: not
        # tightened here)
        users = [c for c in graph.consumers(name) if RULES[c.op].elementwise]
        if name == out or not users:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            break
        iv = bounds[name]
        B = iv.lower.shape[0]
        # the neurons that some consumer relaxes loosely (a ReLU: the unstable ones)
        loose = torch.zeros_like(iv.lower, dtype=torch.bool)
        for c in users:
            loose |= RULES[c.op].loose(c, iv)
        rows = loose.reshape(B, -1).any(0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        width = sum(math.prod(graph[n].shape) for n in graph.ancestors_order(name))
        if rows.numel() * width > INTERMEDIATE_WORK:
            continue  # keeps CROWN's bounds (a softmax's 8192 pairwise differences in a ViT)
        new = _tighten_rows(graph, bounds, leaves, name, rows, iterations, lr, lr_decay,
                            patience, deadline)
        if new is not None:
            bounds[name] = new
            _downstream(graph, name, bounds)
    return bounds


def _linear_projection(graph: Graph, name: str) -> bool:
    """Whether node ``name`` is an affine map of another node, possibly through data movements
    (reshapes, transposes): attention's Q, K and V."""
    node = graph[name]
    while node.op != "input" and RULES[node.op].data_movement:
        node = graph[node.inputs[0]]
    return node.op != "input" and RULES[node.op].affine and len(set(node.inputs)) == 1


def product_operands(graph: Graph, out: str | None = None) -> list[list[str]]:
    """The operands of the products of two perturbed tensors below ``out`` (rules with
    ``operand_widths``: attention's ``Q K^T`` and ``weights @ values``) that are linear
    projections (``Q``, ``K``, ``V``; not the softmax weights) of nodes below another such
    product, in topological order, grouped so that no node of a group depends on another's
    (a transformer's later blocks: one group per block). These are the intermediate nodes whose
    widths compound through a transformer: a product's McCormick planes are loose in every
    element, in proportion to both operands' widths, and a projection's CROWN bound carries
    every relaxation below it. (vit_tiny box 2, alpha-CROWN: Q, K and V of block 1 optimized
    give a worst margin bound of -1.47 in about 75 s; with block 0's Q and K too, box 4 gains
    nothing (-3.29 instead of -3.35 for 2 s more); the softmax weights of both blocks too, at
    half the steps, -1.56 in 90 s.)"""
    out = graph.output if out is None else out
    order = graph.ancestors_order(out)

    def is_product(n):
        return graph[n].op != "input" and RULES[graph[n].op].operand_widths

    picked: list[str] = []
    for p in (n for n in order if is_product(n)):
        for i in dict.fromkeys(graph[p].inputs):
            if (i not in picked and graph[i].op != "input" and _linear_projection(graph, i)
                    and any(q != p and is_product(q) for q in graph.ancestors_order(i))):
                picked.append(i)
    picked.sort(key=order.index)
    groups: list[list[str]] = []
    for i in picked:
        below = set(graph.ancestors_order(i))
        if groups and not below & set(groups[-1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _tighten_operands(graph, bounds, leaves, groups, iterations, lr, lr_decay, patience,
                      deadline):
    """Every row of each node of ``groups`` optimized (``_tighten_rows``); after each group,
    CROWN's intermediate bounds again over the tightened ones (``intermediate_bounds`` with
    them as ``prior``), so that every later node's relaxation is drawn over the tighter
    intervals. -> the new bounds (a new dict)."""
    bounds = dict(bounds)
    out = graph.output
    for group in groups:
        changed = False
        for name in group:
            if deadline is not None and time.perf_counter() > deadline:
                break
            iv = bounds[name]
            rows = torch.arange(iv.lower[0].numel(), device=iv.lower.device)
            new = _tighten_rows(graph, bounds, leaves, name, rows, iterations, lr, lr_decay,
                                patience, deadline)
            if new is not None:
                bounds[name] = iv.intersect(new)
                changed = True
        if changed:
            bounds = intermediate_bounds(graph, leaves, "crown", upto=out, prior=bounds)
    return bounds


def _downstream(graph, name, cur):
    """IBP of the nodes between a refined node and the next refined one that a rule reads
    (e.g. a ReLU's output read by a layer with perturbed weights)."""
    for c in graph.consumers(name):
        if c.name in cur and RULES[c.op].optimizable and all(i in cur for i in c.inputs):
            # every input's current bounds (a product reads two, possibly the same node twice)
            cur[c.name] = cur[c.name].intersect(RULES[c.op].interval(c, [cur[i] for i in c.inputs]))


def _intermediate_mode(graph: Graph, intermediate) -> tuple[str, list[list[str]]]:
    """``alpha_crown``'s ``intermediate`` option -> ("none" | "layers" | "operands", groups of
    node names for "operands"); a typed error for anything else."""
    if intermediate is True or intermediate == "layers":
        return "layers", []
    if intermediate is False or intermediate is None:
        return "none", []
    if isinstance(intermediate, str):
        if intermediate not in ("auto", "operands"):
            raise VerifierError(f"alpha-CROWN's intermediate={intermediate!r}: expected True, "
                                "False, 'auto', 'layers', 'operands' or a list of node names")
        groups = product_operands(graph)
        if intermediate == "auto" and not groups:
            return "layers", []
        return "operands", groups
    names = list(intermediate)
    unknown = [n for n in names if not isinstance(n, str) or n not in graph or graph[n].op == "input"]
    if unknown:
        raise VerifierError(f"alpha-CROWN's intermediate nodes {unknown!r} are not intermediate "
                            "nodes of the graph")
    order = {n: k for k, n in enumerate(graph.order)}
    return "operands", [[n] for n in sorted(dict.fromkeys(names), key=order.__getitem__)]


def alpha_crown_bounds(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                       **options):
    """-> (lower, upper, bounds) of ``alpha_crown`` (same options)."""
    res = alpha_crown(graph, leaves, C, **options)
    return res.lower, res.upper, res.nodes


def alpha_crown(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                iterations: int = 50, lr: float = 0.5, lr_decay: float = 0.98,
                patience: int = 10, deadline: float | None = None,
                intermediate: bool | str | Sequence[str] = "auto",
                intermediate_iterations: int | None = None,
                target: float | torch.Tensor | None = 0.0) -> CrownBounds:
    """``CrownBounds`` like ``crown``'s, tightened by optimized slopes. ``intermediate``: which
    intermediate bounds are optimized before the output's (see the module doc): True or
    "layers": the pre-activation nodes layer by layer (``intermediate_iterations`` steps per
    node, 20 by default); "operands": the operands of the products of perturbed tensors that
    follow another product (``product_operands``: a transformer's later attention blocks), every
    row, then CROWN's intermediate bounds again over them (5 steps by default); a list of node
    names: those nodes the same way, one after the other; False: none (output slopes only);
    "auto" (default): "operands" on graphs that have such products, else "layers".
    ``target``: with C and the operands, the output slopes are optimized first, and the operands
    (the costly part) only where that leaves a row of some sample with a lower bound at or below
    ``target`` (broadcast to ``[B, S]``; 0: margins; None: always, for the tightest bounds).
    ``deadline``: a ``time.perf_counter()`` value after which the optimization stops with the
    best bounds found so far. With C, ``own_lower`` is the optimized backward bound (never
    below CROWN's own) and ``lower`` its max with the interval bound over the tightened
    intermediate bounds and with CROWN's (``A`` and ``linear_lower`` are not kept)."""
    mode, groups = _intermediate_mode(graph, intermediate)
    res0 = crown(graph, leaves, C, method="crown")
    lo0, up0, bounds = res0.lower, res0.upper, res0.nodes
    out = graph.output
    ref = bounds[out].lower
    B = ref.shape[0]
    if C is None:
        n = ref[0].numel()
        spec = torch.eye(n, dtype=ref.dtype, device=ref.device).view(1, n, *graph[out].shape).expand(B, n, *graph[out].shape)
    else:
        spec = C
    S = spec.shape[1]
    # the optimization starts from CROWN's own rows, so that ``own_lower`` is a backward bound
    own0 = lo0 if C is None else res0.own_lower
    best_l, best_u = own0.reshape(B, S), up0.reshape(B, S)

    def output_slopes(bounds, best_l, best_u):
        alphas, ranges = _slopes(graph, bounds, out, B, S, ref.dtype)
        if not alphas:
            return best_l, best_u, False
        lo, up = _optimize(lambda: backward_bound(graph, out, spec, bounds, leaves, alpha=alphas),
                           alphas, ranges, best_l, best_u, iterations, lr, lr_decay, patience,
                           deadline)
        return lo, up, True

    if mode == "layers":
        steps = LAYER_ITERATIONS if intermediate_iterations is None else intermediate_iterations
        bounds = _tighten_intermediate(graph, bounds, leaves, out, steps, lr, lr_decay, patience,
                                       deadline)
    elif mode == "operands" and C is not None and target is not None:
        # output slopes first (a few seconds): the operands (a minute on vit_tiny) only where
        # that leaves some row unproved
        best_l, best_u, any_free = output_slopes(bounds, best_l, best_u)
        if not any_free:
            return CrownBounds(lo0, up0, bounds, own_lower=res0.own_lower, ibp_lower=res0.ibp_lower)
        proved = torch.maximum(best_l, lo0.reshape(B, S)) > torch.as_tensor(
            target, dtype=ref.dtype, device=ref.device)
        if bool(proved.all()):
            mode = "done"
    if mode == "operands":
        steps = OPERAND_ITERATIONS if intermediate_iterations is None else intermediate_iterations
        bounds = _tighten_operands(graph, bounds, leaves, groups, steps, lr, lr_decay, patience,
                                   deadline)
    if mode != "done":
        best_l, best_u, any_free = output_slopes(bounds, best_l, best_u)
        if not any_free:
            return CrownBounds(lo0, up0, bounds, own_lower=res0.own_lower, ibp_lower=res0.ibp_lower)
    bounds = {k: Interval(v.lower.detach(), v.upper.detach()) for k, v in bounds.items()}
    if C is None:
        best_l, best_u = best_l.view_as(ref), best_u.view_as(ref)
        bounds[out] = bounds[out].intersect(Interval(best_l, best_u))
        return CrownBounds(bounds[out].lower, bounds[out].upper, bounds)
    ilo, iup = ibp_spec_bounds(graph, bounds, C)
    ilo = torch.maximum(ilo, res0.ibp_lower)
    lo = torch.maximum(torch.maximum(best_l, ilo), lo0)
    up = torch.minimum(torch.minimum(best_u, iup), up0)
    return CrownBounds(lo, up, bounds, own_lower=best_l, ibp_lower=ilo)
