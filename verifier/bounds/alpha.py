"""alpha-CROWN: CROWN whose ReLU lower lines are optimized.

For an unstable ReLU (l < 0 < u) every line ``alpha x`` with ``0 <= alpha <= 1`` (``a <= alpha <=
1`` for LeakyReLU with slope a) lies below the activation on [l, u], so each choice gives a
sound CROWN bound; the bound is a differentiable function of the slopes. Starting from CROWN's
choice (1 if u > -l else 0), projected gradient steps (Adam, then clamping into the range)
raise the lower bounds and lower the upper bounds of the spec rows, with separate slopes per
spec row and per bound direction. The best value of each row seen is kept, so the result is
never looser than CROWN's.

Intermediate bounds are optimized too (for fully connected models, when their slopes fit in
memory; for convolutional ones the dense passes cost many times the output-only optimization for
little gain, measured on the reference CNNs): every pre-activation
node with unstable neurons gets its own slopes for the ReLUs before it (per neuron and
direction), its bounds are recomputed with them in every iteration and intersected with
CROWN's, and the output bound is computed from those; the gradient of the output objective
flows through the intermediate bounds into their slopes (the ReLU relaxations are
differentiable in l and u). Every intermediate bound is a valid CROWN bound for any slopes in
range, so the result stays sound.
"""
from __future__ import annotations

import math
import time

import torch

from ..bound_types import Interval
from ..graph.nodes import Graph
from ..ops import RULES
from ..perturbation import Perturbation
from .crown import backward_bound, crown_bounds

SLOPED = ("relu", "leaky_relu")
# the most slope and A elements the intermediate-bound slopes may hold (else output slopes only)
INTERMEDIATE_BUDGET = 2 ** 25
# ops after which intermediate slopes are not optimized (convolutional models: output slopes only)
SPATIAL = ("conv", "conv_w", "conv_transpose", "avgpool", "maxpool")


def _slopes(graph, bounds, target, B, S, dtype):
    """CROWN's initial lower slopes ``{relu: (for lower, for upper)}``, each ``[B, S, *shape]``,
    for the unstable ReLUs that ``target`` depends on, and their ranges ``{relu: a}``."""
    alphas, ranges = {}, {}
    for name in graph.ancestors_order(target):
        node = graph[name]
        if node.op not in SLOPED or name == target:
            continue
        x = bounds[node.inputs[0]]
        if not ((x.lower < 0) & (x.upper > 0)).any():
            continue
        a = node.params.get("negative_slope", 0.0)
        r = x.relax or x  # the interval CROWN drew its lines on (see Interval.relax)
        init = torch.where(r.upper > -r.lower, 1.0, a).to(dtype).unsqueeze(1)
        init = init.expand(B, S, *node.shape)
        alphas[name] = (init.clone().requires_grad_(True), init.clone().requires_grad_(True))
        ranges[name] = a
    return alphas, ranges


