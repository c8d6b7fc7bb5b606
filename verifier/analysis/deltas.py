"""Weight deltas: the difference of two models with the same parameters (a fine-tuned, merged
or task-vector copy), and the grid of a symmetric uniform quantization of a model's parameters
(the rounded copy, and the radii that cover every rounding to that grid). The sets of models
they define are certified by ``flatness`` with a ``WeightSegment`` or ``WeightPerturbation``.
"""
from __future__ import annotations

import torch

from ..devices import as_tensor
from ..errors import ShapeError, VerifierError
from ..weights import select_parameters


def parameter_delta(base, other) -> dict:
    """``other - base`` per parameter: ``other`` is a model of the same architecture (a
    ``BoundedModel``) or a dict of parameter values; names and shapes must match."""
    mine = base.parameters()
    theirs = other.parameters() if hasattr(other, "parameters") and not isinstance(other, dict) else other
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise VerifierError(f"parameters {extra} are not in the base model (its parameters: "
                            f"{sorted(mine)})")
    out = {}
    for name, w in mine.items():
        if name in missing:
            continue
        v = as_tensor(theirs[name], w.dtype, w.device)
        if tuple(v.shape) != tuple(w.shape):
            raise ShapeError(f"parameter {name}: shape {list(v.shape)} differs from the base "
                             f"model's {list(w.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise VerifierError(f"parameter {name} of the other model holds NaN or inf")
        d = (v.double() - w.double()).to(w.dtype)
        if bool((d != 0).any()):
            out[name] = d
    return out


def _grid_steps(model, bits, per_channel, params):
    if not 2 <= bits <= 32:
        raise VerifierError(f"bits must lie in [2, 32], got {bits}")
    vals = model.parameters()
    levels = 2 ** (bits - 1) - 1
    for name in select_parameters(vals, params):
        w = vals[name].double()
        if per_channel and w.ndim > 1:
            m = w.abs().flatten(1).amax(1).view(-1, *([1] * (w.ndim - 1)))
        else:
            m = w.abs().max()
        yield name, w, (m / levels).clamp(min=torch.finfo(torch.float64).tiny)


def quantize_parameters(model, bits: int = 8, per_channel: bool = False,
                        params: str | list[str] = "*") -> dict:
    """The round-to-nearest copy of the selected parameters on a symmetric uniform grid of
    ``bits`` bits (step ``max|W| / (2^(bits-1) - 1)``, per tensor or per output channel)."""
    return {name: (torch.round(w / step) * step).to(torch.float32)
            for name, w, step in _grid_steps(model, bits, per_channel, params)}


def quantization_radii(model, bits: int = 8, per_channel: bool = False,
                       params: str | list[str] = "*") -> dict:
    """Per-element radii that cover every rounding of the selected parameters to that grid
    (half a step, plus 2^-20 relative slack for a quantizer that rounds in float32):
    ``WeightPerturbation(None, quantization_radii(m))`` certifies all such copies at once."""
    return {name: (step / 2 * (1 + 2 ** -20)).expand_as(w).clone()
            for name, w, step in _grid_steps(model, bits, per_channel, params)}
