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
"""
from __future__ import annotations

import math
import time

import torch

from ..bound_types import Interval
from ..graph.nodes import Graph
from ..ops import RULES
from ..perturbation import Perturbation
from .crown import CrownBounds, backward_bound, crown, ibp_spec_bounds
from .optimize import projected_optimize

# elements of the A tensors of one chunk of rows in the intermediate optimization
INTERMEDIATE_CHUNK = 2 ** 24
# an intermediate node is optimized only where its loose rows times the width of the graph
# below it stay under this (the MLPs' layers are far under it; vit_tiny's softmax differences,
# 8192 rows each, are 2x and 6x over: optimizing them took 600 s of alpha-CROWN's 650 s per box,
# for a mean margin bound of 10.16 instead of 10.13)
INTERMEDIATE_WORK = 2 ** 26


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
        step = max(1, INTERMEDIATE_CHUNK // (3 * B * width))
        fl, fu = iv.lower.reshape(B, -1), iv.upper.reshape(B, -1)
        nl, nu = fl.clone(), fu.clone()
        shape = graph[name].shape
        changed = False
        for k in range(0, rows.numel(), step):
            part = rows[k:k + step]
            alphas, ranges = _slopes(graph, bounds, name, B, part.numel(), iv.lower.dtype)
            if not alphas:  # no unstable ReLU before it: nothing to optimize
                break
            C = fl.new_zeros(part.numel(), fl.shape[1])
            C[torch.arange(part.numel(), device=C.device), part] = 1.0
            C = C.view(1, part.numel(), *shape).expand(B, -1, *shape)
            lo, up = _optimize(lambda: backward_bound(graph, name, C, bounds, leaves, alpha=alphas),
                               alphas, ranges, fl[:, part], fu[:, part], iterations, lr, lr_decay,
                               patience, deadline)
            nl[:, part], nu[:, part] = lo, up
            changed = True
        if changed:
            bounds[name] = Interval(nl.view_as(iv.lower), nu.view_as(iv.upper))
            _downstream(graph, name, bounds)
    return bounds


def _downstream(graph, name, cur):
    """IBP of the nodes between a refined node and the next refined one that a rule reads
    (e.g. a ReLU's output read by a layer with perturbed weights)."""
    for c in graph.consumers(name):
        if c.name in cur and RULES[c.op].optimizable and all(i in cur for i in c.inputs):
            # every input's current bounds (a product reads two, possibly the same node twice)
            cur[c.name] = cur[c.name].intersect(RULES[c.op].interval(c, [cur[i] for i in c.inputs]))


def alpha_crown_bounds(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                       **options):
    """-> (lower, upper, bounds) of ``alpha_crown`` (same options)."""
    res = alpha_crown(graph, leaves, C, **options)
    return res.lower, res.upper, res.nodes


def alpha_crown(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                iterations: int = 50, lr: float = 0.5, lr_decay: float = 0.98,
                patience: int = 10, deadline: float | None = None,
                intermediate: bool = True, intermediate_iterations: int = 20) -> CrownBounds:
    """``CrownBounds`` like ``crown``'s, tightened by optimized slopes (``intermediate``: the
    pre-activation bounds first, ``intermediate_iterations`` steps per node; see the module
    doc). ``deadline``: a ``time.perf_counter()`` value after which the optimization stops with
    the best bounds found so far. With C, ``own_lower`` is the optimized backward bound (never
    below CROWN's own) and ``lower`` its max with the interval bound over the tightened
    intermediate bounds and with CROWN's (``A`` and ``linear_lower`` are not kept)."""
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
    if intermediate:
        bounds = _tighten_intermediate(graph, bounds, leaves, out, intermediate_iterations, lr,
                                       lr_decay, patience, deadline)
    alphas, ranges = _slopes(graph, bounds, out, B, S, ref.dtype)
    if not alphas:
        return CrownBounds(lo0, up0, bounds, own_lower=res0.own_lower, ibp_lower=res0.ibp_lower)
    # the optimization starts from CROWN's own rows, so that ``own_lower`` is a backward bound
    own0 = lo0 if C is None else res0.own_lower
    best_l, best_u = _optimize(lambda: backward_bound(graph, out, spec, bounds, leaves, alpha=alphas),
                               alphas, ranges, own0.reshape(B, S), up0.reshape(B, S), iterations,
                               lr, lr_decay, patience, deadline)
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
