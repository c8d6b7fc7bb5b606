"""Certified robustness verification by bound propagation over computational graphs."""
from .api import BoundedModel, BoundResult, margin_spec
from .bound_types import Interval
from .errors import (ModelLoadError, PerturbationError, ShapeError, UnsupportedOpsError,
                     VerifierError)
from .perturbation import Box, LpBall

__all__ = ["BoundedModel", "BoundResult", "Box", "Interval", "LpBall", "ModelLoadError",
           "PerturbationError", "ShapeError", "UnsupportedOpsError", "VerifierError", "margin_spec"]
