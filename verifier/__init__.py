"""Certified robustness verification by bound propagation over computational graphs.

The public names are imported lazily (PEP 562), so that ``import verifier.errors`` or the
``verifier --help`` command line does not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (DomainError, ModelLoadError, PerturbationError, ShapeError,
                     UnsupportedOpsError, VerifierError)
from .lazy import lazy_attributes

_LAZY = {
    "BoundedModel": ".api", "BoundResult": ".api", "margin_spec": ".api",
    "Interval": ".bound_types",
    "Box": ".perturbation", "LpBall": ".perturbation", "Zonotope": ".perturbation",
}

__all__ = ["BoundedModel", "BoundResult", "Box", "DomainError", "Interval", "LpBall", "ModelLoadError",
           "PerturbationError", "ShapeError", "UnsupportedOpsError", "VerifierError", "Zonotope",
           "margin_spec"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import BoundedModel, BoundResult, margin_spec
    from .bound_types import Interval
    from .perturbation import Box, LpBall, Zonotope


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
