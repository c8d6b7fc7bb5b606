"""Schedules over training steps: eps ramp-up and the mixing weights (kappa, beta).

Training runs ``warmup`` epochs with eps = 0 (natural training), then ramps eps from 0 to its
target over ``ramp`` epochs, then holds it. The ramp is per step (``t`` in [0, 1] across the
ramp's steps) and either linear, ``s(t) = t``, or smooth, ``s(t) = 3t^2 - 2t^3`` (zero slope at
both ends: eps starts growing slowly, when the bounds are most fragile, and settles gently).
The same progress ``s`` mixes the losses:

    eps   = eps_target * s
    kappa = kappa_start + (kappa_end - kappa_start) * s    loss = kappa*natural + (1-kappa)*robust
    beta  = beta_start + (beta_end - beta_start) * s        lower = beta*CROWN-IBP + (1-beta)*IBP
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    eps: float
    warmup_epochs: int
    ramp_epochs: int
    steps_per_epoch: int
    shape: str = "smooth"          # "smooth" | "linear"
    kappa: tuple[float, float] = (1.0, 0.0)
    beta: tuple[float, float] = (1.0, 0.0)

    def progress(self, epoch: int, step: int) -> float:
        """s in [0, 1] at ``step`` (0-based) of ``epoch`` (0-based); 0 during the warm-up."""
        if epoch < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs <= 0:
            return 1.0
        total = self.ramp_epochs * self.steps_per_epoch
        done = (epoch - self.warmup_epochs) * self.steps_per_epoch + step + 1
        t = min(1.0, done / total)
        return t if self.shape == "linear" else t * t * (3.0 - 2.0 * t)

    def at(self, epoch: int, step: int) -> dict:
        """``{"eps", "kappa", "beta", "progress", "warmup"}`` for this step."""
        s = self.progress(epoch, step)
        k0, k1 = self.kappa
        b0, b1 = self.beta
        return {"eps": self.eps * s, "kappa": k0 + (k1 - k0) * s, "beta": b0 + (b1 - b0) * s,
                "progress": s, "warmup": epoch < self.warmup_epochs}

    @property
    def ramp_end_epoch(self) -> int:
        """The first epoch trained at the full eps."""
        return self.warmup_epochs + self.ramp_epochs
