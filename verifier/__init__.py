"""Certified robustness verification by bound propagation over computational graphs.

The public names are imported lazily (PEP 562), so that ``import verifier.errors`` or the
``verifier --help`` command line does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (DomainError, ModelLoadError, PerturbationError, ShapeError,
                     UnsupportedOpsError, VerifierError)

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
