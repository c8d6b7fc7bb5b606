"""Perturbation sets on leaves, each able to give its bounding box (for IBP) and to concretize a
linear bound over itself (for CROWN) through the dual norm:

    min_{x in B_p(x0, eps)} A·x = A·x0 - eps·||A||_q,   1/p + 1/q = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .shapes import broadcast_shapes
from .bound_types import Interval, concretize_interval
from .devices import as_tensor, normal, uniform
from .errors import PerturbationError

_NORMS = {"inf": math.inf, "2": 2.0, "1": 1.0}


def parse_norm(p) -> float:
    """Accept inf, 2, 1 (numbers or strings such as 'inf', 'linf', 'l2')."""
    if isinstance(p, str):
        key = p.lower().lstrip("l")
        if key not in _NORMS:
            raise PerturbationError(f"unknown norm {p!r}: use inf, 2 or 1")
        return _NORMS[key]
    p = float(p)
    if p not in (math.inf, 2.0, 1.0):
        raise PerturbationError(f"unsupported norm p={p}: use inf, 2 or 1")
    return p


def round_down(t, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` rounded towards -inf (the cast never moves a lower end inwards)."""
    t = as_tensor(t)
    if not t.is_floating_point():
        t = t.double()
    r = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return r
    return torch.where(r.to(t.dtype) > t, torch.nextafter(r, torch.full_like(r, -torch.inf)), r)


