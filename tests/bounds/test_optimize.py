"""The one projected-optimizer loop (``verifier.bounds.optimize``): projection into ranges,
best row values kept, patience / early stop / deadline / stop() obeyed."""
from __future__ import annotations

import time

import pytest
import torch

from verifier.bounds.optimize import projected_optimize


def _problem(seed=0, rows=6):
    """Rows ``v_i = -(p_i - z_i)^2`` with ``p`` in [0, 1]: the row optimum is at clamp(z)."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(rows, generator=g)
    p = torch.full((rows,), 0.5, requires_grad=True)
    return z, p, (lambda: (-(p - z) ** 2,))


def test_rows_reach_their_optimum_and_parameters_stay_in_range():
    z, p, objective = _problem()
    seen = []

    def project():
        p.clamp_(0.0, 1.0)
        seen.append(p.detach().clone())

    res = projected_optimize(objective, [p], lambda v, b: -v[0].sum(),
                             (torch.full_like(z, -torch.inf),), ("max",), 200, project=project,
                             lr=0.05)
    optimum = -(z.clamp(0, 1) - z) ** 2
    best, = res.best
    assert res.reason == "iterations" and res.iterations == 200 and len(seen) == 200
    assert all(bool(((s >= 0) & (s <= 1)).all()) for s in seen)
    assert bool((best <= optimum + 1e-6).all())
    assert torch.allclose(best, optimum, atol=1e-3), (best, optimum)


def test_ranges_clamp_and_the_best_never_gets_worse_than_the_initial_one():
    z, p, objective = _problem(1)
    # an initial best above what some rows can reach: kept there (and never lowered)
    init = torch.where(torch.arange(6) % 2 == 0, torch.tensor(1.0), torch.tensor(-1e9))
    res = projected_optimize(objective, [p], lambda v, b: -v[0].sum(), (init,), ("max",), 30,
                             project=[(p, 0.0, 1.0)], lr=0.1)
    best, = res.best
    assert bool(((p >= 0) & (p <= 1)).all())
    assert bool((best >= init).all())
    assert torch.equal(best[::2], init[::2])
    assert init[1] == -1e9  # the caller's tensor is not modified


def test_min_sense_keeps_the_lowest_value():
    p = torch.tensor([2.0], requires_grad=True)
    res = projected_optimize(lambda: (p ** 2,), [p], lambda v, b: v[0].sum(),
                             (torch.tensor([10.0]),), ("min",), 100, project=[(p, 0.5, 3.0)],
                             lr=0.1)
    assert float(res.best[0]) == pytest.approx(0.25, abs=1e-3)
    assert float(p) >= 0.5


def test_patience_stops_a_stalled_loss():
    p = torch.tensor([0.3], requires_grad=True)
    calls = []

    def objective():
        calls.append(1)
        return (0 * p + 1.0,)  # constant: the loss never falls

    res = projected_optimize(objective, [p], lambda v, b: -v[0].sum(), (torch.tensor([0.0]),),
                             ("max",), 100, lr=0.1, patience=4)
    # iteration 1 sets the reference loss, iterations 2..5 stall
    assert res.reason == "patience" and len(calls) == 5 and res.iterations == 5


def test_lr_decay_shrinks_the_steps():
    """Adam's first steps have size ~lr; with ExponentialLR(0.5) step k has size lr 0.5^k."""
    p = torch.tensor([0.0], requires_grad=True)
    trace = []

    def objective():
        trace.append(float(p))
        return (p * 1.0,)

    projected_optimize(objective, [p], lambda v, b: -v[0].sum(), (torch.tensor([-1.0]),),
                       ("max",), 4, lr=0.1, lr_decay=0.5)
    steps = [b - a for a, b in zip(trace, trace[1:])]
    assert steps == pytest.approx([0.1, 0.05, 0.025], rel=1e-3)


def test_early_stop_deadline_and_stop():
    z, p, objective = _problem(2)
    loss = lambda v, b: -v[0].sum()  # noqa: E731
    init = (torch.full_like(z, -torch.inf),)
    res = projected_optimize(objective, [p], loss, init, ("max",), 100, lr=0.05,
                             early_stop=lambda b: bool((b[0] > -50).all()))
    assert res.reason == "early" and res.iterations == 0 and bool((res.best[0] > -50).all())
    res = projected_optimize(objective, [p], loss, init, ("max",), 100, lr=0.05,
                             deadline=time.perf_counter() - 1)
    assert res.reason == "deadline" and res.iterations == 0 and torch.equal(res.best[0], init[0])
    calls = []
    res = projected_optimize(objective, [p], loss, init, ("max",), 100, lr=0.05,
                             stop=lambda: calls.append(1) or len(calls) > 3)
    assert res.reason == "stop" and res.iterations == 3