def _targets(graph, bounds, out, B, dtype):
    """Pre-activation nodes with unstable neurons whose bounds depend on earlier unstable ReLUs,
    in topological order: ``[(name, rows, alphas, ranges)]``, within INTERMEDIATE_BUDGET."""
    found, used = [], 0
    if any(graph[n].op in SPATIAL for n in graph.ancestors_order(out)):
        # dense passes through feature maps make every iteration many times dearer than the
        # output-only optimization for little gain (measured on the reference CNNs)
        return None
    for name in graph.ancestors_order(out):
        if name == out or not any(c.op in SLOPED for c in graph.consumers(name)):
            continue
        iv = bounds[name]
        unstable = ((iv.lower < 0) & (iv.upper > 0)).reshape(B, -1)
        rows = unstable.any(0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        alphas, ranges = _slopes(graph, bounds, name, B, rows.numel(), dtype)
        if not alphas:
            continue
        width = sum(math.prod(graph[n].shape) for n in graph.ancestors_order(name))
        cost = B * rows.numel() * width * 3
        if used + cost > INTERMEDIATE_BUDGET:
            return None  # too big: optimize the output's slopes only
        used += cost
        found.append((name, rows, alphas, ranges))
    return found


def _refined(graph, name, rows, alphas, cur, leaves):
    """The node's bounds with its unstable rows recomputed under ``alphas``, intersected with
    the current ones (differentiable in the slopes)."""
    iv = cur[name]
    B = iv.lower.shape[0]
    n = iv.lower[0].numel()
    C = torch.zeros(rows.numel(), n, dtype=iv.lower.dtype)
    C[torch.arange(rows.numel()), rows] = 1.0
    C = C.view(1, rows.numel(), *graph[name].shape).expand(B, -1, *graph[name].shape)
    lo, up = backward_bound(graph, name, C, cur, leaves, alpha=alphas)
    fl, fu = iv.lower.reshape(B, -1), iv.upper.reshape(B, -1)
    nl, nu = fl.clone(), fu.clone()
    nl[:, rows] = torch.maximum(fl[:, rows], lo)
    nu[:, rows] = torch.minimum(fu[:, rows], up)
    return Interval(nl.view_as(iv.lower), nu.view_as(iv.upper))


def _downstream(graph, name, cur):
    """IBP of the nodes between a refined node and the next refined one that a rule reads
    (e.g. a ReLU's output read by a layer with perturbed weights)."""
    for c in graph.consumers(name):
        if c.op in SLOPED and c.name in cur:
            cur[c.name] = cur[c.name].intersect(RULES[c.op].interval(c, [cur[name]]))


def alpha_crown_bounds(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                       iterations: int = 50, lr: float = 0.5, lr_decay: float = 0.98,
                       patience: int = 10, deadline: float | None = None,
                       intermediate: bool = True):
    """-> (lower, upper, bounds) like ``crown_bounds``, tightened by optimized slopes
    (``intermediate``: also the pre-activation bounds, see the module doc)."""
    lo0, up0, bounds = crown_bounds(graph, leaves, C, method="crown")
    out = graph.output
    ref = bounds[out].lower
    B = ref.shape[0]
    if C is None:
        n = ref[0].numel()
        spec = torch.eye(n, dtype=ref.dtype).view(1, n, *graph[out].shape).expand(B, n, *graph[out].shape)
    else:
        spec = C
    S = spec.shape[1]
    alphas, ranges = _slopes(graph, bounds, out, B, S, ref.dtype)
    inter = _targets(graph, bounds, out, B, ref.dtype) if intermediate else None
    for _, _, a_t, r_t in inter or []:
        ranges.update(r_t)
    if not alphas:
        return lo0, up0, bounds
    params = [p for pair in alphas.values() for p in pair]
    params += [p for _, _, a_t, _ in inter or [] for pair in a_t.values() for p in pair]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay)
    best_l, best_u = lo0.reshape(B, S).clone(), up0.reshape(B, S).clone()
    stall, last = 0, None
    with torch.enable_grad():
        for _ in range(iterations):
            if deadline is not None and time.perf_counter() > deadline:
                break
            cur = _intermediate(graph, bounds, leaves, inter)
            lo, up = backward_bound(graph, out, spec, cur, leaves, alpha=alphas)
            best_l = torch.maximum(best_l, lo.detach())
            best_u = torch.minimum(best_u, up.detach())
            loss = up.sum() - lo.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for a_set in [alphas] + [a_t for _, _, a_t, _ in inter or []]:
                    for name, (al, au) in a_set.items():
                        al.clamp_(ranges[name], 1.0)
                        au.clamp_(ranges[name], 1.0)
            value = float(loss.detach())
            if last is not None and value > last - 1e-6 * (1 + abs(last)):
                stall += 1
                if stall >= patience:
                    break
            else:
                stall = 0
            last = value
    with torch.no_grad():
        cur = _intermediate(graph, bounds, leaves, inter)
        lo, up = backward_bound(graph, out, spec, cur, leaves, alpha=alphas)
        bounds = {k: Interval(v.lower.detach(), v.upper.detach()) for k, v in cur.items()}
    best_l = torch.maximum(best_l, lo)
    best_u = torch.minimum(best_u, up)
    if C is None:
        best_l, best_u = best_l.view_as(ref), best_u.view_as(ref)
        bounds[out] = bounds[out].intersect(type(bounds[out])(best_l, best_u))
    return best_l, best_u, bounds


def _intermediate(graph, bounds, leaves, inter):
    """The bounds with every target's unstable rows recomputed under its slopes, in order."""
    if not inter:
        return bounds
    cur = dict(bounds)
    for name, rows, a_t, _ in inter:
        cur[name] = _refined(graph, name, rows, a_t, cur, leaves)
        _downstream(graph, name, cur)
    return cur

