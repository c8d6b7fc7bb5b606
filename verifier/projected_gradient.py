"""One projected-gradient loop (PGD) for every attack of the package.

The variables are a dict ``x = {name: x_name}`` (input points, weight leaves, the scalar of a
weight segment, ...), each with a projection ``P_name`` onto its set and a step rule; the
objective maps them to per-candidate values ``v = objective(x)`` of any shape ``[*cand]`` (a
0-dim tensor for one candidate): margin rows, a conjunction's violation, a weight objective, a
training cross-entropy. Each restart ``r`` runs

    x^0 = start(r),   x^{t+1}_name = P_name(x^t_name ± step_name(g^t_name, t)),
    g^t = d sum(v(x^t)) / d x^t,

(``+`` to maximize, ``-`` to minimize; a variable the objective does not read keeps its value)
for ``steps`` steps, and the best iterate of every candidate over all restarts is kept: only an
iterate that lies in every variable's set (``Variable.inside``; None when the projection is
exact, e.g. a clamp) and, with ``finite_only``, has a finite value can become the best. The
iterates are evaluated at t = 0 .. steps - 1, and also at t = steps with ``evaluate_last``.

Within an iteration the order is: ``deadline`` (a ``time.perf_counter()`` value) and ``stop()``
checks (either ends the whole run), evaluation, best update, ``early_stop(best_value)`` check,
step and projection. Random starts draw from one generator (``generator``, else one seeded
with ``seed``; neither: torch's global generator), passed to ``start(r, generator)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch



def halted(deadline: float | None, stop: Callable[[], bool] | None) -> str | None:
    """Why a loop must end now: "deadline" (past the ``time.perf_counter()`` value), "stop"
    (``stop()`` is true), or None to go on. Every iterative loop (attacks, optimizers) asks it."""
    if deadline is not None and time.perf_counter() > deadline:
        return "deadline"
    if stop is not None and stop():
        return "stop"
    return None

@dataclass
class Variable:
    """One variable of the search: ``project(y)`` maps a point to its set; ``step(g, t)`` is
    the ascent step for the gradient ``g`` at iteration ``t`` (sign / normalized gradient times
    a step size, e.g. ``sign_step``); ``inside(x)``: a bool mask over the candidates
    (broadcastable to the objective's values) of the iterates that lie in the set, or None when
    ``project`` is exact and every iterate counts."""

    project: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[torch.Tensor, int], torch.Tensor]
    inside: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class PGDRun:
    """``x``: the best iterate of each candidate (the last one without ``keep_best``);
    ``value``: its objective ``[*cand]`` (None if nothing was evaluated); ``last``: the last
    iterate; ``iterations``: evaluations done; ``reason``: "steps", "early", "deadline", "stop"."""

    x: dict
    value: torch.Tensor | None
    last: dict
    iterations: int
    reason: str


def sign_step(size, halve_every: int | None = None) -> Callable:
    """``(g, t) -> size_t * sign(g)``, ``size_t = size * 0.5 ** (t // halve_every)`` (a
    constant size without ``halve_every``); ``size``: a number or a tensor broadcastable to g."""
    def step(g, t):
        s = size if halve_every is None or t < halve_every else size * 0.5 ** (t // halve_every)
        return s * torch.sign(g)
    return step


def _expand(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A candidate mask ``[*cand]`` viewed against a variable ``[*cand, *shape]``."""
    return mask.view(*mask.shape, *([1] * (x.ndim - mask.ndim)))


def projected_gradient(objective: Callable[[dict], torch.Tensor], variables: dict[str, Variable],
                       start: Callable, steps: int, *, restarts: int = 1, maximize: bool = True,
                       seed: int | None = 0, generator: torch.Generator | None = None,
                       evaluate_last: bool = False, keep_best: bool = True,
                       best: tuple[dict, torch.Tensor] | None = None, finite_only: bool = False,
                       early_stop: Callable[[torch.Tensor], bool] | None = None,
                       deadline: float | None = None, stop: Callable[[], bool] | None = None
                       ) -> PGDRun:
    """Run PGD (see the module doc). ``start(r, generator) -> {name: x^0}`` for restart r;
    ``best``: an initial (point, value) that iterates must beat (else the first start with
    value -inf for maximizing, +inf for minimizing, set at the first evaluation)."""
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    names = list(variables)
    best_x, best_v = (dict(best[0]), best[1]) if best is not None else (None, None)
    x, it, reason = None, 0, "steps"
    for r in range(restarts):
        x = {k: v.detach() for k, v in start(r, generator).items()}
        if best_x is None:
            best_x = {k: v.clone() for k, v in x.items()}
        for t in range(steps + 1 if evaluate_last else steps):
            halt = halted(deadline, stop)
            if halt:
                reason = halt
                break
            it += 1
            grads = None
            if t < steps:
                with torch.enable_grad():
                    xs = {k: x[k].detach().requires_grad_(True) for k in names}
                    v = objective(xs)
                    grads = torch.autograd.grad(v.sum() if v.ndim else v, [xs[k] for k in names],
                                                allow_unused=True)
            else:
                with torch.no_grad():
                    v = objective(x)
            with torch.no_grad():
                v = v.detach()
                if keep_best:
                    if best_v is None:
                        best_v = torch.full_like(v, -torch.inf if maximize else torch.inf)
                    better = v > best_v if maximize else v < best_v
                    if finite_only:
                        better = better & torch.isfinite(v)
                    for k in names:
                        if variables[k].inside is not None:
                            better = better & variables[k].inside(x[k])
                    best_v = torch.where(better, v, best_v)
                    best_x = {k: torch.where(_expand(better, x[k]), x[k], best_x[k]) for k in names}
                    if early_stop is not None and early_stop(best_v):
                        return PGDRun(best_x, best_v, x, it, "early")
                if grads is not None:
                    new = {}
                    for k, g in zip(names, grads):
                        if g is None:
                            new[k] = x[k]
                            continue
                        s = variables[k].step(g, t)
                        new[k] = variables[k].project(x[k] + s if maximize else x[k] - s)
                    x = new
        if reason != "steps":
            break
    if not keep_best:
        return PGDRun(x, None, x, it, reason)
    return PGDRun(best_x, best_v, x, it, reason)
