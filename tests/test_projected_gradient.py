"""The one PGD loop (``verifier.projected_gradient``): optimum reached on problems solved in
closed form, only in-set iterates kept, early stop / deadline / stop() obeyed, seeded restarts."""
from __future__ import annotations

import math
import time

import pytest
import torch

from verifier import LpBall
from verifier.attack import inside, project
from verifier.projected_gradient import Variable, projected_gradient, sign_step


def _box_var(lo, hi, size):
    return Variable(project=lambda y: torch.minimum(torch.maximum(y, lo), hi), step=sign_step(size))


def _ball_var(p: LpBall, size):
    """A variable in an L2 ball (``x: [B, *s]``) with normalized-gradient steps."""
    def step(g, t):
        return size * g / g.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, *[1] * (g.ndim - 1))
    return Variable(project=lambda y: project(p, y.unsqueeze(1)).squeeze(1), step=step,
                    inside=lambda x: inside(p, x.unsqueeze(1)).squeeze(1))


def test_two_variables_reach_the_separable_linear_optimum():
    """max a·x + b·w over x in a box and w in an L2 ball: the optimum is
    a·c_x + sum |a| r + b·c_w + eps ||b||_2 per sample (both terms separate)."""
    g = torch.Generator().manual_seed(0)
    B = 3
    a, b = torch.randn(B, 5, generator=g), torch.randn(B, 4, generator=g)
    cx, r = torch.rand(B, 5, generator=g), 0.1 + torch.rand(B, 5, generator=g)
    cw, eps = torch.randn(B, 4, generator=g), 0.7
    ball = LpBall(cw, eps, 2)
    variables = {"x": _box_var(cx - r, cx + r, r / 4), "w": _ball_var(ball, eps / 4)}
    run = projected_gradient(lambda v: (a * v["x"]).sum(1) + (b * v["w"]).sum(1), variables,
                             lambda i, gen: {"x": cx.clone(), "w": cw.clone()}, steps=40,
                             evaluate_last=True)
    optimum = (a * cx).sum(1) + (a.abs() * r).sum(1) + (b * cw).sum(1) + eps * b.norm(dim=1)
    assert run.value.shape == (B,)
    assert bool((run.value <= optimum + 1e-4).all())
    assert bool((run.value >= optimum - 1e-2 * (1 + optimum.abs())).all()), (run.value, optimum)
    assert bool(((run.x["x"] >= cx - r) & (run.x["x"] <= cx + r)).all())
    assert bool(inside(ball, run.x["w"].unsqueeze(1)).all())


def test_minimizing_with_halving_steps_reaches_the_clamped_point():
    """min ||x - z||^2 over a box with z outside it: the optimum is at clamp(z)."""
    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(4, 6, generator=g)
    lo, hi = -torch.ones(6), torch.ones(6)
    var = Variable(project=lambda y: torch.minimum(torch.maximum(y, lo), hi),
                   step=sign_step((hi - lo) * 0.25, halve_every=10))
    run = projected_gradient(lambda v: ((v["x"] - z) ** 2).sum(1), {"x": var},
                             lambda i, gen: {"x": torch.zeros(4, 6)}, steps=60, maximize=False)
    optimum = ((z.clamp(-1, 1) - z) ** 2).sum(1)
    assert bool((run.value >= optimum - 1e-5).all())
    assert bool((run.value <= optimum + 1e-3).all()), (run.value, optimum)


@pytest.mark.parametrize("norm", [2.0, 1.0])
def test_every_iterate_stays_in_the_clipped_ball(norm):
    """With the exact projection of ``verifier.attack``, every point the objective is evaluated
    at lies in the L2 / L1 ball intersected with the clip box, also from random starts."""
    g = torch.Generator().manual_seed(2)
    c = torch.rand(2, 8, generator=g)
    ball = LpBall(c, 0.6, norm, clip=(0.0, 1.0))
    w = torch.randn(8, generator=g)
    seen = []

    def objective(v):
        seen.append(v["x"].detach().clone())
        return torch.sin(3 * v["x"] * w).sum(-1)

    def step(gr, t):
        return 0.3 * gr / gr.norm(dim=-1, keepdim=True).clamp(min=1e-30)

    var = Variable(project=lambda y: project(ball, y), step=step, inside=lambda x: inside(ball, x))

    def start(i, gen):
        u = torch.rand(2, 5, 8, generator=gen)
        return {"x": project(ball, c.unsqueeze(1) + (u - 0.5))}

    run = projected_gradient(objective, {"x": var}, start, steps=15, restarts=2, seed=3,
                             evaluate_last=True)
    assert len(seen) == 2 * 16
    for x in seen:
        assert bool(inside(ball, x).all())
        assert bool(((x >= 0) & (x <= 1)).all())
        assert bool((torch.linalg.vector_norm(x - c.unsqueeze(1), ord=norm, dim=-1)
                     <= 0.6 * (1 + 1e-5)).all())
    assert bool(inside(ball, run.x["x"]).all())


