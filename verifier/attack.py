"""Projected gradient ascent (PGD) over the perturbation sets of ``verifier.perturbation``.

For a function ``f: [N, *in_shape] -> [N, *out]`` (flattened to ``[N, K]``), a set ``S_b`` per
sample ``b`` (a ``Box`` or an ``LpBall`` with p = inf, 2, 1, optionally clipped) and objective
weights ``W: [B, M, K]``, ``pgd`` searches for each sample and objective

    x*[b, m] = argmax_{x in S_b}  W[b, m] · f(x)

by gradient steps followed by a projection onto ``S_b``, and keeps the best iterate (the loop is
the package's one PGD, ``verifier.projected_gradient``, re-exported here). It is a
heuristic (a lower bound on the max), used to look for counterexamples and, in the tests, to
confront certified bounds with points that push every bounded quantity to its extremes: maximize
with ``W = C`` and minimize with ``W = -C``.

Projections (exact, up to the bisection's resolution):
- Box, L-inf ball (clipped or not): the set is a box ``[lo, hi]``; project = clamp.
- L2 / L1 ball ``{||x - c||_p <= eps}`` intersected with a clip box ``[lo, hi]`` holding ``c``:
  with ``d = y - c``, the KKT conditions of ``min ||x - y||^2 / 2`` over the intersection give
  ``x(lam) = c + clamp(d / (1 + lam), lo - c, hi - c)`` (p = 2) and
  ``x(lam) = c + clamp(sign(d) * max(|d| - lam, 0), lo - c, hi - c)`` (p = 1: soft threshold),
  for the smallest ``lam >= 0`` with ``||x(lam) - c||_p <= eps``; ``||x(lam) - c||_p`` does not
  increase with ``lam``, so ``lam`` is found by bisection, keeping the feasible end.
Every iterate is checked with ``inside`` (up to a few ulps of rounding); only iterates inside the
set can become the best point, and the best point starts at the center, which lies in the set.
The center of an L2/L1 ball must lie in its clip box (else the intersection may be empty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .devices import as_tensor, normal, uniform
from .errors import PerturbationError
from .perturbation import Box, LpBall, Perturbation, Zonotope
from .projected_gradient import PGDRun, Variable, projected_gradient, sign_step  # noqa: F401

_BISECT_ITERS = 60


@dataclass
class PGDResult:
    """``x: [B, M, *in_shape]`` the best point found per sample and objective (inside the set);
    ``value: [B, M]`` the objective ``W[b, m] · f(x[b, m])`` there."""

    x: torch.Tensor
    value: torch.Tensor


def _geometry(p: Perturbation):
    """-> (center [B, *s], lo [B, *s], hi [B, *s], norm, eps [B] or None).

    For a box-shaped set (Box, L-inf ball) ``lo, hi`` are the set itself and eps is None; for
    L2/L1 they are the clip box (infinite without clip)."""
    if isinstance(p, Box):
        return (p.lower + p.upper) / 2, p.lower, p.upper, math.inf, None
    if not isinstance(p, LpBall):
        raise PerturbationError(f"pgd: unsupported perturbation {type(p).__name__}")
    if p.norm == math.inf:
        box = p.interval()
        return p.center, box.lower, box.upper, math.inf, None
    c = p.center
    if p.clip is None:
        lo = torch.full_like(c, -math.inf)
        hi = torch.full_like(c, math.inf)
    else:
        lo = torch.broadcast_to(p.clip[0].to(device=c.device, dtype=c.dtype), c.shape)
        hi = torch.broadcast_to(p.clip[1].to(device=c.device, dtype=c.dtype), c.shape)
        if ((c < lo) | (c > hi)).any():
            raise PerturbationError("pgd: the ball's center lies outside its clip box")
    eps = as_tensor(p.eps, c.dtype, c.device)
    eps = eps.expand(c.shape[0]) if eps.ndim == 0 else eps.reshape(c.shape[0])
    return c, lo, hi, p.norm, eps


def _bview(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample tensor ``[B, *s]`` (or ``[B]``) viewed against ``x: [B, M, *s]``."""
    if t.ndim == 1:
        return t.view(t.shape[0], *([1] * (x.ndim - 1)))
    return t.unsqueeze(1)


