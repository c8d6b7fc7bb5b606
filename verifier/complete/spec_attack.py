"""A PGD attack on a VNN-LIB property: look for x in a box with ``C f(x) <= d``.

For each conjunction ``C y <= d`` it minimizes the violation ``max_r (C_r f(x) - d_r)`` over the
box by signed-gradient steps from random starts (and the box center), projecting by clamping
(``verifier.projected_gradient``; the step, a quarter of the box width, halves every 10 steps).
A point whose violation is <= 0 is a candidate counterexample; the caller replays it on the
original model before calling it one.
"""
from __future__ import annotations

import torch

from ..devices import uniform
from ..projected_gradient import Variable, projected_gradient, sign_step


def spec_attack(f, lower: torch.Tensor, upper: torch.Tensor, Cs: list[torch.Tensor],
                ds: list[torch.Tensor], steps: int = 50, restarts: int = 8, seed: int = 0,
                deadline=None):
    """-> (x, disjunct index, violation) of the best point found, x: [*in_shape].

    ``f``: [N, *in_shape] -> [N, n_out]; ``lower, upper``: [*in_shape];
    ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]`` for each conjunction k.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    K = len(Cs)
    R = max(1, restarts)
    width = (upper - lower)
    rows = max(c.shape[0] for c in Cs)
    n_out = Cs[0].shape[1]
    C = lower.new_zeros(K, rows, n_out)
    d = lower.new_full((K, rows), -torch.inf)  # padding rows never bind
    for k, (c, dd) in enumerate(zip(Cs, ds)):
        C[k, :c.shape[0]] = c
        d[k, :c.shape[0]] = dd
    mask = torch.isfinite(d)
    C = C.repeat_interleave(R, 0)
    d0 = torch.where(mask, d, torch.zeros_like(d)).repeat_interleave(R, 0)
    m = mask.repeat_interleave(R, 0)

    def start(r, gen):
        # the center plus uniform points of the box, for every conjunction
        u = uniform((K, R, *lower.shape), gen, lower.dtype, lower.device)
        u[:, 0] = 0.5
        return {"x": (lower + u * width).reshape(K * R, *lower.shape)}

    def violation(xx):
        y = f(xx).reshape(xx.shape[0], -1)
        v = torch.einsum("nrk,nk->nr", C, y) - d0
        return torch.where(m, v, torch.full_like(v, -torch.inf)).max(dim=1).values

    var = Variable(project=lambda y: torch.maximum(torch.minimum(y, upper), lower),
                   step=sign_step(width * 0.25, halve_every=10))
    run = projected_gradient(lambda xs: violation(xs["x"]), {"x": var}, start, steps,
                             maximize=False, generator=g, deadline=deadline,
                             early_stop=lambda best: bool((best <= 0).any()))
    best_x = run.x["x"]
    with torch.no_grad():
        v = violation(best_x)
    i = int(torch.argmin(v))
    return best_x[i], i // R, float(v[i])