def round_up(t, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` rounded towards +inf."""
    return -round_down(-as_tensor(t), dtype)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise PerturbationError(f"{name} holds NaN or infinite values")


class Perturbation:
    """A set of values a leaf may take. Subclasses give ``interval()`` and ``concretize()``."""

    def interval(self) -> Interval:
        raise NotImplementedError

    def concretize(self, A: torch.Tensor, upper: bool) -> torch.Tensor:
        """min (upper=False) or max (upper=True) of ``A·x`` over the set; A: [B, S, *shape] -> [B, S]."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self.interval().lower.shape[0]

    def to(self, dtype: torch.dtype, device=None) -> "Perturbation":
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points of the set per batch element: [n, B, *shape] (for tests and attacks)."""
        raise NotImplementedError


@dataclass
class Box(Perturbation):
    """The box ``lower <= x <= upper`` (element-wise); both ``[batch, *shape]``."""

    lower: torch.Tensor
    upper: torch.Tensor

    def __post_init__(self):
        self.lower = as_tensor(self.lower)
        self.upper = as_tensor(self.upper, device=self.lower.device)
        if not self.lower.is_floating_point():
            self.lower = self.lower.float()
        self.upper = self.upper.to(self.lower.dtype)
        if self.lower.shape != self.upper.shape:
            raise PerturbationError(
                f"box lower and upper differ in shape: {tuple(self.lower.shape)} vs {tuple(self.upper.shape)}")
        _check_finite("box lower", self.lower)
        _check_finite("box upper", self.upper)
        bad = self.lower > self.upper
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise PerturbationError(
                f"box lower > upper at flat index {i} ({self.lower.flatten()[i].item()} > "
                f"{self.upper.flatten()[i].item()})")

    def interval(self) -> Interval:
        return Interval(self.lower, self.upper)

    def concretize(self, A, upper):
        return concretize_interval(A, self.interval(), upper)

    def to(self, dtype, device=None):
        """Cast outwards: the cast box contains the original one."""
        return Box(round_down(self.lower, dtype).to(device), round_up(self.upper, dtype).to(device))

    def sample(self, n, generator=None):
        u = uniform((n, *self.lower.shape), generator, self.lower.dtype, self.lower.device)
        return self.lower + u * (self.upper - self.lower)

    def take(self, index: torch.Tensor) -> "Box":
        """The boxes of the batch elements ``index`` (with repeats), as one batch."""
        out = Box.__new__(Box)  # a sub-batch of a checked box needs no second check
        out.lower = self.lower.index_select(0, index)
        out.upper = self.upper.index_select(0, index)
        return out


@dataclass
class LpBall(Perturbation):
    """``{x : ||x - center||_p <= eps}``, optionally intersected with the box ``clip = (lo, hi)``.

    ``center: [batch, *shape]``; ``eps``: a number, a ``[batch]`` tensor, or (p = inf only) a
    tensor broadcastable to ``center`` (per-element radii, e.g. per channel after normalization).
    """

    center: torch.Tensor
    eps: float | torch.Tensor
    norm: float | str = math.inf
    clip: tuple | None = None
    _eps_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.center = as_tensor(self.center)
        if not self.center.is_floating_point():
            self.center = self.center.float()
        self.norm = parse_norm(self.norm)
        _check_finite("center", self.center)
        # rounded up: a float32 radius never describes a smaller ball than the one asked for
        eps = round_up(as_tensor(self.eps, torch.float64, self.center.device)
                       if not isinstance(self.eps, torch.Tensor) else self.eps.to(self.center.device),
                       self.center.dtype)
        _check_finite("eps", eps)
        if (eps < 0).any():
            raise PerturbationError(f"eps must be >= 0, got {self.eps}")
        B = self.center.shape[0]
        if eps.ndim == 0:
            self._eps_t = eps.expand(B)
        elif eps.ndim == 1 and eps.shape[0] == B:  # one radius per sample (any norm)
            self._eps_t = eps
        elif self.norm == math.inf:
            try:
                broadcast_shapes(eps.shape, self.center.shape)
            except RuntimeError:
                raise PerturbationError(
                    f"eps of shape {tuple(eps.shape)} does not broadcast to the input's shape "
                    f"{tuple(self.center.shape)}") from None
            self._eps_t = eps
        else:
            raise PerturbationError(
                f"for the L{self.norm:g} norm eps must be a number or one value per sample "
                f"(shape [{B}]), got shape {tuple(eps.shape)}")
        if self.clip is not None:
            lo, hi = self.clip
            lo = round_down(as_tensor(lo, torch.float64, self.center.device) if not isinstance(lo, torch.Tensor)
                            else lo.to(self.center.device), self.center.dtype)
            hi = round_up(as_tensor(hi, torch.float64, self.center.device) if not isinstance(hi, torch.Tensor)
                          else hi.to(self.center.device), self.center.dtype)
            if (lo > hi).any():
                raise PerturbationError(f"clip range is empty: lo={self.clip[0]} > hi={self.clip[1]}")
            self.clip = (lo, hi)

    def _eps_elementwise(self) -> torch.Tensor:
        """eps broadcastable against center."""
        e = self._eps_t
        if e.ndim == 1 and e.shape[0] == self.center.shape[0] and self.center.ndim > 1:
            return e.view(-1, *([1] * (self.center.ndim - 1)))
        return e

    def interval(self) -> Interval:
        """The bounding box, rounded outwards (center -/+ eps in float64, then cast)."""
        e = self._eps_elementwise()
        dt = self.center.dtype
        lo = round_down(self.center.double() - e.double(), dt)
        hi = round_up(self.center.double() + e.double(), dt)
        if self.clip is not None:
            lo = torch.maximum(lo, self.clip[0])
            hi = torch.minimum(hi, self.clip[1])
            hi = torch.maximum(hi, lo)  # a center outside the clip box: keep the box non-empty
        return Interval(lo.expand_as(self.center), hi.expand_as(self.center))

    def concretize(self, A, upper):
        if self.norm == math.inf:
            # the (clipped) L-inf ball is exactly a box
            return concretize_interval(A, self.interval(), upper)
        Af = A.flatten(2)
        c = self.center.flatten(1).unsqueeze(-1)
        # a center of batch 1 is a set shared by the batch (a parameter's ball)
        mid = (torch.bmm(Af, c) if c.shape[0] == Af.shape[0] else torch.matmul(Af, c)).squeeze(-1)
        q = 2.0 if self.norm == 2.0 else math.inf
        dual = torch.linalg.vector_norm(Af, ord=q, dim=-1)
        dev = self._eps_t.view(-1, 1) * dual
        val = mid + dev if upper else mid - dev
        if self.clip is not None:
            # the set lies in its bounding box too: both bounds are sound, keep the tighter
            box = concretize_interval(A, self.interval(), upper)
            val = torch.minimum(val, box) if upper else torch.maximum(val, box)
        return val

    def to(self, dtype, device=None):
        """Cast outwards: the radius grows by the center's rounding error (and rounds up), the
        clip box rounds outwards, so the cast set contains the original one."""
        clip = None if self.clip is None else (round_down(self.clip[0], dtype).to(device),
                                               round_up(self.clip[1], dtype).to(device))
        center = self.center.to(dtype=dtype, device=device)
        err = (self.center.double() - center.double()).abs()
        eps = self._eps_elementwise().double()
        if self.norm == math.inf:
            eps = eps + err
        else:
            eps = eps.reshape(-1) + torch.linalg.vector_norm(err.flatten(1), ord=self.norm, dim=1)
        return LpBall(center, round_up(eps, dtype).to(device), self.norm, clip)

    def sample(self, n, generator=None):
        """Points in the ball (for L2/L1, then clipped: clipping keeps L-inf points inside, and
        for L2/L1 we rescale to the ball first so points stay inside the clipped set only when
        projected; tests use the returned points as they are, all inside the set)."""
        shape = (n, *self.center.shape)
        dt = self.center.dtype
        e = self._eps_elementwise()
        if self.norm == math.inf:
            d = (uniform(shape, generator, dt, self.center.device) * 2 - 1) * e
        else:
            g = normal(shape, generator, dt, self.center.device)
            if self.norm == 1.0:
                g = torch.sign(g) * torch.distributions.Exponential(g.new_ones(())).sample(shape)
            flat = g.flatten(2)
            nrm = torch.linalg.vector_norm(flat, ord=self.norm, dim=-1, keepdim=True)
            r = uniform((n, self.center.shape[0], 1), generator, dt, self.center.device)
            d = (flat / nrm * r).view(shape) * self._eps_elementwise()
        x = self.center + d
        if self.clip is not None:
            # clipping moves a point towards the box, never away from the center, so an L2/L1
            # point stays inside the ball as well as inside the box
            x = torch.minimum(torch.maximum(x, self.clip[0]), self.clip[1])
        return x