def _mview(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-(sample, objective) tensor ``[B, M]`` viewed against ``x: [B, M, *s]``."""
    return t.view(*t.shape, *([1] * (x.ndim - 2)))


def _pnorm(z: torch.Tensor, p: float) -> torch.Tensor:
    """``||z[b, m]||_p`` over the trailing dims: [B, M, *s] -> [B, M]."""
    return torch.linalg.vector_norm(z.flatten(2), ord=p, dim=-1)


def project(p: Perturbation, x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``x: [B, M, *s]`` onto each sample's set (see the module doc)."""
    c, lo, hi, norm, eps = _geometry(p)
    if eps is None:
        return torch.minimum(torch.maximum(x, _bview(lo, x)), _bview(hi, x))
    cb = _bview(c, x)
    lo_c, hi_c = _bview(lo, x) - cb, _bview(hi, x) - cb
    d = x - cb

    def z_of(lam):  # lam: [B, M]
        lam = _mview(lam, x)
        if norm == 2.0:
            z = d / (1 + lam)
        else:
            z = torch.sign(d) * (d.abs() - lam).clamp(min=0)
        return torch.minimum(torch.maximum(z, lo_c), hi_c)

    e = eps.view(-1, 1).expand(x.shape[0], x.shape[1])
    z0 = z_of(torch.zeros_like(e))
    ok0 = _pnorm(z0, norm) <= e
    if norm == 2.0:  # ||d / (1 + lam)||_2 <= eps from there on
        lam_hi = (_pnorm(d, 2.0) / e.clamp(min=torch.finfo(x.dtype).tiny) - 1).clamp(min=0)
    else:            # the soft threshold zeroes everything from there on
        lam_hi = d.flatten(2).abs().amax(-1)
    lam_lo = torch.zeros_like(lam_hi)
    for _ in range(_BISECT_ITERS):
        mid = (lam_lo + lam_hi) / 2
        feas = _pnorm(z_of(mid), norm) <= e
        lam_hi = torch.where(feas, mid, lam_hi)
        lam_lo = torch.where(feas, lam_lo, mid)
    z = torch.where(_mview(ok0, x), z0, z_of(lam_hi))
    z = torch.where(_mview(e > 0, x), z, torch.zeros_like(z))
    return cb + z


def inside(p: Perturbation, x: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Whether each ``x[b, m]`` (``x: [B, M, *s]``) lies in sample b's set, up to a relative
    rounding tolerance ``rtol`` (default: 16 units in the last place of x's dtype) -> [B, M]."""
    if rtol is None:
        rtol = 16 * torch.finfo(x.dtype).eps
    c, lo, hi, norm, eps = _geometry(p)
    scale = 1 + c.abs().flatten(1).amax(-1).view(-1, 1)
    tol = rtol * scale
    lob, hib = _bview(lo, x), _bview(hi, x)
    tolb = tol.view(tol.shape[0], *([1] * (x.ndim - 1)))
    in_box = ((x >= lob - tolb) & (x <= hib + tolb)).flatten(2).all(-1)
    if eps is None:
        return in_box
    dist = _pnorm(x - _bview(c, x), norm)
    return in_box & (dist <= eps.view(-1, 1) * (1 + rtol) + tol)


def _random_start(p, c, lo, hi, norm, eps, M, gen):
    B, shape = c.shape[0], c.shape[1:]
    dt = c.dtype
    if eps is None:
        u = uniform((B, M, *shape), gen, dt, c.device)
        return _bview(lo, u) + u * (_bview(hi, u) - _bview(lo, u))
    g = normal((B, M, *shape), gen, dt, c.device)
    if norm == 1.0:
        g = torch.sign(g) * -torch.log(uniform(g.shape, gen, dt, c.device).clamp(min=1e-12))
    g = g / _pnorm(g, norm).clamp(min=1e-30).view(B, M, *([1] * len(shape)))
    r = uniform((B, M), gen, dt, c.device) * eps.view(-1, 1)
    return project(p, _bview(c, g) + g * r.view(B, M, *([1] * len(shape))))


def _step(g, norm, alpha, sparsity):
    """The steepest-ascent step of size ``alpha`` for the norm: sign (inf), normalized gradient
    (2), or the sign on the ``sparsity`` fraction of largest |g| coordinates, spread evenly (1)."""
    if norm == math.inf:
        return alpha * torch.sign(g)
    B, M = g.shape[:2]
    view = (B, M, *([1] * (g.ndim - 2)))
    if norm == 2.0:
        return alpha.view(view) * g / _pnorm(g, 2.0).clamp(min=1e-30).view(view)
    flat = g.flatten(2)
    k = max(1, int(math.ceil(sparsity * flat.shape[-1])))
    thr = flat.abs().topk(k, dim=-1).values[..., -1:]
    mask = (flat.abs() >= thr) & (flat != 0)
    cnt = mask.sum(-1, keepdim=True).clamp(min=1)
    s = torch.sign(flat) * mask / cnt
    return alpha.view(view) * s.view_as(g)


def pgd(fn, perturbation: Perturbation, objective_weights: torch.Tensor, steps: int = 20,
        restarts: int = 1, seed: int = 0, step_frac: float = 2.5, l1_sparsity: float = 0.05,
        center_start: bool = True) -> PGDResult:
    """Maximize ``W[b, m] · fn(x)`` over ``x`` in sample b's set, for every b and objective m.

    ``fn: [N, *in_shape] -> [N, *out]`` (differentiable, any N; flattened to ``[N, K]``);
    ``objective_weights``: ``[M, K]`` shared by the batch, or ``[B, M, *out]`` per sample.
    Each restart runs ``steps`` steps of size ``step_frac * radius / steps`` (radius: the
    per-element half width of a box-shaped set, else eps); restart 0 starts at the center, the
    others at random points of the set (generator seeded with ``seed``; with ``center_start``
    False every restart starts at a random point, the same ones as restarts 1, 2, ... would).
    The best iterate over all restarts (and the center) is returned; every returned point lies
    in the set (``inside``).
    """
    c, lo, hi, norm, eps = _geometry(perturbation)
    B, shape = c.shape[0], tuple(c.shape[1:])
    dt = c.dtype
    W = as_tensor(objective_weights, dt, c.device)
    if W.ndim == 2:
        W = W.unsqueeze(0).expand(B, -1, -1)
    elif W.shape[0] == B:
        W = W.reshape(B, W.shape[1], -1)
    else:
        raise ValueError(f"pgd: objective weights of shape {list(W.shape)}: give [M, K] or "
                         f"[B={B}, M, *out]")
    M, K = W.shape[1], W.shape[2]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if eps is None:
        alpha = _bview((hi - lo) / 2, W) * (step_frac / max(1, steps))
    else:
        alpha = (eps * (step_frac / max(1, steps))).view(B, 1).expand(B, M)

    def value(x):
        y = fn(x.reshape(B * M, *shape)).reshape(B, M, -1)
        if y.shape[-1] != K:
            raise ValueError(f"pgd: fn gives {y.shape[-1]} values per point, weights have {K}")
        return (y * W).sum(-1)

    center = c.unsqueeze(1).expand(B, M, *shape)
    with torch.no_grad():
        v0 = value(center)
    var = Variable(project=lambda y: project(perturbation, y),
                   step=lambda g, t: _step(g, norm, alpha, l1_sparsity),
                   inside=lambda x: inside(perturbation, x))

    def start(r, gen):
        if r == 0 and center_start:
            return {"x": center.clone()}
        return {"x": _random_start(perturbation, c, lo, hi, norm, eps, M, gen)}

    run = projected_gradient(lambda xs: value(xs["x"]), {"x": var}, start, steps,
                             restarts=restarts, generator=gen, evaluate_last=True,
                             best=({"x": center.clone()}, v0), finite_only=True)
    return PGDResult(run.x["x"], run.value)


def zonotope_pgd(fn, zonotope: Zonotope, objective_weights: torch.Tensor, steps: int = 20,
                 restarts: int = 1, seed: int = 0, step_frac: float = 2.5) -> PGDResult:
    """``pgd`` over a zonotope's coefficients: maximize ``W[b, m] · fn(center_b + z G_b)`` over
    ``z`` in the unit box (or ball) of R^k, projecting ``z``; -> PGDResult whose ``x`` is the
    best ``z: [B, M, k]`` (``zonotope.points(x.transpose(0, 1))`` gives the points)."""
    B, k = zonotope.center.shape[0], zonotope.k

    def fz(zf):
        z = zf.reshape(B, -1, k)                                    # [B, M, k]
        x = zonotope.points(z.transpose(0, 1)).transpose(0, 1)      # [B, M, *shape]
        return fn(x.reshape(-1, *zonotope.center.shape[1:]))

    return pgd(fz, zonotope.z_set(), objective_weights, steps, restarts, seed, step_frac)
