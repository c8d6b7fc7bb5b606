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


@dataclass
class Zonotope(Perturbation):
    """The affine image of a low-dimensional set: ``{x = center + sum_j z_j G_j + d}`` with
    ``z`` in the unit ``norm`` ball of R^k (``inf``: the box ``[-1, 1]^k``, the zonotope proper;
    ``2``, ``1``: an ellipsoid, a cross-polytope) and ``|d| <= slack`` element-wise (zero unless a
    cast to a coarser dtype made room for its rounding, see ``to``).

    ``center: [batch, *shape]``; ``generators``: ``[k, *shape]`` shared by the batch or
    ``[batch, k, *shape]`` (style shifts of a given image are per sample). A linear function
    concretizes exactly through the dual norm of ``G a`` (q: 1/p + 1/q = 1):

        min_x a·x = a·center - ||G a||_q - |a|·slack,

    so on a linear model CROWN's bounds are the exact min and max. The set lies inside its
    bounding box ``center ± (||G_{:,i}||_q + slack_i)`` (``interval``), and every linear bound
    over it is at least as tight as over that box.
    """

    center: torch.Tensor
    generators: torch.Tensor
    norm: float | str = math.inf
    slack: torch.Tensor | None = None

    def __post_init__(self):
        c = as_tensor(self.center)
        if not c.is_floating_point():
            c = c.float()
        G = as_tensor(self.generators, c.dtype, c.device)
        self.norm = parse_norm(self.norm)
        if c.ndim < 1:
            raise PerturbationError("zonotope center needs a batch dimension: [batch, *shape]")
        B, shape = c.shape[0], tuple(c.shape[1:])
        if G.ndim == c.ndim and tuple(G.shape[1:]) == shape:
            G = G.unsqueeze(0).expand(B, *G.shape)
        elif not (G.ndim == c.ndim + 1 and G.shape[0] == B and tuple(G.shape[2:]) == shape):
            raise PerturbationError(
                f"zonotope generators of shape {list(G.shape)} do not fit the center of shape "
                f"{list(c.shape)}: give [k, {', '.join(map(str, shape))}] (shared by the batch) "
                f"or [{B}, k, {', '.join(map(str, shape))}]")
        if G.shape[1] == 0:
            raise PerturbationError("zonotope with no generators (k = 0): use Box(x, x)")
        _check_finite("zonotope center", c)
        _check_finite("zonotope generators", G)
        self.center, self.generators = c, G
        if self.slack is not None:
            s = as_tensor(self.slack, c.dtype, c.device)
            try:
                s = torch.broadcast_to(s, c.shape)
            except RuntimeError:
                raise PerturbationError(f"zonotope slack of shape {list(s.shape)} does not "
                                        f"broadcast to the center's {list(c.shape)}") from None
            _check_finite("zonotope slack", s)
            if (s < 0).any():
                raise PerturbationError("zonotope slack must be >= 0")
            self.slack = s

    @property
    def k(self) -> int:
        """The number of generators (the dimension of z)."""
        return self.generators.shape[1]

    @property
    def dual(self) -> float:
        return {math.inf: 1.0, 2.0: 2.0, 1.0: math.inf}[self.norm]

    def interval(self) -> Interval:
        """The bounding box ``center ± (||G_{:,i}||_q + slack)``, in float64 rounded outwards."""
        c = self.center.double()
        rad = torch.linalg.vector_norm(self.generators.double(), ord=self.dual, dim=1)
        if self.slack is not None:
            rad = rad + self.slack.double()
        dt = self.center.dtype
        return Interval(round_down(c - rad, dt), round_up(c + rad, dt))

    def concretize(self, A, upper):
        Af = A.flatten(2)                                             # [B, S, n]
        c = self.center.flatten(1).unsqueeze(-1).to(Af.dtype)         # [B, n, 1]
        G = self.generators.flatten(2).to(Af.dtype)                   # [B, k, n]
        mid = torch.bmm(Af, c).squeeze(-1)
        GA = torch.bmm(Af, G.transpose(1, 2))                         # [B, S, k]
        dev = torch.linalg.vector_norm(GA, ord=self.dual, dim=-1)
        if self.slack is not None:
            dev = dev + torch.bmm(Af.abs(), self.slack.flatten(1).unsqueeze(-1).to(Af.dtype)
                                  ).squeeze(-1)
        return mid + dev if upper else mid - dev

    def points(self, z: torch.Tensor) -> torch.Tensor:
        """``center + z G`` for ``z: [..., batch, k]`` -> ``[..., batch, *shape]`` (differentiable)."""
        G = self.generators.flatten(2)                                # [B, k, n]
        x = torch.einsum("...bk,bkn->...bn", z.to(G.dtype), G)
        return self.center + x.reshape(*x.shape[:-1], *self.center.shape[1:])

    def z_set(self) -> Perturbation:
        """The set of ``z``: ``Box(-1, 1)`` or the unit Lp ball, ``[batch, k]`` (for attacks)."""
        zero = self.center.new_zeros(self.center.shape[0], self.k)
        if self.norm == math.inf:
            return Box(zero - 1, zero + 1)
        return LpBall(zero, 1.0, self.norm)

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points of the z set per batch element: ``[n, batch, k]``."""
        return self.z_set().sample(n, generator)

    def sample(self, n, generator=None):
        x = self.points(self.sample_z(n, generator))
        if self.slack is not None:
            u = uniform(x.shape, generator, x.dtype, x.device) * 2 - 1
            x = x + u * self.slack
        return x

    def restrict(self, z_lower: torch.Tensor, z_upper: torch.Tensor) -> "Zonotope":
        """The image of the sub-box ``z_lower <= z <= z_upper`` (``[batch, k]``, inside
        ``[-1, 1]^k``; box zonotopes only): center moved to the box's midpoint, generators
        scaled by its half widths."""
        if self.norm != math.inf:
            raise PerturbationError("restrict needs a box zonotope (norm inf)")
        zl = as_tensor(z_lower, self.center.dtype, self.center.device)
        zu = as_tensor(z_upper, self.center.dtype, self.center.device)
        if (zl > zu).any() or (zl < -1).any() or (zu > 1).any():
            raise PerturbationError("restrict: need -1 <= z_lower <= z_upper <= 1")
        zm, zr = (zl + zu) / 2, (zu - zl) / 2
        return Zonotope(self.points(zm), self.generators * zr.view(*zr.shape, *[1] * (
            self.generators.ndim - 2)), self.norm, self.slack)

    def take(self, index: torch.Tensor) -> "Zonotope":
        """The sets of the batch elements ``index``, as one batch."""
        s = None if self.slack is None else self.slack.index_select(0, index)
        return Zonotope(self.center.index_select(0, index),
                        self.generators.index_select(0, index), self.norm, s)

    def to(self, dtype, device=None):
        """Cast outwards: the rounding errors of the center and of every generator go into
        ``slack`` (|Δc| + sum_j |ΔG_j| z-norm-weighted), so the cast set contains the original."""
        c = self.center.to(dtype=dtype, device=device)
        G = self.generators.to(dtype=dtype, device=device)
        if torch.finfo(dtype).bits >= torch.finfo(self.center.dtype).bits:
            s = None if self.slack is None else round_up(self.slack, dtype).to(device)
            return Zonotope(c, G, self.norm, s)
        err = (self.center.double() - c.double().cpu()).abs() + torch.linalg.vector_norm(
            self.generators.double() - G.double().cpu(), ord=self.dual, dim=1)
        if self.slack is not None:
            err = err + self.slack.double()
        return Zonotope(c, G, self.norm, round_up(err, dtype).to(device))

    def __repr__(self) -> str:
        return (f"Zonotope(batch={self.center.shape[0]}, shape={list(self.center.shape[1:])}, "
                f"k={self.k}, norm={self.norm:g})")


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    x = as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    _check_finite("feature map", x)
    return x


def style_shift(x: torch.Tensor, sigma: float, tau: float, about_mean: bool = True) -> Zonotope:
    """Per-channel scale and shift of a feature map ``x: [batch, C, *spatial]`` ("style": the
    per-channel statistics that AdaIN-like shifts move):

        y_c = mu_c + (1 + s_c)(x_c - mu_c) + t_c,   |s_c| <= sigma, |t_c| <= tau,

    with ``mu_c`` the spatial mean of channel c (per sample): the channel's std scales by
    ``1 + s_c`` and its mean moves by ``t_c``. ``about_mean=False`` scales about 0 instead,
    ``y_c = (1 + s_c) x_c + t_c``. Affine in ``z = (s / sigma, t / tau) in [-1, 1]^{2C}``: a
    zonotope with generators ``sigma (x_c - mu_c) e_c`` and ``tau e_c`` (zero ones dropped)."""
    x = _per_sample(x)
    if x.ndim < 2:
        raise PerturbationError(f"style_shift needs [batch, C, *spatial], got {list(x.shape)}")
    if sigma < 0 or tau < 0 or not (math.isfinite(sigma) and math.isfinite(tau)):
        raise PerturbationError(f"sigma and tau must be finite and >= 0, got {sigma}, {tau}")
    B, C = x.shape[:2]
    dims = tuple(range(2, x.ndim))
    base = x - x.mean(dim=dims, keepdim=True) if (about_mean and dims) else x
    eye = torch.eye(C, dtype=x.dtype, device=x.device).view(1, C, C, *[1] * len(dims))       # [1, k=C, C, ...]
    gens = []
    if sigma > 0:
        gens.append(sigma * eye * base.unsqueeze(1))
    if tau > 0:
        gens.append((tau * eye).expand(B, C, *x.shape[1:]))
    if not gens:
        raise PerturbationError("style_shift with sigma = tau = 0 is a single point")
    return Zonotope(x, torch.cat(gens, 1))


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float) -> Zonotope:
    """One brightness and contrast change of a whole image ``x: [batch, *shape]``:
    ``y = mu + (1 + s)(x - mu) + t`` with ``|s| <= contrast``, ``|t| <= brightness``, ``mu`` the
    image's mean (per sample). Two generators: ``contrast (x - mu)`` and ``brightness · 1``.
    (The set is not clipped to a pixel range: clipping is not affine.)"""
    x = _per_sample(x)
    if brightness < 0 or contrast < 0:
        raise PerturbationError(f"brightness and contrast must be >= 0, got {brightness}, {contrast}")
    dims = tuple(range(1, x.ndim))
    gens = []
    if contrast > 0:
        gens.append(contrast * (x - x.mean(dim=dims, keepdim=True)))
    if brightness > 0:
        gens.append(torch.full_like(x, brightness))
    if not gens:
        raise PerturbationError("brightness_contrast with both magnitudes 0 is a single point")
    return Zonotope(x, torch.stack(gens, 1))
