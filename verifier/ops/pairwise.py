"""Pairwise differences along one dim: the first step of softmax and log-softmax.

``softmax(x)_i = 1 / sum_j exp(x_j - x_i)`` and ``log_softmax(x)_i = -log sum_j exp(x_j - x_i)``:
written over the differences ``d_ij = x_j - x_i``, each output is a monotone function of a sum of
convex terms of *one* affine map of ``x`` (the mapping chains ``pairdiff -> exp -> sum ->
reciprocal | log``). The usual form ``exp(x_i) / sum_j exp(x_j)`` multiplies two dependent
perturbed quantities; bounding that product by its factors' boxes loses their dependence, and
``exp(x_i)`` itself is huge where ``x`` is. Here nothing is multiplied, ``d_ii = 0`` exactly, and
CROWN bounds each ``d_ij`` through the layers below as one linear function (a difference of
logits is much tighter than the difference of their boxes).
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from .base import AffineRule, register


@register("pairdiff")
class PairDiff(AffineRule):
    """``y[..., i, j, ...] = x[..., j, ...] - x[..., i, ...]`` with ``i`` at dim ``dim`` of the
    sample and ``j`` inserted after it: ``[*pre, n, *post] -> [*pre, n, n, *post]``; params
    ``dim`` (per-sample, non-negative), ``in_shape``."""

    def _pair(self, node, t, k: int):
        """``t`` with dims ``k`` (i) and ``k + 1`` (j) -> (x_j, x_i) broadcast views."""
        return t.unsqueeze(k), t.unsqueeze(k + 1)

    def point(self, node, inputs):
        (x,) = inputs
        xj, xi = self._pair(node, x, 1 + node.params["dim"])
        return xj - xi

    def interval(self, node, inputs):
        (x,) = inputs
        k = 1 + node.params["dim"]
        lj, li = self._pair(node, x.lower, k)
        uj, ui = self._pair(node, x.upper, k)
        lo, up = lj - ui, uj - li
        # x_i - x_i is 0 whatever x_i is
        n = x.lower.shape[k]
        eye = torch.eye(n, dtype=torch.bool, device=lo.device)
        eye = eye.view(*([1] * k), n, n, *([1] * (lo.ndim - k - 2)))
        return Interval(lo.masked_fill(eye, 0.0), up.masked_fill(eye, 0.0))

    def mirror(self, node):
        """``y[..., j, i, ...] = x_i - x_j = -y[..., i, j, ...]`` (IEEE subtraction is exactly
        antisymmetric): the pairs ``i < j`` are ``own``, their transposes ``partner``; the
        diagonal (0 exactly) is in neither."""
        k = node.params["dim"]
        shape = tuple(node.shape)
        n = shape[k]
        idx = torch.arange(math.prod(shape), device="cpu").view(shape)   # the caller moves them
        upper = torch.ones(n, n, dtype=torch.bool, device="cpu").triu(1)
        upper = upper.view(*([1] * k), n, n, *([1] * (len(shape) - k - 2))).expand(shape)
        return idx[upper], idx.transpose(k, k + 1)[upper]

    def transpose(self, node, A):
        # A: [B, S, *pre, i, j, *post] -> the j-sums go to x_j, minus the i-sums to x_i
        k = 2 + node.params["dim"]
        return [A.sum(k) - A.sum(k + 1)]

    def op_norm(self, node):
        """``sum_ij (x_j - x_i)^2 = 2 n ||x||^2 - 2 (sum x)^2 <= 2 n ||x||^2`` per slice."""
        n = node.params["in_shape"][node.params["dim"]]
        return math.sqrt(2 * n), "sqrt(2 n) (pairwise differences)"
