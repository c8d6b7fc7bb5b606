"""Guaranteed upper bounds on the L2 operator norm (spectral norm) of single layers.

Power iteration alone gives a *lower* bound on sigma_max (it evaluates ||W v|| / ||v|| at some
v). Every function here returns a number that is provably >= the true norm:

* ``dense_norm``: exact SVD (``torch.linalg.svdvals``) in float64. LAPACK's SVD is backward
  stable: the computed sigma_max is within ``c · n · eps64 · ||W||`` of the true one, far below
  the relative margin ``SAFETY = 1e-6`` we multiply by. Above ``MAX_SVD`` entries the
  Gram-iteration bound (``gram_norm_bound``) is used instead.
* ``conv_norm``: a 2-D (or 1-D) zero-padded convolution is the restriction of a *circular*
  convolution on the padded grid (size n + 2p per spatial dim): embed the input in a zero border,
  convolve circularly (no index wraps around, since the kernel's extent fits inside the padded
  grid), then keep the strided outputs. Restrictions and zero embeddings do not increase the
  norm, so ``||conv|| <= ||circular conv||``, and the norm of a circular convolution is exact by
  the FFT: ``max over frequencies w of sigma_max(K_hat(w))`` with ``K_hat(w)`` the
  ``[c_out, c_in]`` matrix of the kernel's 2-D DFT (Sedghi et al., 2019). This bound is exact
  for circular padding and a safe upper bound for zero padding. When the dense operator is small
  (<= ``MAX_DENSE`` entries) we also take its exact SVD and keep the smaller of the two.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


SAFETY = 1e-6            # relative margin for rounding in the float64 SVD / FFT
MAX_SVD = 4_000_000      # entries of a dense matrix for an exact SVD; above: Gram iteration
MAX_DENSE = 2_000_000    # entries of a convolution's dense operator for an exact SVD


def dense_norm(W: torch.Tensor) -> float:
    """An upper bound on sigma_max of a matrix ``W: [out, in]`` (exact SVD + margin)."""
    W = W.detach().double().reshape(W.shape[0], -1)
    if W.numel() == 0:
        return 0.0
    if W.numel() <= MAX_SVD:
        return torch.linalg.svdvals(W)[0].item() * (1 + SAFETY)
    return gram_norm_bound(W) * (1 + SAFETY)


def _full_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel ``[c_out, c_in / groups, *k]`` as the dense ``[c_out, c_in, *k]``."""
    if groups == 1:
        return weight
    c_out, cg = weight.shape[:2]
    og = c_out // groups
    full = weight.new_zeros(c_out, cg * groups, *weight.shape[2:])
    for g in range(groups):
        full[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = weight[g * og:(g + 1) * og]
    return full


def conv_fft_norm(weight: torch.Tensor, in_spatial, padding, dilation, groups: int = 1) -> float:
    """The circular-convolution bound of the module doc (exact for circular padding)."""
    w = _full_weight(weight.detach().double(), groups)
    nd = w.ndim - 2
    grid = [int(n) + 2 * int(p) for n, p in zip(in_spatial, padding)]
    extent = [int(d) * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:])]
    grid = [max(g, e) for g, e in zip(grid, extent)]
    dil = w.new_zeros(*w.shape[:2], *extent)
    dil[(slice(None), slice(None), *[slice(None, None, int(d)) for d in dilation])] = w
    K = torch.fft.fftn(dil, s=grid, dim=tuple(range(2, 2 + nd)))      # [c_out, c_in, *grid]
    K = K.permute(*range(2, 2 + nd), 0, 1).reshape(-1, w.shape[0], w.shape[1])
    return torch.linalg.matrix_norm(K, ord=2).max().item() * (1 + SAFETY)


def conv_dense_norm(weight, in_shape, stride, padding, dilation, groups) -> float:
    """Exact SVD of the convolution's dense matrix (built by convolving the identity basis)."""
    w = weight.detach().double()
    n_in = math.prod(in_shape)
    conv = F.conv2d if w.ndim == 4 else F.conv1d
    eye = torch.eye(n_in, dtype=torch.float64, device=w.device).reshape(n_in, *in_shape)
    cols = conv(eye, w, None, stride, padding, dilation, groups).reshape(n_in, -1)
    return torch.linalg.svdvals(cols)[0].item() * (1 + SAFETY)


def conv_norm(weight, in_shape, out_shape, stride, padding, dilation, groups=1
              ) -> tuple[float, str]:
    """-> (an upper bound on the L2 norm of the zero-padded convolution, how it was made);
    ``in_shape``, ``out_shape``: per-sample ``[C, *spatial]``."""
    bound = conv_fft_norm(weight, in_shape[1:], padding, dilation, groups)
    how = "fft (circular conv on the padded grid)"
    if math.prod(in_shape) * math.prod(out_shape) <= MAX_DENSE:
        exact = conv_dense_norm(weight, in_shape, stride, padding, dilation, groups)
        if exact < bound:
            bound, how = exact, "exact SVD of the dense operator"
    return bound, how


def window_overlap(kernel, stride, dilation) -> int:
    """The most windows of a pooling / convolution that one input element falls into: per dim
    ``min(k, floor((k - 1) d / s) + 1)`` (window i covers p only if i s <= p <= i s + (k-1) d,
    and each window covers p at most once), multiplied over the dims."""
    return math.prod(min(k, (k - 1) * d // s + 1) for k, s, d in zip(kernel, stride, dilation))


def selection_norm(index: torch.Tensor, n_in: int) -> float:
    """Norm of ``y = x[index]`` (index -1: a constant): sqrt of the most copies of one entry."""
    idx = index.reshape(-1)
    idx = idx[idx >= 0]
    if idx.numel() == 0:
        return 0.0
    return math.sqrt(int(torch.bincount(idx, minlength=n_in).max()))


def gram_norm_bound(W: torch.Tensor, iters: int = 10) -> float:
    """A guaranteed upper bound on sigma_max(W) by Gram iteration (Delattre et al., 2023):
    with G_0 = W, G_{k+1} = G_k^T G_k, sigma_max(W)^(2^k) = sigma_max(G_k) <= ||G_k||_F, so
    sigma_max(W) <= ||G_k||_F^(2^-k). Each G_k is rescaled by its Frobenius norm (tracked in
    log space) so nothing overflows; float64, with a relative margin of 1e-9 for rounding.
    Its excess over sigma_max is at most rank^(2^-(k+1)) (1.003 for rank 256 at k = 10)."""
    G = W.double()
    if G.shape[0] < G.shape[1]:
        G = G.mT
    if G.shape[1] > 0 and G.shape[0] > G.shape[1]:
        G = G.mT @ G  # the smaller Gram matrix first: sigma_max(W)^2 = sigma_max(W^T W)
        return math.sqrt(gram_norm_bound(G, iters - 1) if iters > 1 else G.norm().item())
    log_scale = 0.0
    for k in range(iters):
        f = G.norm().item()
        if f == 0:
            return 0.0
        G = G / f
        log_scale += math.log(f) / 2 ** k
        G = G.mT @ G
    f = G.norm().item()
    if f == 0:
        return 0.0
    return math.exp(log_scale + math.log(f) / 2 ** iters) * (1 + 1e-9)
