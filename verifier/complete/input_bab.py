"""Branch and bound by input splitting, for low-dimensional inputs (ACAS Xu has 5).

A domain is a sub-box of the region's box. Every domain is bounded with CROWN (in batches); a
conjunction ``C y <= d`` is refuted on a domain when some row has ``lower(C_r y) > d_r``, and
a domain is closed when all of its region's conjunctions are refuted. Open domains are split
in two at the midpoint of their widest input (relative to the region's width), so the domains
always cover the box: when none is left open the property holds (``unsat``). Each round also
evaluates the model at the open domains' centres and, every few rounds, runs a short PGD attack
from the worst domains; a point that satisfies a conjunction is returned as a candidate (the
caller replays it on the original model).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..perturbation import Box

log = logging.getLogger(__name__)


class _RecordingBox(Box):
    """A Box that keeps the linear coefficients ``A`` of the last lower bound concretized over
    it with ``rows`` leading spec rows (the output spec's pass; used to pick the split)."""

    def __init__(self, lower, upper, rows: int):
        super().__init__(lower, upper)
        self.rows = rows
        self.A = None

    def concretize(self, A, upper):
        if not upper and A.shape[1] >= self.rows:
            self.A = A[:, :self.rows]
        return super().concretize(A, upper)


def _branch_dims(A, open_, margin, per_k, owner, olo, ohi, scale):
    """The input to split in each open domain. With the output bound's coefficients ``A``
    (``lower(C_r y) >= A_r·x + b_r``), splitting input i shrinks ``|A_ri| (hi_i - lo_i)``, the
    slack input i adds to row r: split where it is largest for the row that is closest to
    refuting the domain's most open conjunction. Without A: the widest input (relative to the
    region)."""
    width = (ohi - olo).flatten(1)
    if A is None or A.shape[0] != open_.shape[0]:
        return (width / scale).argmax(1)
    A = A[open_].flatten(2)                              # [n_open, R, n_in]
    m = margin[open_]                                    # [n_open, R]
    k = per_k[open_].argmin(1)                           # the most open conjunction
    mask = owner.unsqueeze(0) == k.unsqueeze(1)          # rows of that conjunction
    r = torch.where(mask, m, torch.full_like(m, -torch.inf)).argmax(1)
    a = A[torch.arange(A.shape[0]), r]                   # [n_open, n_in]
    score = a.abs() * width
    # ties (an input the bound does not see): fall back to the widest
    return torch.where(score.amax(1) > 0, score.argmax(1), (width / scale).argmax(1))


@dataclass
class BabResult:
    status: str                 # "unsat", "candidate", "timeout"
    x: torch.Tensor | None = None
    disjunct: int | None = None
    domains: int = 0            # domains bounded in all
    rounds: int = 0
    worst: float = float("nan")  # the worst (lowest) refutation margin still open


def input_split_bab(model, lower: torch.Tensor, upper: torch.Tensor, Cs, ds, deadline: float,
                    batch: int = 512, method: str = "crown", progress=None) -> BabResult:
    """``lower, upper: [*input_shape]``; ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]``.

    ``progress(domains_left, worst_margin, elapsed)`` is called after every round."""
    from .spec_attack import spec_attack
    t0 = time.perf_counter()
    dt = lower.dtype
    C_all = torch.cat([c.to(dt) for c in Cs])                     # [R, n_out]
    d_all = torch.cat([d.to(dt) for d in ds])                     # [R]
    owner = torch.cat([torch.full((c.shape[0],), k) for k, c in enumerate(Cs)])
    K = len(Cs)
    scale = (upper - lower).flatten().clamp(min=1e-12)
    lo = lower.unsqueeze(0)
    hi = upper.unsqueeze(0)
    total = rounds = 0
    worst = float("nan")
    while lo.shape[0]:
        if time.perf_counter() > deadline:
            return BabResult("timeout", domains=total, rounds=rounds, worst=worst)
        rounds += 1
        take = min(batch, lo.shape[0])
        blo, bhi = lo[:take], hi[:take]
        lo, hi = lo[take:], hi[take:]
        n = blo.shape[0]
        # a point of the batch that satisfies a conjunction: the centres
        centres = (blo + bhi) / 2
        with torch.no_grad():
            y = model.graph_forward(centres).reshape(n, -1)
        viol = y @ C_all.t() - d_all                                  # [n, R]
        holds = torch.stack([(viol[:, owner == k] <= 0).all(1) for k in range(K)], 1)
        if holds.any():
            i, k = (int(v) for v in holds.nonzero()[0])
            return BabResult("candidate", centres[i], k, total, rounds, worst)
        spec = C_all.reshape(1, *C_all.shape[:1], *model.output_shape).expand(n, -1, *model.output_shape)
        leaf = _RecordingBox(blo, bhi, rows=C_all.shape[0])
        res = model.bounds({model.input: leaf}, method, spec=spec)
        total += n
        margin = res.lower - d_all                                    # [n, R]: > 0 refutes a row
        per_k = torch.stack([margin[:, owner == k].max(1).values for k in range(K)], 1)
        open_ = (per_k <= 0).any(1)
        if open_.any():
            worst = float(per_k[open_].min())
        if progress is not None:
            progress(int(open_.sum()) * 2 + lo.shape[0], worst, time.perf_counter() - t0)
        if not open_.any():
            continue
        olo, ohi = blo[open_], bhi[open_]
        if rounds % 4 == 0:  # a short attack from the most open domains
            order = per_k[open_].min(1).values.argsort()[:4]
            for j in order.tolist():
                if time.perf_counter() > deadline:
                    break
                x, k, v = spec_attack(model.graph_forward, olo[j], ohi[j], Cs, ds, steps=20,
                                      restarts=4, seed=rounds + j, deadline=deadline)
                if v <= 0:
                    return BabResult("candidate", x, k, total, rounds, worst)
        dim = _branch_dims(leaf.A, open_, margin, per_k, owner, olo, ohi, scale)
        mid = ((olo.flatten(1).gather(1, dim[:, None]) + ohi.flatten(1).gather(1, dim[:, None])) / 2)
        left_hi = ohi.flatten(1).clone()
        left_hi.scatter_(1, dim[:, None], mid)
        right_lo = olo.flatten(1).clone()
        right_lo.scatter_(1, dim[:, None], mid)
        new_lo = torch.cat([olo.flatten(1), right_lo]).reshape(-1, *olo.shape[1:])
        new_hi = torch.cat([left_hi, ohi.flatten(1)]).reshape(-1, *olo.shape[1:])
        # open domains go first: depth first keeps the frontier small
        lo = torch.cat([new_lo, lo])
        hi = torch.cat([new_hi, hi])
        log.debug("round %d: %d domains left, worst margin %.4g", rounds, lo.shape[0], worst)
    return BabResult("unsat", domains=total, rounds=rounds, worst=worst)
