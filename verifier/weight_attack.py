"""Projected gradient ascent in weight space: a model inside the parameter sets that makes an
objective large. Its value is a lower bound on the objective's maximum over the sets (the
certified upper bound is the other side), and the parameters it returns are a real model.

The variables are the leaves of the lifted graph (``ParameterSets``): one tensor per parameter
ball, or the scalar t of a segment; steps are signed (L-inf, box) or normalized (L2) gradients,
each followed by the exact projection of ``verifier.attack.project``, in the package's one PGD
loop (``verifier.projected_gradient``); the step size decays linearly from 0.27 to 0.02 of the
radius.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attack import inside, project
from .bounds.forward import evaluate
from .devices import uniform
from .perturbation import Box, LpBall
from .projected_gradient import Variable, projected_gradient


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
        u = uniform(c.shape, gen, c.dtype, c.device)
        return p.lower + u * (p.upper - p.lower)
    c = p.center
    if not random:
        return c.clone()
    box = p.interval()
    u = uniform(c.shape, gen, c.dtype, c.device) * 2 - 1
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

    def step_rule(p):
        def step(g, it):
            frac = 0.25 * (1 - it / steps) + 0.02
            if isinstance(p, LpBall) and p.norm == 2.0:
                return _step_size(p, frac) * g / g.norm().clamp(min=1e-30)
            return _step_size(p, frac) * torch.sign(g)
        return step

    variables = {k: Variable(project=lambda y, p=p: project(p, y.unsqueeze(1)).squeeze(1),
                             step=step_rule(p),
                             inside=lambda v, p=p: inside(p, v.unsqueeze(1)).all())
                 for k, p in sets.leaves.items()}
    run = projected_gradient(lambda vs: objective(evaluate(graph, {inp: x, **vs})[0]), variables,
                             lambda r, gen: {k: _start(p, gen, random=r > 0)
                                             for k, p in sets.leaves.items()},
                             steps, restarts=restarts + 1, seed=seed, evaluate_last=True)
    best = run.x
    _, vals = evaluate(graph, {inp: x, **best})
    params = {name: vals[name][0].detach() for name in sets.names}
    return WeightAttackResult(float(run.value), best, params)
