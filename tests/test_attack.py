"""verifier.attack: projections are exact Euclidean projections, every returned point lies in the
set, and PGD reaches the closed-form maximum of linear objectives."""
from __future__ import annotations

import math

import pytest
import torch

from verifier import Box, LpBall, PerturbationError
from verifier.attack import inside, pgd, project

NORMS = ["inf", 2, 1]
CLIPS = [None, (0.0, 1.0)]


def _ball(norm, clip, B=3, shape=(2, 5), seed=0, per_sample=True):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand((B, *shape), generator=g, dtype=torch.float64) * 0.8 + 0.1
    eps = torch.tensor([0.05, 0.4, 1.5], dtype=torch.float64)[:B] if per_sample else 0.3
    return LpBall(c, eps, norm, clip)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clip", CLIPS)
def test_projection_is_the_euclidean_projection(norm, clip):
    """x = P(y) iff x is in the set and <y - x, q - x> <= 0 for every q in the set (the set is
    convex); checked against random and boundary points q, and P is idempotent."""
    p = _ball(norm, clip)
    g = torch.Generator().manual_seed(1)
    y = p.center.unsqueeze(1) + 2 * torch.randn((3, 9, 2, 5), generator=g, dtype=torch.float64)
    x = project(p, y)
    assert bool(inside(p, x).all())
    q = p.sample(300, generator=g).transpose(0, 1)                    # [B, 300, *s]
    q = torch.cat([q, project(p, p.center.unsqueeze(1) + 5 * torch.randn(
        (3, 50, 2, 5), generator=g, dtype=torch.float64))], 1)
    vi = torch.einsum("bmk,bmqk->bmq", (y - x).flatten(2),
                      (q.unsqueeze(1) - x.unsqueeze(2)).flatten(3))
    assert vi.max().item() <= 1e-9
    assert torch.allclose(project(p, x), x, atol=1e-9)
    inner = p.center.unsqueeze(1) + 0.001 * (y - p.center.unsqueeze(1))
    if clip is not None:
        inner = inner.clamp(0, 1)
    assert torch.allclose(project(p, inner), inner, atol=1e-12)   # points inside stay


@pytest.mark.parametrize("norm", [2, 1])
def test_projection_without_clip_matches_closed_form(norm):
    p = _ball(norm, None)
    y = p.center.unsqueeze(1) + 3 * torch.randn((3, 4, 2, 5), dtype=torch.float64)
    x = project(p, y)
    d = (y - p.center.unsqueeze(1)).flatten(2)
    e = p.eps.view(3, 1, 1)
    if norm == 2:
        want = d * torch.clamp(e / d.norm(dim=-1, keepdim=True), max=1)
    else:  # the L1 projection: a soft threshold at the lam solving sum(max(|d| - lam, 0)) = eps
        a = d.abs().sort(dim=-1, descending=True).values
        cs = a.cumsum(-1) - e
        k = torch.arange(1, a.shape[-1] + 1, dtype=a.dtype)
        rho = ((a - cs / k) > 0).sum(-1, keepdim=True)
        lam = cs.gather(-1, rho - 1) / rho
        want = torch.where(d.abs().sum(-1, keepdim=True) <= e, d,
                           d.sign() * (d.abs() - lam).clamp(min=0))
    assert torch.allclose((x - p.center.unsqueeze(1)).flatten(2), want, atol=1e-9)


def test_inside_rejects_outside_points():
    p = _ball(2, (0.0, 1.0), per_sample=False)
    x = p.center.unsqueeze(1).repeat(1, 2, 1, 1)
    x[:, 1, 0, 0] = 1.5                                  # outside the clip box
    assert inside(p, x).tolist() == [[True, False]] * 3
    b = Box(torch.zeros(1, 3), torch.ones(1, 3))
    assert inside(b, torch.tensor([[[0.5, 1.0, 0.0], [0.5, 1.01, 0.0]]])).tolist() == [[True, False]]


def test_project_rejects_center_outside_clip():
    p = LpBall(torch.full((1, 3), 2.0), 0.1, 2, (0.0, 1.0))
    with pytest.raises(PerturbationError):
        project(p, torch.zeros(1, 1, 3))


