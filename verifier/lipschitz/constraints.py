"""Weight constraints for Lipschitz-constrained training, applied after every optimizer step.

Each constraint is a function ``W -> W'`` of one weight matrix ``W: [out, in]`` (a convolution
kernel is handled by the caller through its ``[out, in*kh*kw]`` reshape) that states, in its
docstring, the map it applies to the singular values ``sigma_i`` of ``W = U diag(sigma) V^T``
and what it guarantees about ``sigma_max(W')``. The ideas follow Newhouse et al. (2025),
"Training Transformers with Enforced Lipschitz Constants"; the polynomials and their proofs
here are our own.

Odd polynomials act on singular values: ``W (W^T W)^k = U diag(sigma^(2k+1)) V^T``, so
``p(W) = a W + b W W^T W`` maps each ``sigma`` to ``a sigma + b sigma^3`` with the same singular
vectors, using matrix products only (no SVD, no power iteration).

Numerics: the SVD-based constraints work in float64 and cast back; the cast can move a singular
value by a relative ~1e-7 (float32). Certificates never rely on a constraint having held: they
recompute every norm from the stored weights (``verifier.analysis.lipschitz``).
"""
from __future__ import annotations

import math

import torch

from ..errors import VerifierError
from ..ops.norms import gram_norm_bound

# sup over x in [0, 1] of Newton-Schulz's 5-step quintic (3.4445, -4.775, 2.0315), which
# torch.optim.Muon applies to the Frobenius-normalized update: 1.2024 on a grid of 2e6 points;
# rounded up to 1.25. A Muon update thus has spectral norm <= 1.25 * adjusted lr.
MUON_UPDATE_NORM = 1.25


class ConstraintError(VerifierError):
    """A constraint asked for with invalid arguments (unknown name, w_max <= 0, not a matrix)."""


def _check(W: torch.Tensor, w_max: float) -> None:
    if W.ndim != 2:
        raise ConstraintError(f"a weight constraint needs a matrix, got shape {list(W.shape)}")
    if not (w_max > 0 and math.isfinite(w_max)):
        raise ConstraintError(f"w_max must be a positive number, got {w_max}")


def spectral_normalize(W: torch.Tensor, w_max: float) -> torch.Tensor:
    """``W / max(1, sigma_max(W) / w_max)``: every sigma scaled by the same factor.

    sigma_max(W) by exact SVD (float64), so sigma_max(W') <= w_max (up to the float cast).
    """
    _check(W, w_max)
    s = torch.linalg.matrix_norm(W.double(), ord=2).item()
    return W if s <= w_max else (W.double() * (w_max / s)).to(W.dtype)


def spectral_hammer(W: torch.Tensor, w_max: float) -> torch.Tensor:
    """Set the top singular value to w_max: ``W - (sigma_1 - w_max) u_1 v_1^T`` when
    sigma_1 > w_max (a rank-one correction; the other sigma_i are untouched).

    It enforces sigma_max <= w_max when at most one singular value exceeds w_max (low stable-rank
    updates, e.g. AdamW's). When sigma_2 > w_max too (Muon's full-rank updates), the result is
    then scaled by ``w_max / sigma_2`` (spectral normalization) so the guarantee always holds.
    """
    _check(W, w_max)
    Wd = W.double()
    U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
    if S[0] <= w_max:
        return W
    Wd = Wd - (S[0] - w_max) * torch.outer(U[:, 0], Vh[0])
    if S.numel() > 1 and S[1] > w_max:
        Wd = Wd * (w_max / S[1].item())
    return Wd.to(W.dtype)


def svd_clip(W: torch.Tensor, w_max: float) -> torch.Tensor:
    """The reference: ``U diag(min(sigma, w_max)) V^T`` by exact SVD (float64); the closest
    matrix (in every unitarily invariant norm) with sigma_max <= w_max."""
    _check(W, w_max)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    if S[0] <= w_max:
        return W
    return ((U * S.clamp(max=w_max)) @ Vh).to(W.dtype)


def _cubic(W: torch.Tensor, c: float, s: float) -> torch.Tensor:
    """sigma -> sigma - c sigma^3 / s^2 (an odd cubic; for c <= 1/3 increasing on [0, s])."""
    return W - (c / (s * s)) * (W @ (W.mT @ W)) if W.shape[0] >= W.shape[1] else \
        W - (c / (s * s)) * ((W @ W.mT) @ W)


