"""Each weight constraint leaves sigma_max <= w_max (checked by exact SVD), under the
precondition its docstring states; the Gram-iteration bound is an upper bound."""
from __future__ import annotations

import math

import pytest
import torch

from verifier.lipschitz.constraints import (CONSTRAINTS, MUON_UPDATE_NORM, ConstraintError,
                                            apply_constraint, gram_norm_bound, spectral_hammer,
                                            spectral_soft_cap, svd_clip)

CAPPED = [c for c in CONSTRAINTS if c != "weight_decay"]
SHAPES = [(40, 30), (12, 50), (64, 3), (1, 20), (25, 25)]


def sigma_max(W):
    return torch.linalg.svdvals(W.double())[0].item()


def random_matrix(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # a spread of singular values: some far above the cap, some below
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    k = min(shape)
    s = torch.logspace(1, -2, k, dtype=torch.float64) * scale
    return (U[:, :k] * s @ V[:, :k].T).float()


@pytest.mark.parametrize("name", CAPPED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_max", [0.5, 1.0, 4.0])
def test_constraint_caps_top_singular_value(name, shape, w_max):
    W = random_matrix(shape, seed=SHAPES.index(shape) + 10 * CAPPED.index(name))
    assert sigma_max(W) > w_max      # there is something to cap
    W2 = apply_constraint(name, W, w_max)
    assert W2.shape == W.shape and W2.dtype == W.dtype
    assert sigma_max(W2) <= w_max * (1 + 1e-5)


@pytest.mark.parametrize("name", CAPPED)
def test_constraint_leaves_a_matrix_below_the_cap_nearly_alone(name):
    W = random_matrix((30, 20), seed=1, scale=0.05)      # sigma_max = 0.5
    W2 = apply_constraint(name, W, 1.0)
    assert sigma_max(W2) <= 1.0
    # normalize/hammer/clip: unchanged; soft cap with the Frobenius bound: at most shrunk
    if name in ("spectral_normalize", "spectral_hammer", "svd_clip"):
        assert torch.equal(W2, W)
    else:
        assert sigma_max(W2) > 0.3


def test_svd_clip_is_the_reference_min_sigma_wmax():
    W = random_matrix((20, 15), seed=2)
    s = torch.linalg.svdvals(W.double())
    s2 = torch.linalg.svdvals(svd_clip(W, 1.0).double())
    assert torch.allclose(s2, s.clamp(max=1.0), atol=1e-5)


def test_hammer_moves_only_the_top_singular_value_when_it_alone_exceeds():
    W = random_matrix((20, 15), seed=3, scale=0.1)               # sigma in [1e-3, 1]
    u, v = torch.randn(20, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    W = (W.double() + 3 * torch.outer(u / u.norm(), v / v.norm())).float()   # a rank-one push
    s = torch.linalg.svdvals(W.double())
    assert s[0] > 1.0 >= s[1]
    s2 = torch.linalg.svdvals(spectral_hammer(W, 1.0).double())
    assert s2[0].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(s2[1:], s[1:], atol=1e-5)


def test_soft_cap_after_a_real_muon_step_holds_with_the_step_coupled_bound():
    torch.manual_seed(0)
    w_max, lr = 1.0, 0.2
    p = torch.nn.Parameter(svd_clip(torch.randn(48, 32), w_max))
    opt = torch.optim.Muon([p], lr=lr, weight_decay=0.0)
    for step in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
        A, B = p.shape
        bound = w_max + MUON_UPDATE_NORM * lr * math.sqrt(max(1, A / B))
        assert sigma_max(p.detach()) <= bound            # the coupling's premise
        assert sigma_max(p.detach()) > w_max             # the step did leave the cap
        with torch.no_grad():
            p.copy_(spectral_soft_cap(p.detach(), w_max, bound))
        assert sigma_max(p.detach()) <= w_max * (1 + 1e-6)


def test_soft_cap_is_soft_small_singular_values_barely_move():
    W = random_matrix((30, 30), seed=4, scale=0.11)       # sigma_max 1.1
    s = torch.linalg.svdvals(W.double())
    s2 = torch.linalg.svdvals(spectral_soft_cap(W, 1.0, 1.1).double())
    small = s < 0.1
    assert torch.allclose(s2[small], s[small], rtol=1e-2)
    assert s2[0] <= 1.0 + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_bound_is_above_and_close_to_sigma_max(shape):
    W = random_matrix(shape, seed=5)
    s = sigma_max(W)
    g = gram_norm_bound(W)
    assert s <= g <= s * 1.01


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConstraintError, match="unknown constraint"):
        apply_constraint("spectral_magic", torch.eye(3), 1.0)
    with pytest.raises(ConstraintError, match="w_max"):
        apply_constraint("svd_clip", torch.eye(3), 0.0)
    with pytest.raises(ConstraintError, match="matrix"):
        apply_constraint("spectral_normalize", torch.ones(2, 3, 4), 1.0)
    with pytest.raises(ConstraintError, match="sigma_bound"):
        spectral_soft_cap(torch.eye(3), 1.0, float("nan"))
