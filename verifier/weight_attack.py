"""Projected gradient ascent in weight space: a model inside the parameter sets that makes an
objective large. Its value is a lower bound on the objective's maximum over the sets (the
certified upper bound is the other side), and the parameters it returns are a real model.

The variables are the leaves of the lifted graph (``ParameterSets``): one tensor per parameter
ball, or the scalar t of a segment; steps are signed (L-inf, box) or normalized (L2) gradients,
each followed by the exact projection of ``verifier.attack.project``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attack import inside, project
from .bound_types import Interval
from .bounds.forward import evaluate
from .perturbation import Box, LpBall


@dataclass
class WeightAttackResult:
    value: float                       # the objective at ``leaves`` (the best found)
    leaves: dict[str, torch.Tensor]    # leaf name -> value [1, *shape], inside its set
    params: dict[str, torch.Tensor]    # parameter name -> value (stored layout)


def _start(p, gen, random: bool):
    if isinstance(p, Box):
        c = (p.lower + p.upper) / 2
        if not random:
            return c.clone()
        u = torch.rand(c.shape, generator=gen, dtype=c.dtype)
        return p.lower + u * (p.upper - p.lower)
    c = p.center
    if not random:
        return c.clone()
    box = p.interval()
    u = torch.rand(c.shape, generator=gen, dtype=c.dtype) * 2 - 1
    return project(p, (c + u * box.radius).unsqueeze(1)).squeeze(1)


def _step_size(p, frac: float):
    if isinstance(p, LpBall) and p.norm != math.inf:
        return frac * float(p._eps_t.reshape(-1)[0])
    return frac * p.interval().radius


def weight_pgd(sets, x: torch.Tensor, objective, steps: int = 40, restarts: int = 2,
               seed: int = 0) -> WeightAttackResult:
    """Maximize ``objective(out)`` (a scalar from the lifted graph's output on the fixed input
    ``x: [B, *in]``) over the parameter sets ``sets`` (a ``ParameterSets``)."""
    graph = sets.graph
    inp = graph.leaves[0]
    gen = torch.Generator().manual_seed(seed)
    best_v, best = -math.inf, None
    for r in range(restarts + 1):
        cur = {k: _start(p, gen, random=r > 0) for k, p in sets.leaves.items()}
        for it in range(steps + 1):
            vs = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
            out, _ = evaluate(graph, {inp: x, **vs})
            val = objective(out)
            if val.item() > best_v and all(bool(inside(sets.leaves[k], v.detach().unsqueeze(1)).all())
                                           for k, v in vs.items()):
                best_v, best = val.item(), {k: v.detach().clone() for k, v in vs.items()}
            if it == steps:
                break
            grads = torch.autograd.grad(val, list(vs.values()), allow_unused=True)
            frac = 0.25 * (1 - it / steps) + 0.02
            with torch.no_grad():
                for (k, v), g in zip(vs.items(), grads):
                    if g is None:
                        continue
                    p = sets.leaves[k]
                    if isinstance(p, LpBall) and p.norm == 2.0:
                        step = _step_size(p, frac) * g / g.norm().clamp(min=1e-30)
                    else:
                        step = _step_size(p, frac) * torch.sign(g)
                    cur[k] = project(p, (v + step).unsqueeze(1)).squeeze(1)
    _, vals = evaluate(graph, {inp: x, **best})
    params = {name: vals[name][0].detach() for name in sets.names}
    return WeightAttackResult(best_v, best, params)