def test_only_iterates_inside_the_set_become_the_best():
    """A deliberately inexact projection (none) lets the iterates leave |x| <= 1; the best
    point must still be one that ``inside`` accepts, here the last one before leaving."""
    var = Variable(project=lambda y: y, step=sign_step(0.3),
                   inside=lambda x: (x.abs() <= 1).all(-1))
    run = projected_gradient(lambda v: v["x"].sum(-1), {"x": var},
                             lambda i, gen: {"x": torch.zeros(1, 2)}, steps=10, evaluate_last=True)
    assert bool((run.x["x"].abs() <= 1).all())
    assert run.x["x"][0].tolist() == pytest.approx([0.9, 0.9])
    assert run.last["x"][0].tolist() == pytest.approx([3.0, 3.0])


def test_early_stop_ends_the_run_at_the_first_success():
    """Descend x from 1 with steps of 0.1: the value x - 0.45 first gets <= 0 at iteration 6."""
    var = _box_var(torch.tensor(-1.0), torch.tensor(1.0), 0.1)
    run = projected_gradient(lambda v: v["x"][:, 0] - 0.45, {"x": var},
                             lambda i, gen: {"x": torch.ones(1, 1)}, steps=50, maximize=False,
                             early_stop=lambda best: bool((best <= 0).any()))
    assert run.reason == "early"
    assert run.iterations == 7
    assert float(run.value) <= 0 and float(run.x["x"]) == pytest.approx(0.4)


def test_deadline_and_stop_are_obeyed():
    var = _box_var(torch.tensor(-1.0), torch.tensor(1.0), 0.1)
    start = lambda i, gen: {"x": torch.zeros(2, 3)}  # noqa: E731
    past = projected_gradient(lambda v: v["x"].sum(1), {"x": var}, start, steps=20,
                              deadline=time.perf_counter() - 1)
    assert past.reason == "deadline" and past.iterations == 0 and past.value is None
    assert torch.equal(past.x["x"], torch.zeros(2, 3))

    def slow(v):
        time.sleep(0.02)
        return v["x"].sum(1)

    t0 = time.perf_counter()
    soon = projected_gradient(slow, {"x": var}, start, steps=1000, restarts=3,
                              deadline=t0 + 0.2)
    assert soon.reason == "deadline" and 1 <= soon.iterations < 1000
    assert time.perf_counter() - t0 < 0.2 + 0.5

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 4

    run = projected_gradient(lambda v: v["x"].sum(1), {"x": var}, start, steps=20, restarts=2,
                             stop=stop)
    assert run.reason == "stop" and run.iterations == 4 and len(calls) == 5


def test_restarts_draw_from_the_seeded_generator():
    lo, hi = torch.zeros(4), torch.ones(4)
    var = _box_var(lo, hi, 0.05)
    starts = []

    def start(i, gen):
        x = torch.rand(3, 4, generator=gen)
        starts.append(x)
        return {"x": x}

    def run(**kw):
        starts.clear()
        r = projected_gradient(lambda v: torch.cos(5 * v["x"]).sum(1), {"x": var}, start,
                               steps=5, restarts=3, **kw)
        return r, [s.clone() for s in starts]

    a, sa = run(seed=7)
    b, sb = run(seed=7)
    c, sc = run(generator=torch.Generator().manual_seed(7))
    d, sd = run(seed=8)
    assert len(sa) == 3 and not torch.equal(sa[0], sa[1])
    assert all(torch.equal(x, y) for x, y in zip(sa, sb)) and torch.equal(a.value, b.value)
    assert all(torch.equal(x, y) for x, y in zip(sa, sc)) and torch.equal(a.x["x"], c.x["x"])
    assert not torch.equal(sa[0], sd[0])
    # the best over the restarts is at least each restart's start value
    for s in sa:
        assert bool((a.value >= torch.cos(5 * s).sum(1) - 1e-6).all())


def test_without_keep_best_the_last_iterate_is_returned():
    var = _box_var(torch.tensor(-1.0), torch.tensor(1.0), 0.25)
    run = projected_gradient(lambda v: -(v["x"] ** 2).sum(), {"x": var},
                             lambda i, gen: {"x": torch.tensor([[0.5]])}, steps=3, keep_best=False)
    # ascent on -x^2 from 0.5 by sign steps of 0.25: 0.25, 0.0, then 0.0 (sign(0) = 0)
    assert run.value is None and float(run.x["x"]) == 0.0 and not math.isnan(float(run.x["x"]))
