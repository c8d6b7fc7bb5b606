"""verifier.perturbation: ``concretize`` is sound (never above the true min of A·x over the set,
never below the max) and, without clipping, exact (the dual-norm maximizer attains it); the
bounding box contains the set; ``sample`` stays inside; eps shapes (scalar, per sample, per
channel / per element for L-inf) mean what the docstring says."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import extreme_points
from verifier import Box, LpBall, PerturbationError
from verifier.attack import inside, pgd

NORMS = ["inf", 2, 1]


def _ball(norm, clip, eps=None, B=3, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand((B, *shape), generator=g, dtype=torch.float64)
    if clip is not None:                       # centers inside the clip box
        c = clip[0] + c * (clip[1] - clip[0])
    eps = torch.tensor([0.02, 0.3, 1.2], dtype=torch.float64)[:B] if eps is None else eps
    return LpBall(c, eps, norm, clip)


def _values(p, A, n=400, seed=0):
    """A·x at random, boundary and PGD points: [n, B, S] (min side and max side)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([p.sample(n, generator=g), extreme_points(p, n, g)])        # [n, B, *s]
    vals = torch.einsum("bsk,nbk->nbs", A.flatten(2), x.flatten(2))
    W = torch.cat([A.flatten(2), -A.flatten(2)], 1)
    res = pgd(lambda z: z.flatten(1), p, W, steps=30, restarts=2)
    S = A.shape[1]
    return vals, res.value[:, :S], -res.value[:, S:]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clip", [None, (0.0, 1.0), (0.1, 0.6)])
def test_concretize_is_sound(norm, clip):
    p = _ball(norm, clip)
    A = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    lo, up = p.concretize(A, upper=False), p.concretize(A, upper=True)
    vals, vmax, vmin = _values(p, A)
    tol = 1e-10
    assert bool((vals >= lo - tol).all()) and bool((vals <= up + tol).all())
    assert bool((vmin >= lo - tol).all()) and bool((vmax <= up + tol).all())


@pytest.mark.parametrize("norm", NORMS)
def test_concretize_without_clip_is_attained(norm):
    """min A·x = A·c - eps ||A||_q is attained at the dual-norm maximizer."""
    p = _ball(norm, None)
    A = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    lo, up = p.concretize(A, upper=False), p.concretize(A, upper=True)
    Af = A.flatten(2)
    eps = p.eps.view(3, 1, 1)
    if norm == "inf":
        d = eps * Af.sign()
    elif norm == 2:
        d = eps * Af / Af.norm(dim=-1, keepdim=True)
    else:
        i = Af.abs().argmax(-1, keepdim=True)
        d = eps * torch.zeros_like(Af).scatter(-1, i, Af.gather(-1, i).sign())
    x_max = p.center.flatten(1).unsqueeze(1) + d                  # [B, S, K]
    assert bool(inside(p, x_max.view(3, 4, 2, 3)).all())
    torch.testing.assert_close(up, (Af * x_max).sum(-1))
    torch.testing.assert_close(lo, (Af * (2 * p.center.flatten(1).unsqueeze(1) - x_max)).sum(-1))


def test_box_concretize_exact_and_sound():
    lo = torch.randn(2, 4, dtype=torch.float64)
    b = Box(lo, lo + torch.rand(2, 4, dtype=torch.float64))
    A = torch.randn(2, 3, 4, dtype=torch.float64)
    vert = torch.where(A > 0, b.upper.unsqueeze(1), b.lower.unsqueeze(1))
    torch.testing.assert_close(b.concretize(A, upper=True), (A * vert).sum(-1))
    vals, vmax, vmin = _values(b, A)
    assert bool((vals <= b.concretize(A, True) + 1e-12).all())
    assert bool((vals >= b.concretize(A, False) - 1e-12).all())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_interval_contains_samples_and_samples_inside(norm, clip):
    p = _ball(norm, clip)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([p.sample(300, generator=g), extreme_points(p, 100, g)])
    assert bool(inside(p, x.transpose(0, 1)).all())
    box = p.interval()
    assert bool((x >= box.lower).all()) and bool((x <= box.upper).all())


def test_per_sample_eps_for_linf_is_per_sample():
    """A [batch] eps tensor means one radius per sample for every norm, whatever the shape."""
    c = torch.zeros(3, 5)
    eps = torch.tensor([0.1, 0.2, 0.3])
    box = LpBall(c, eps, "inf").interval()
    torch.testing.assert_close(box.upper, eps.view(3, 1).expand(3, 5))
    c4 = torch.zeros(3, 2, 4, 4)
    box = LpBall(c4, eps, "inf").interval()
    torch.testing.assert_close(box.upper, eps.view(3, 1, 1, 1).expand(3, 2, 4, 4))
    for norm in (2, 1):
        A = torch.ones(3, 1, 5)
        up = LpBall(c, eps, norm).concretize(A, upper=True)
        q = {2: math.sqrt(5), 1: 1.0}[norm]
        torch.testing.assert_close(up, (eps * q).view(3, 1))


def test_per_channel_eps_for_linf():
    c = torch.zeros(2, 3, 2, 2)
    eps = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    box = LpBall(c, eps, "inf").interval()
    torch.testing.assert_close(box.upper[1, :, 0, 0], eps.flatten())
    with pytest.raises(PerturbationError):
        LpBall(c, eps, 2)          # per-element radii only for L-inf
    with pytest.raises(PerturbationError):
        LpBall(c, torch.ones(4, 1, 1), "inf")


@pytest.mark.parametrize("bad", [
    lambda: LpBall(torch.zeros(1, 2), -0.1),
    lambda: LpBall(torch.zeros(1, 2), 0.1, 3),
    lambda: LpBall(torch.zeros(1, 2), 0.1, "inf", (1.0, 0.0)),
    lambda: LpBall(torch.tensor([[float("nan"), 0.0]]), 0.1),
    lambda: Box(torch.ones(1, 2), torch.zeros(1, 2)),
    lambda: Box(torch.zeros(1, 2), torch.zeros(1, 3)),
])
def test_invalid_sets_raise(bad):
    with pytest.raises(PerturbationError):
        bad()
