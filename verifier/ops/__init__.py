"""Bound rules by op kind. Adding an operator = one class here (registered with ``@register``),
one mapping entry in ``verifier.graph.mapping``, one soundness test (see
docs/adding-an-operator.md); every method then asks the rule (``base.QUESTIONS``)."""
from . import (activation, bilinear, domain, elementwise, layernorm, linear, pairwise, pooling,
               reduce, shape, smooth, weights)  # noqa: F401  (registration)
from .base import QUESTIONS, RULES, AffineRule, BoundRule, NotSupported, register

__all__ = ["QUESTIONS", "RULES", "AffineRule", "BoundRule", "NotSupported", "register"]
