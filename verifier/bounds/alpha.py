"""alpha-CROWN: CROWN whose ReLU lower lines are optimized.

For an unstable ReLU (l < 0 < u) every line ``alpha x`` with ``0 <= alpha <= 1`` (``a <= alpha <=
1`` for LeakyReLU with slope a) lies below the activation on [l, u], so each choice gives a
sound CROWN bound; the bound is a differentiable function of the slopes. Starting from CROWN's
choice (1 if u > -l else 0), projected gradient steps (Adam, then clamping into the range)
raise the lower bounds and lower the upper bounds of the spec rows, with separate slopes per
spec row and per bound direction. The best value of each row seen is kept, so the result is
never looser than CROWN's. Intermediate bounds are CROWN's (not re-optimized).
"""
from __future__ import annotations

import time

import torch

from ..graph.nodes import Graph
from ..perturbation import Perturbation
from .crown import backward_bound, crown_bounds

SLOPED = ("relu", "leaky_relu")


def alpha_crown_bounds(graph: Graph, leaves: dict[str, Perturbation], C: torch.Tensor | None,
                       iterations: int = 50, lr: float = 0.5, lr_decay: float = 0.98,
                       patience: int = 10, deadline: float | None = None):
    """-> (lower, upper, bounds) like ``crown_bounds``, tightened by optimized slopes."""
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
    alphas, ranges = {}, {}
    for name in graph.ancestors_order(out):
        node = graph[name]
        if node.op not in SLOPED:
            continue
        x = bounds[node.inputs[0]]
        if not ((x.lower < 0) & (x.upper > 0)).any():
            continue
        a = node.params.get("negative_slope", 0.0)
        init = torch.where(x.upper > -x.lower, 1.0, a).to(ref.dtype).unsqueeze(1)
        init = init.expand(B, S, *node.shape)
        alphas[name] = (init.clone().requires_grad_(True), init.clone().requires_grad_(True))
        ranges[name] = a
    if not alphas:
        return lo0, up0, bounds
    params = [p for pair in alphas.values() for p in pair]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay)
    best_l, best_u = lo0.reshape(B, S).clone(), up0.reshape(B, S).clone()
    stall, last = 0, None
    with torch.enable_grad():
        for _ in range(iterations):
            if deadline is not None and time.perf_counter() > deadline:
                break
            lo, up = backward_bound(graph, out, spec, bounds, leaves, alpha=alphas)
            best_l = torch.maximum(best_l, lo.detach())
            best_u = torch.minimum(best_u, up.detach())
            loss = up.sum() - lo.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for name, (al, au) in alphas.items():
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
        lo, up = backward_bound(graph, out, spec, bounds, leaves, alpha=alphas)
    best_l = torch.maximum(best_l, lo)
    best_u = torch.minimum(best_u, up)
    if C is None:
        best_l, best_u = best_l.view_as(ref), best_u.view_as(ref)
        bounds[out] = bounds[out].intersect(type(bounds[out])(best_l, best_u))
    return best_l, best_u, bounds
