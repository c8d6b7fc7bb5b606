"""Which ReLU to split in each domain of ReLU-split branch and bound (``relu_bab.py``).

Two cheap scores rank the unstable, unsplit neurons of a domain from the lower bound's pass on
its most open row (``a``: that row's lower-bound coefficient on the neuron's output, ``l, u``:
the neuron's pre-activation bounds in the domain):

* ``babsr``: the bias that the neuron's upper line adds to the lower bound,
  ``max(-a, 0)·(-l u / (u - l))`` (BaBSR-like), with a tiny tie-break on ``|a|·min(u, -l)``;
* ``gap``: ``|a|·min(u, -l)``, how far either line of the relaxation can be from the ReLU
  (weighted by the row's use of it): it also ranks neurons whose lower line (``a > 0``) is loose.

**Filtered smart branching** (``fsb``) shortlists the top neurons of each score and scores each
candidate by the bound its split would give: both children of each candidate (the neuron's
pre-activation bounds cut to ``[0, u]`` / ``[l, 0]``, every other bound and every relaxation
parameter, alpha and beta, as the parent's last ones) are bounded on the most open row by one
backward pass, all candidates of all domains in one batch; the candidate whose worse child has
the highest bound is split. The estimate only *chooses* a neuron: the children are then bounded
in full (``ReluPrepared.bound``), so the choice never affects soundness.
"""
from __future__ import annotations

import math

import torch

from ..bound_types import Interval
from ..bounds.backward import backward_bound
from ..perturbation import Box

BRANCHINGS = ("babsr", "fsb")
# elements of the widest node's A per chunk of the candidates' backward pass
FSB_CHUNK = 2 ** 23


def most_open_row(P, margin: torch.Tensor) -> torch.Tensor:
    """``margin [n, R]`` -> ``[n]``: the best row of each domain's most open conjunction."""
    k = P.conj_margin(margin).argmin(1)
    mask = P.owner.unsqueeze(0) == k.unsqueeze(1)
    return torch.where(mask, margin, torch.full_like(margin, -torch.inf)).argmax(1)


def scores(P, res, sg, row):
    """-> (babsr, gap): lists (one per split node of ``P.relus``) of ``[n, size]`` scores,
    ``-inf`` where the neuron is not unstable or already split; an interval-split node
    (non-ReLU) gets ``ReluPrepared._interval_scores`` as its BaBSR-like score and no gap
    score."""
    n = row.shape[0]
    babsr, gap = [], []
    for r in P.relus:
        p = P.pre[r]
        l, u = res["lo"][p].flatten(1), res["up"][p].flatten(1)
        A = res["A_relu"][r]
        a = A[torch.arange(n, device=row.device), row].flatten(1) if A is not None else torch.zeros_like(l)
        if not P.at_zero[r]:
            s = P._interval_scores(r, res["lo"][p], res["up"][p], a)
            babsr.append(s)
            gap.append(torch.full_like(s, -torch.inf))
            continue
        unstable = (l < 0) & (u > 0) & (sg[r].flatten(1) == 0)
        width = torch.where(unstable, u - l, torch.ones_like(u))
        intercept = (-l * u / width).clamp(min=0)
        g = a.abs() * torch.minimum(u, -l).clamp(min=0)
        s = a.clamp(max=0).neg() * intercept + 1e-4 * g
        ninf = torch.full_like(s, -torch.inf)
        babsr.append(torch.where(unstable, s, ninf))
        gap.append(torch.where(unstable, g, ninf))
    return babsr, gap


def _locate(P, idx):
    """Flat indices into the concatenated neurons -> (relu index, flat index in its node)."""
    which = torch.bucketize(idx, torch.tensor(P.offsets[1:], device=idx.device), right=True)
    return which, idx - torch.tensor(P.offsets, device=idx.device)[which]