def spectral_soft_cap(W: torch.Tensor, w_max: float, sigma_bound: float) -> torch.Tensor:
    """Odd cubic steps that map [0, sigma_bound] into [0, w_max], using matrix products only.

    Given ``sigma_max(W) <= s`` (``s = sigma_bound``, for instance ``w_max + ||step||_2``: after a
    Muon step of adjusted learning rate eta from a matrix that met the cap, ``s = w_max + 1.25
    eta``; this is how the cap is coupled to the optimizer's step size), each step applies
    ``p_c(sigma) = sigma - c sigma^3 / m^2`` with m the current bound. For c <= 1/3, p_c is
    increasing on [0, m] (p_c' = 1 - 3c sigma^2/m^2 >= 0) and positive, so it maps [0, m] onto
    [0, (1 - c) m]: steps with c = 1/3 shrink the bound by 2/3 until one last step with
    ``c = 1 - w_max / m`` lands on w_max exactly. Hence sigma_max(W') <= w_max, and singular
    values well below the bound barely move (relative change c sigma^2 / m^2): a *soft* cap.
    The guarantee needs ``sigma_bound >= sigma_max(W)``; ``||W||_F`` is always such a bound.
    """
    _check(W, w_max)
    s = float(sigma_bound)
    if not (s > 0 and math.isfinite(s)):
        raise ConstraintError(f"sigma_bound must be a positive number, got {sigma_bound}")
    if s <= w_max:
        return W
    Wd = W.double()
    while s > 1.5 * w_max:
        Wd, s = _cubic(Wd, 1.0 / 3.0, s), s * 2.0 / 3.0
    Wd = _cubic(Wd, 1.0 - w_max / s, s)
    return Wd.to(W.dtype)


def _msign(M: torch.Tensor, steps: int) -> torch.Tensor:
    """The polar factor U V^T of M approximated by the cubic Newton-Schulz iteration
    X -> 1.5 X - 0.5 X X^T X (sigma -> 1.5 sigma - 0.5 sigma^3, which drives every sigma in
    (0, sqrt(3)) to 1), started from M / ||M||_F."""
    X = M / M.norm().clamp(min=1e-300)
    for _ in range(steps):
        X = 1.5 * X - 0.5 * (X @ (X.mT @ X) if X.shape[0] >= X.shape[1] else (X @ X.mT) @ X)
    return X


def spectral_hard_cap(W: torch.Tensor, w_max: float, steps: int = 12) -> torch.Tensor:
    """A polynomial approximation of ``sigma -> min(sigma, w_max)``, then a guaranteed cap.

    With O = U V^T (the polar factor) and M = W - w_max O = U diag(sigma - w_max) V^T,
    ``min(sigma, w_max) = (sigma + w_max - |sigma - w_max|) / 2``, and the matrix with singular
    values |sigma - w_max| is ``M msign(M)^T O``. Both polar factors are approximated by
    ``steps`` cubic Newton-Schulz iterations (polynomials in W). Where an approximation is
    unresolved (sigma near 0 or near w_max) the result can sit slightly above w_max, so a
    Gram-iteration upper bound g of sigma_max(W') (``gram_norm_bound``) is taken and W' is
    scaled by ``w_max / g`` when g > w_max: sigma_max(W') <= w_max always holds.
    """
    _check(W, w_max)
    Wd = W.double()
    if gram_norm_bound(Wd) <= w_max:
        return W
    O = _msign(Wd, steps)
    M = Wd - w_max * O
    Wc = 0.5 * (Wd + w_max * O - (M @ _msign(M, steps).mT) @ O)
    g = gram_norm_bound(Wc)
    if g > w_max:
        Wc = Wc * (w_max / g)
    return Wc.to(W.dtype)


CONSTRAINTS = ("spectral_normalize", "spectral_hammer", "spectral_soft_cap", "spectral_hard_cap",
               "svd_clip", "weight_decay")


def apply_constraint(name: str, W: torch.Tensor, w_max: float,
                     sigma_bound: float | None = None) -> torch.Tensor:
    """Apply the constraint ``name`` (one of ``CONSTRAINTS``) to the matrix W.

    ``sigma_bound``: a known upper bound on sigma_max(W), used by the soft cap (default and
    always clipped to ``||W||_F``). ``weight_decay`` is the unconstrained baseline (the decay is
    the optimizer's): W is returned unchanged and nothing is guaranteed.
    """
    if name == "weight_decay":
        return W
    if name == "spectral_soft_cap":
        fro = torch.linalg.matrix_norm(W.double()).item() * (1 + 1e-9)
        s = fro if sigma_bound is None else min(float(sigma_bound), fro)
        return spectral_soft_cap(W, w_max, s)
    fns = {"spectral_normalize": spectral_normalize, "spectral_hammer": spectral_hammer,
           "spectral_hard_cap": spectral_hard_cap, "svd_clip": svd_clip}
    if name not in fns:
        raise ConstraintError(f"unknown constraint {name!r}: use one of {', '.join(CONSTRAINTS)}")
    return fns[name](W, w_max)
