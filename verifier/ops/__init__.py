"""Bound rules by op kind. Adding an operator = one class here (registered with ``@register``),
one mapping in ``verifier.graph.trace``, one soundness test."""
from . import activation, elementwise, linear, pooling, shape, weights  # noqa: F401  (registration)
from .base import RULES, AffineRule, BoundRule, register

__all__ = ["RULES", "AffineRule", "BoundRule", "register"]