def _closed_form_max(p, w):
    """max over the unclipped ball (or box) of w·x: w·c + eps ||w||_q; w: [M, K]."""
    if isinstance(p, Box):
        c, r = (p.lower + p.upper) / 2, (p.upper - p.lower) / 2
        return c.flatten(1) @ w.t() + r.flatten(1) @ w.abs().t()
    q = {math.inf: 1, 2.0: 2, 1.0: math.inf}[p.norm]
    eps = p.eps.view(-1, 1) if isinstance(p.eps, torch.Tensor) else p.eps
    return p.center.flatten(1) @ w.t() + eps * torch.linalg.vector_norm(w, ord=q, dim=-1)


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_reaches_linear_optimum(norm):
    p = _ball(norm, None)
    g = torch.Generator().manual_seed(3)
    w = torch.randn((4, 10), generator=g, dtype=torch.float64)
    W = torch.cat([w, -w])
    res = pgd(lambda z: z.flatten(1), p, W, steps=40, restarts=2)
    want = _closed_form_max(p, W)
    assert bool(inside(p, res.x).all())
    assert bool((res.value <= want + 1e-9).all())
    rel = 0.03 if norm == 1 else 1e-3    # the sparse L1 step spreads mass over the top coords
    gap = (want - res.value) / (want - (p.center.flatten(1) @ W.t())).clamp(min=1e-12)
    assert gap.max().item() <= rel


def test_pgd_on_box_reaches_vertex_and_uses_per_sample_weights():
    lo = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = Box(lo, lo + torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64))
    W = torch.tensor([[[1.0, -1.0, 3.0]], [[-2.0, 1.0, 0.0]]], dtype=torch.float64)   # [B, 1, K]
    res = pgd(lambda z: z, b, W, steps=20)
    assert torch.allclose(res.value, torch.tensor([[1.0 + 0 + 6.0], [0.0 + 0.5]], dtype=torch.float64))
    assert bool(inside(b, res.x).all())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clip", CLIPS)
def test_pgd_points_stay_inside_for_nonlinear_objectives(norm, clip):
    p = _ball(norm, clip, B=2, shape=(6,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    W = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    res = pgd(net, p, W, steps=15, restarts=3, seed=5)
    assert res.x.shape == (2, 6, 6) and res.value.shape == (2, 6)
    assert bool(inside(p, res.x).all())
    with torch.no_grad():
        y = net(res.x.flatten(0, 1)).view(2, 6, 3)
    assert torch.allclose((y * W.unsqueeze(0)).sum(-1), res.value)
    with torch.no_grad():   # at least as good as the center and as random samples
        yc = net(p.center)
        ys = net(p.sample(64).flatten(0, 1)).view(64, 2, 3)
    base = torch.cat([yc, -yc], 1)
    samp = torch.cat([ys, -ys], 2).amax(0)
    assert bool((res.value >= base - 1e-12).all())
    assert bool((res.value >= samp - 1e-3).all())


def test_per_element_eps_for_linf():
    c = torch.zeros(2, 3, 2, dtype=torch.float64)
    eps = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(1, 3, 1)
    p = LpBall(c, eps, "inf")
    res = pgd(lambda z: z.flatten(1), p, torch.eye(6, dtype=torch.float64), steps=10)
    want = eps.expand(2, 3, 2).reshape(2, 6)
    assert torch.allclose(res.value, want)


def test_random_only_restarts_are_the_center_runs_later_restarts():
    """``center_start=False``: every restart starts at a random point, and R - 1 such restarts
    make exactly the calls that restarts 1 .. R-1 of a center-started run of R make (a caller
    that has already attacked from the center does not pay for it again)."""
    p = _ball("inf", (0.0, 1.0))
    W = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def recorder():
        calls = []

        def fn(x):
            calls.append(x.detach().clone())
            return torch.tanh(x.flatten(1) * 3)
        return calls, fn

    with_center, f1 = recorder()
    pgd(f1, p, W, steps=4, restarts=3, seed=5)
    random_only, f2 = recorder()
    res = pgd(f2, p, W, steps=4, restarts=2, seed=5, center_start=False)
    per_restart = (len(with_center) - 1) // 3            # the center's value first, then each restart
    assert len(random_only) == 1 + 2 * per_restart
    assert all(torch.equal(a, b) for a, b in zip(random_only[1:], with_center[1 + per_restart:]))
    center = p.center.unsqueeze(1).expand(3, 3, 2, 5).reshape(9, 2, 5)
    assert torch.equal(with_center[1], center)             # restart 0 of the default run ...
    assert not torch.equal(random_only[1], center)          # ... and of the random-only one
    assert bool(inside(p, res.x).all())
