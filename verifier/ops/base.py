"""The bound-rule interface and the registry of rules by op kind.

A rule answers, for one node:
1. ``interval(node, inputs)``: IBP, from the intervals of its perturbed inputs;
2. ``backward(node, A_lower, A_upper, inputs)``: CROWN, turning linear bounds on the node's value
   (``A: [B, S, *node.shape]``) into linear bounds on each perturbed input, plus the bias
   (``[B, S]``) that the relaxation adds. ``inputs`` are the inputs' intervals when the rule
   ``needs_bounds`` (a nonlinear relaxation), else None.
"""
from __future__ import annotations

import torch

from ..bound_types import Interval

RULES: dict[str, "BoundRule"] = {}


def register(op: str):
    """Class decorator: one registry line per rule."""
    def deco(cls):
        RULES[op] = cls()
        cls.op = op
        return cls
    return deco


class BoundRule:
    op: str = ""
    needs_bounds = False  # backward uses the inputs' intervals (nonlinear relaxations)
    sign_only = False     # the relaxation depends only on which neurons are unstable (ReLU-like)
    affine = False        # the node is affine in its inputs (IBP with a spec merges into it)

    def interval(self, node, inputs: list[Interval]) -> Interval:
        raise NotImplementedError

    def point(self, node, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The node's value at a point (differentiable; attacks and replays of the graph): the
        interval rule on degenerate intervals, unless a rule has a cheaper exact form."""
        return self.interval(node, [Interval(x, x) for x in inputs]).lower

    def backward(self, node, A_lower, A_upper, inputs):
        """-> ([(A_lower_i, A_upper_i) per input], bias_lower, bias_upper)."""
        raise NotImplementedError


class AffineRule(BoundRule):
    """A rule for y = L(x_1, ..., x_k) + b: the same map acts on the lower and upper A."""

    affine = True

    def transpose(self, node, A: torch.Tensor) -> list[torch.Tensor]:
        """``A·L``: the A of each input. A: [B, S, *node.shape]."""
        raise NotImplementedError

    def bias(self, node, A: torch.Tensor):
        """``A·b``: [B, S], or 0.0 when the map has no constant part."""
        return 0.0

    def backward(self, node, A_lower, A_upper, inputs):
        if A_upper is A_lower:
            lo = self.transpose(node, A_lower)
            b_lo = self.bias(node, A_lower)
            return [(a, a) for a in lo], b_lo, b_lo
        # one call on both (concatenated along the spec dim): kernels such as the transposed
        # convolution cost about the same for twice the rows
        S = A_lower.shape[1]
        A = stacked(A_lower, A_upper)
        both = self.transpose(node, A)
        b = self.bias(node, A)
        b_lo, b_up = (b[:, :S], b[:, S:]) if isinstance(b, torch.Tensor) else (b, b)
        return [(a[:, :S], a[:, S:]) for a in both], b_lo, b_up


def stacked(A_lower: torch.Tensor, A_upper: torch.Tensor) -> torch.Tensor:
    """``cat([A_lower, A_upper], 1)``: a view, without copying, when the two are the halves of
    one tensor ``[B, 2S, ...]`` (as ``ElementwiseRelaxation.backward`` returns them)."""
    S = A_lower.shape[1]
    # never under autograd: the view is of A_lower alone, so no gradient would reach A_upper
    tracked = torch.is_grad_enabled() and (A_lower.requires_grad or A_upper.requires_grad)
    if (not tracked and A_lower.shape == A_upper.shape and A_lower.stride() == A_upper.stride()
            and A_lower.untyped_storage().data_ptr() == A_upper.untyped_storage().data_ptr()
            and A_upper.data_ptr() - A_lower.data_ptr() == S * A_lower.stride(1) * A_lower.element_size()):
        return A_lower.as_strided((A_lower.shape[0], 2 * S, *A_lower.shape[2:]), A_lower.stride())
    return torch.cat([A_lower, A_upper], 1)


def unbroadcast(A: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Sum ``A: [B, S, *out]`` down to ``[B, S, *shape]`` where ``shape`` broadcast to ``out``."""
    out = A.shape[2:]
    extra = len(out) - len(shape)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, (s, o) in enumerate(zip(shape, A.shape[2:])) if s == 1 and o != 1)
    if dims:
        A = A.sum(dim=dims, keepdim=True)
    return A


def dot(A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_x A[b, s, x] * t[b?, x]`` with ``t`` broadcast to the node shape -> [B, S]."""
    if t.ndim == A.ndim - 1:  # t carries the batch: [B, *shape]
        t = t.unsqueeze(1)
    return (A * t).flatten(2).sum(-1)


def pos_neg(A: torch.Tensor):
    return A.clamp(min=0), A.clamp(max=0)
