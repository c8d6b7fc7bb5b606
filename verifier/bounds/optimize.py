"""One projected-optimizer loop for the optimized relaxations (alpha slopes, beta multipliers).

Every value of the relaxation parameters in their ranges gives a sound bound, so any iterate
may be kept: the loop runs an optimizer (Adam by default) on ``params``, and after each step
projects them back into their ranges; the best value of every row seen is kept. One iteration:

    values = objective()                        # tuple of row tensors, e.g. (lower, upper)
    best_i = max(best_i, values_i)  or  min(...)  per ``senses[i]`` ("max" / "min")
    stop if early_stop(best)
    loss(values, best).backward(); optimizer step; learning-rate step (``lr_decay``: an
                                                   ExponentialLR factor); projection
    stop after ``patience`` iterations in a row whose loss did not fall by more than
    ``tol * (1 + |previous loss|)``

and it stops before an iteration once ``time.perf_counter() > deadline`` or ``stop()`` is true.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..projected_gradient import halted


@dataclass
class OptimizeResult:
    """``best``: the best value of each row seen, one tensor per objective value;
    ``iterations``: optimizer steps taken; ``reason``: "iterations", "early", "patience",
    "deadline", "stop"."""

    best: tuple
    iterations: int
    reason: str


def clamp_ranges(ranges: Sequence[tuple]) -> Callable[[], None]:
    """A projection clamping each ``(tensor, lo, hi)`` in place into ``[lo, hi]`` (either None:
    unbounded on that side)."""
    def project():
        for t, lo, hi in ranges:
            t.clamp_(lo, hi)
    return project


def projected_optimize(objective: Callable[[], tuple], params, loss: Callable, best: Sequence,
                       senses: Sequence[str], iterations: int, *,
                       project: Callable[[], None] | Sequence[tuple] = (), lr: float | None = None,
                       optimizer=torch.optim.Adam, lr_decay: float | None = None,
                       patience: int | None = None, tol: float = 1e-6,
                       early_stop: Callable[[tuple], bool] | None = None,
                       deadline: float | None = None, stop: Callable[[], bool] | None = None
                       ) -> OptimizeResult:
    """Run the loop of the module doc. ``params``: tensors or optimizer parameter groups
    (dicts with their own ``lr``); ``lr``: the optimizer's learning rate (None: the groups');
    ``best``: the initial best rows (not modified); ``loss(values, best) -> scalar``;
    ``project``: a callable, or ``(tensor, lo, hi)`` ranges to clamp into."""
    if not callable(project):
        project = clamp_ranges(project)
    opt = optimizer(params, lr=lr) if lr is not None else optimizer(params)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay) if lr_decay is not None else None
    best = tuple(b.clone() for b in best)
    stall, last, reason, taken = 0, None, "iterations", 0
    with torch.enable_grad():
        for _ in range(iterations):
            halt = halted(deadline, stop)
            if halt:
                reason = halt
                break
            values = objective()
            best = tuple(torch.maximum(b, v.detach()) if s == "max" else torch.minimum(b, v.detach())
                         for b, v, s in zip(best, values, senses))
            if early_stop is not None and early_stop(best):
                reason = "early"
                break
            value = loss(values, best)
            opt.zero_grad()
            value.backward()
            opt.step()
            taken += 1
            if sched is not None:
                sched.step()
            with torch.no_grad():
                project()
            if patience is not None:
                value = float(value.detach())
                if last is not None and value > last - tol * (1 + abs(last)):
                    stall += 1
                    if stall >= patience:
                        reason = "patience"
                        break
                else:
                    stall = 0
                last = value
    return OptimizeResult(best, taken, reason)