def top_neuron(P, score_list):
    """-> (which, local) ``[n]``: the highest-scoring neuron, ``which = -1`` where none is
    finite (no unstable unsplit neuron left)."""
    best, idx = torch.cat(score_list, 1).max(1)
    which, local = _locate(P, idx)
    return torch.where(torch.isfinite(best), which, torch.full_like(which, -1)), local


def shortlist(P, score_lists, ks):
    """The top ``ks[i]`` neurons of ``score_lists[i]``, distinct across lists. -> (idx
    ``[n, k]`` flat indices into the concatenated neurons, valid ``[n, k]``)."""
    taken, valid = [], []
    used = None
    for sc, k in zip(score_lists, ks):
        allsc = torch.cat(sc, 1)
        if used is not None:
            allsc = allsc.masked_fill(used, -torch.inf)
        k = min(k, allsc.shape[1])
        if k <= 0:
            continue
        v, i = allsc.topk(k, 1)
        taken.append(i)
        valid.append(torch.isfinite(v))
        used = torch.zeros_like(allsc, dtype=torch.bool) if used is None else used
        used.scatter_(1, i, True)
    return torch.cat(taken, 1), torch.cat(valid, 1)


def child_estimates(P, res, sg, row, idx, valid):
    """Lower bounds ``[n, k, 2]`` of row ``row`` in the children (active, inactive) of each
    candidate ``idx [n, k]``, by one backward pass with the parent's bounds, alpha and beta
    (``res["params"]``); ``-inf`` where not ``valid``."""
    g, model = P.graph, P.model
    n, k = idx.shape
    dt = P.lower.dtype
    alphas, betas = res.get("params", ({}, {}))
    # (domain, candidate, side) flattened: side 0 active, 1 inactive
    dev = idx.device
    dom = torch.arange(n, device=dev).repeat_interleave(2 * k)
    cand = idx.repeat_interleave(2, 1).flatten()
    side = torch.arange(2, device=dev).repeat(n * k)
    which, local = _locate(P, cand)
    N = dom.numel()
    out_shape = g[g.output].shape
    widest = max(math.prod(g[m].shape) for m in g.ancestors_order(g.output))
    step = max(1, FSB_CHUNK // widest)
    low = []
    with torch.no_grad():
        for s0 in range(0, N, step):
            sl = slice(s0, min(N, s0 + step))
            d, w, loc, sd = dom[sl], which[sl], local[sl], side[sl]
            m = d.numel()
            rows = torch.arange(m, device=dev)
            bounds = {key: Interval(v.lower.expand(m, *v.lower.shape[1:]),
                                    v.upper.expand(m, *v.upper.shape[1:]))
                      for key, v in P.root.items()}
            for i, r in enumerate(P.relus):
                p = P.pre[r]
                lo = res["lo"][p][d].clone()
                up = res["up"][p][d].clone()
                sel = w == i
                if sel.any():
                    fl, fu = lo.view(m, -1), up.view(m, -1)
                    act = sel & (sd == 0)
                    ina = sel & (sd == 1)
                    fl[rows[act], loc[act]] = fl[rows[act], loc[act]].clamp(min=0)
                    fu[rows[ina], loc[ina]] = fu[rows[ina], loc[ina]].clamp(max=0)
                bounds[p] = Interval(lo, up)
            al = {r: (v[d, row[d]].unsqueeze(1),) * 2 for r, v in alphas.items()}
            be = {r: (sg[r][d], *(b[d, row[d]].unsqueeze(1),) * 2) for r, b in betas.items()}
            leaves = {model.input: Box(P.lower.expand(m, *P.lower.shape),
                                       P.upper.expand(m, *P.upper.shape))}
            C = P.C[row[d]].to(dt).reshape(m, 1, *out_shape)
            lb, _ = backward_bound(g, g.output, C, bounds, leaves, alpha=al or None,
                                   beta=be or None)
            low.append(lb[:, 0])
    est = torch.cat(low).view(n, k, 2)
    return torch.where(valid.unsqueeze(2), est, torch.full_like(est, -torch.inf))


def worse_child(P, res, sg, row, idx, valid, babsr):
    """The estimated bound ``[n, k]`` of row ``row`` in the worse child of each candidate
    ``idx [n, k]`` (flat indices; ``babsr``: the ``scores`` list of the same domains): the
    larger of two estimates per child, each floored at the parent's bound (``bound`` never
    lets a child's margin fall below its parent's):

    * ``child_estimates``' backward pass (no beta yet for the new split, so the active side
      of a neuron can fall below the parent);
    * for the inactive child, the parent's bound plus the BaBSR-like intercept term: with the
      new split's beta set to ``-a`` times the upper line's slope (``a < 0``), the child keeps
      the parent's A and only the line's intercept drops out."""
    est = child_estimates(P, res, sg, row, idx, valid)
    parent = (res["margin"][torch.arange(row.shape[0], device=row.device), row] + P.d[row]).unsqueeze(1)
    intercept = torch.cat(babsr, 1).gather(1, idx).clamp(min=0)
    est[:, :, 1] = torch.maximum(est[:, :, 1], parent + intercept)
    worse = torch.maximum(est.min(2).values, parent)
    return torch.where(valid, worse, torch.full_like(worse, -torch.inf))


def fsb(P, res, sg, k_babsr: int = 3, k_gap: int = 2):
    """Filtered smart branching (see the module doc): the shortlisted candidate with the best
    ``worse_child`` estimate, the BaBSR-like score's top where none is estimated to gain.
    -> (which, local) ``[n]`` as ``top_neuron``."""
    row = most_open_row(P, res["margin"])
    babsr, gap = scores(P, res, sg, row)
    which0, local0 = top_neuron(P, babsr)
    # closed domains (every conjunction refuted) are not split: they keep the score's top
    open_ = P.conj_margin(res["margin"]).min(1).values <= 0
    live = ((which0 >= 0) & open_).nonzero().flatten()
    if live.numel() == 0:
        return which0, local0
    alphas, betas = res.get("params", ({}, {}))
    sub = {"lo": {p: v[live] for p, v in res["lo"].items()},
           "up": {p: v[live] for p, v in res["up"].items()},
           "margin": res["margin"][live],
           "params": ({r: v[live] for r, v in alphas.items()},
                      {r: v[live] for r, v in betas.items()})}
    sub_sg = {r: v[live] for r, v in sg.items()}
    bl = [s[live] for s in babsr]
    idx, valid = shortlist(P, (bl, [s[live] for s in gap]), (k_babsr, k_gap))
    worse = worse_child(P, sub, sub_sg, row[live], idx, valid, bl)
    parent = sub["margin"][torch.arange(live.numel(), device=live.device), row[live]] + P.d[row[live]]
    gain = worse - parent.unsqueeze(1)
    # the shortlist starts with the BaBSR-like top: kept unless another is estimated to gain more
    pick = torch.where(gain.max(1).values > gain[:, 0], gain.argmax(1), torch.zeros_like(live))
    w, loc = _locate(P, idx[torch.arange(live.numel(), device=live.device), pick])
    which, local = which0.clone(), local0.clone()
    which[live], local[live] = w, loc
    return which, local


def choose(P, res, sg, method: str = "fsb"):
    """The neuron to split in each domain by ``method`` (one of ``BRANCHINGS``)."""
    if method == "babsr":
        return top_neuron(P, scores(P, res, sg, most_open_row(P, res["margin"]))[0])
    if method == "fsb":
        if not all(P.at_zero.values()):
            # the child estimates split at 0: interval-split nodes take the scores' top
            return top_neuron(P, scores(P, res, sg, most_open_row(P, res["margin"]))[0])
        return fsb(P, res, sg)
    raise ValueError(f"unknown branching {method!r}; expected one of {BRANCHINGS}")
