"""The input-split strategy of branch and bound (``bab.py``), for low-dimensional inputs
(ACAS Xu has 5).

A domain is a sub-box of the region's box. Every domain is bounded with CROWN (in batches); a
conjunction ``C y <= d`` is refuted on a domain when some row has ``lower(C_r y) > d_r``, and
a domain is closed when all of its region's conjunctions are refuted. An open domain's box is
first clipped to the part where the output pass's linear lower bounds still allow a
counterexample (``_clip_boxes``: every point cut away is refuted by those bounds), then split
in two at the midpoint of one input (``_branch_dims``), so the domains always cover every
counterexample the box may hold: when none is left open the property holds (``unsat``). The
domains waiting form a best-first frontier (``frontier.BestFirstFrontier``: the lowest parent
margin first, depth first while it holds more than ``FRONTIER_MEMORY`` bytes). A child
starts from its parent's intermediate bounds (sound over the parent's box, hence over the
child's), intersected with its own: neurons stable in the parent are never bounded again, and
CROWN bounds each domain's own unstable neurons. Each round also evaluates the model at the open
domains' centres and, every few rounds, runs a short PGD attack from the worst domains; a point
that satisfies a conjunction is returned as a candidate (the caller replays it on the original
model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..bound_types import Interval
from ..bounds.crown import crown
from ..bounds.forward import evaluate
from ..ops import RULES
from ..perturbation import Box, round_down, round_up
from .bab import (BabResult, DomainBatch, Expansion, LocalExpander, Prepared, Problem,
                  branch_and_bound, time_share)
from .frontier import FRONTIER_MEMORY, BestFirstFrontier
from .spec_attack import spec_attack
from .subspace import SubspaceModel, foldable


def _branch_dims(A, open_, margin, per_k, owner, olo, ohi, scale, relax_terms=None,
                 vary=None):
    """The input to split in each open domain, for the row r closest to refuting the domain's
    most open conjunction: where the split is estimated to raise that row's lower bound most.

    With the output bound's coefficients ``A`` (``lower(C_r y) >= A_r·x + b_r``), halving input
    i's width w_i gains ``|A_ri| w_i / 4`` in the linear part. The rest of the bound's slack is
    the relaxation of unstable ReLUs: neuron j, with ``|lambda_j|`` the weight the output pass
    gives its relaxed output and ``g_j = u(-l)/(u-l)`` the largest gap of its lines, costs up to
    ``|lambda_j| g_j``; ``relax_terms`` (``_relax_terms``) gives, per ReLU node, lambda, g and
    the variation ``J_ji`` of neuron j's input along input i over the domain, and half of
    neuron j's slack is credited to input i in proportion to ``J_ji`` (its share of the
    neuron's range). Coefficients alone miss an input that matters only through unstable
    neurons: on ACAS Xu they left it unsplit while splitting the others down to 1e-6 widths.
    Without A: the widest input (relative to the region). ``vary``: the indices of the inputs
    that may be split (those the spec lets vary; ``relax_terms`` are over these), default all.
    -> flat input indices ``[n_open]``."""
    width = (ohi - olo).flatten(1)
    if vary is None:
        vary = torch.arange(width.shape[1], device=width.device)
    width, scale = width[:, vary], scale[vary]
    if A is None or A.shape[0] != open_.shape[0]:
        return vary[(width / scale).argmax(1)]
    A = A[open_].flatten(2)[:, :, vary]                  # [n_open, R, n_vary]
    m = margin[open_]                                    # [n_open, R]
    k = per_k[open_].argmin(1)                           # the most open conjunction
    mask = owner.unsqueeze(0) == k.unsqueeze(1)          # rows of that conjunction
    r = torch.where(mask, m, torch.full_like(m, -torch.inf)).argmax(1)
    a = A[torch.arange(A.shape[0], device=A.device), r]  # [n_open, n_vary]
    score = a.abs() * width / 4
    if relax_terms:
        idx = torch.arange(A.shape[0], device=A.device)
        for ak, gk, Jk in relax_terms:                   # Jk: [n_open, n_vary, n_k]
            slack = ak[idx, r].flatten(1).abs() * gk      # [n_open, n_k]
            share = slack / Jk.sum(1).clamp(min=1e-30) / 2
            score = score + torch.bmm(Jk, share.unsqueeze(2)).squeeze(2)
    # ties (an input the bound does not see): fall back to the widest
    return vary[torch.where(score.amax(1) > 0, score.argmax(1), (width / scale).argmax(1))]


def _relax_terms(model, relus, record, nodes, oi, cvals, centres, widths, vary):
    """For each ReLU-like node k, over the open domains ``oi``: the output pass's lower-bound A
    on its output ``[n, R, *shape]``, the largest gap of its relaxation ``g = u(-l)/(u-l)`` (0
    where stable), and the variation ``[n, n_vary, n_k]`` of its input along each input
    dimension of ``vary`` (the indices of the inputs that may be split: the others are fixed,
    and an input of 800 values with 8 varying costs 16 points per domain, not 1600) over the
    middle half of the domain's range, on both sides of the centre (a secant through the
    centre would miss an input the neuron sees symmetrically, as |x|). ``cvals``: the graph's
    node values at the domains' centres; ``widths: [n, n_in]``."""
    g = model.graph
    ins = [g[k].inputs[0] for k in relus]
    n, n_in = widths.shape[0], vary.numel()
    step = widths.new_zeros(n, n_in, widths.shape[1])                  # [n, n_vary, n_in_all]
    step[:, torch.arange(n_in, device=widths.device), vary] = widths[:, vary] / 4
    c = centres.flatten(1).unsqueeze(1)
    pts = torch.cat([c + step, c - step], 1).reshape(n * 2 * n_in, *centres.shape[1:])
    with torch.no_grad():
        vals = evaluate(g, {model.input: pts})[1]
    out = []
    for k, i in zip(relus, ins):
        v = vals[i].reshape(n, 2 * n_in, -1)
        mid = cvals[i].index_select(0, oi).reshape(n, 1, -1)
        J = (v[:, :n_in] - mid).abs_().add_((mid - v[:, n_in:]).abs_())  # [n, n_in, n_k]
        b = nodes[i]
        up = b.upper.index_select(0, oi).flatten(1).clamp(min=0)
        ln = b.lower.index_select(0, oi).flatten(1).clamp(max=0)
        gap = up * (-ln) / (up - ln).clamp(min=torch.finfo(up.dtype).tiny)  # 0 where stable
        out.append((record[k].index_select(0, oi), gap, J))
    return out


def _clip_boxes(A, lin, refuted, owner, K, lo, hi, passes: int = 2):
    """Shrink each open domain's box to the part where a counterexample can still lie.

    ``A: [n, R, n_in]`` and ``lin: [n, R]`` are the output pass's linear lower bounds over the
    boxes ``lo, hi: [n, n_in]``, less ``d``: every point x of the box has
    ``C_r y(x) - d_r >= A_r x + b_r`` and ``lin_r`` is the least value of ``A_r x + b_r`` over the
    box. A point satisfies conjunction k only where ``A_r x + b_r <= 0`` for all of its rows, so
    measuring input i from the corner that minimizes row r (``t_i >= 0``), it needs
    ``|A_ri| t_i <= -lin_r``: a bound on each input. The rows' bounds are intersected, and the
    pass is repeated with the rows' new least values. Conjunctions already ``refuted: [n, K]``,
    or whose box empties, drop out; the domain's new box is the hull of its conjunctions' boxes
    (``closed`` when none is left). Computed in float64 with a relative slack of 1e-5 on each
    row (the bound itself was computed in the box's dtype), then rounded outwards and kept
    inside the old box. -> (lo, hi, closed)."""
    dt = lo.dtype
    A, l0, h0 = A.double(), lo.double(), hi.double()
    aA, pos, neg = A.abs(), A > 0, A < 0
    least = torch.where(pos, A * l0.unsqueeze(1), A * h0.unsqueeze(1)).sum(2)   # [n, R]
    b = lin.double() - least
    slack = 1e-5 * ((aA * torch.maximum(l0.abs(), h0.abs()).unsqueeze(1)).sum(2) + b.abs()) + 1e-9
    inf = torch.tensor(torch.inf, dtype=torch.float64, device=A.device)
    new_l, new_h = torch.full_like(l0, torch.inf), torch.full_like(h0, -torch.inf)
    alive = torch.zeros(l0.shape[0], dtype=torch.bool, device=l0.device)
    for k in range(K):
        rows = owner == k
        Ak, pk, nk, ak = A[:, rows], pos[:, rows], neg[:, rows], aA[:, rows]
        bk, sk = b[:, rows], slack[:, rows]
        l, h = l0, h0
        dead = refuted[:, k].clone()
        for _ in range(passes):
            m = torch.where(pk, Ak * l.unsqueeze(1), Ak * h.unsqueeze(1)).sum(2) + bk
            dead |= (m > sk).any(1)
            room = (sk - m).clamp(min=0).unsqueeze(2)                      # [n, Rk, 1]
            t = torch.where(ak > 0, room / ak.clamp(min=1e-300), inf)      # [n, Rk, n_in]
            l, h = (torch.maximum(l, torch.where(nk, h.unsqueeze(1) - t, -inf).amax(1)),
                    torch.minimum(h, torch.where(pk, l.unsqueeze(1) + t, inf).amin(1)))
            dead |= (l > h).any(1)
        keep = ~dead
        alive |= keep
        new_l = torch.where(keep.unsqueeze(1), torch.minimum(new_l, l), new_l)
        new_h = torch.where(keep.unsqueeze(1), torch.maximum(new_h, h), new_h)
    a = alive.unsqueeze(1)
    out_l = torch.where(a, torch.maximum(round_down(new_l, dt), lo), lo)
    out_h = torch.where(a, torch.minimum(round_up(new_h, dt), hi), hi)
    closed = ~alive
    return out_l, out_h, closed


def _holding(model, pts, C_all, d_all, owner, K, y=None):
    """-> (point, conjunction) of the first point whose output satisfies a conjunction
    (``y``: the outputs at ``pts`` when already known)."""
    if y is None:
        with torch.no_grad():
            y = model.graph_forward(pts)
    y = y.reshape(pts.shape[0], -1)
    viol = y @ C_all.t() - d_all
    holds = torch.stack([(viol[:, owner == k] <= 0).all(1) for k in range(K)], 1)
    if not holds.any():
        return None
    i, k = (int(v) for v in holds.nonzero()[0])
    return pts[i], k


def _corner_candidate(model, A, open_, margin, owner, K, olo, ohi, C_all, d_all):
    """Per open domain and conjunction, the corner of the box that minimizes the linear lower
    bound of the conjunction's binding row (the one closest to being refuted): where the
    bound is tight, the row's least value is near that corner. -> (point, k) or None."""
    if A is None or A.shape[0] != open_.shape[0]:
        return None
    A = A[open_].flatten(2)                                  # [n_open, R, n_in]
    m = margin[open_]
    idx = torch.arange(A.shape[0], device=A.device)
    lo, hi = olo.flatten(1), ohi.flatten(1)
    pts = []
    for k in range(K):
        rows = (owner == k).nonzero().flatten()
        r = rows[m[:, rows].argmax(1)]
        pts.append(torch.where(A[idx, r] > 0, lo, hi))
    return _holding(model, torch.cat(pts).reshape(-1, *olo.shape[1:]), C_all, d_all, owner, K)


def prior_nodes(graph) -> list[str]:
    """Nodes whose bounds a relaxation reads: a domain's children start from its bounds."""
    return [n.name for n in graph if n.op != "input"
            and any(RULES[c.op].needs_bounds for c in graph.consumers(n.name))]


# crossing intermediate bounds close a domain only beyond this float slack (relative)
INFEASIBLE_TOL = 1e-5
# the most of branch and bound's time spent on PGD attacks from open domains
ATTACK_SHARE = 0.05


@dataclass
class InputProblem(Problem):
    """What every batch of one input-split run shares (cheap to send to a worker):
    ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]``, ``scale: [n_in]`` the region's widths,
    ``vary``: the indices of the inputs that may be split (default: those of positive width);
    ``base: [n_in]`` (float64), when set: the domains' boxes are over the ``vary`` inputs only,
    the others fixed at ``base`` and folded into the model (``subspace.SubspaceModel``)."""
    Cs: list
    ds: list
    scale: torch.Tensor
    method: str = "crown"
    clip: bool = True           # shrink open boxes by their linear bounds (``_clip_boxes``)
    vary: torch.Tensor | None = None
    base: torch.Tensor | None = None   # set: the domains live in the subspace of ``vary``

    def prepare(self, model) -> InputPrepared:
        return InputPrepared(model, self)


class InputPrepared(Prepared):
    """An InputProblem's tensors in the box's dtype, and the graph's nodes it needs."""

    def __init__(self, model, p: InputProblem):
        dt = p.scale.dtype
        if p.base is not None:
            model = SubspaceModel(model, p.vary, p.base)
            p = replace(p, scale=p.scale[p.vary], vary=torch.arange(p.vary.numel(), device=p.vary.device), base=None)
        self.model = model
        self.Cs, self.ds, self.scale, self.method = p.Cs, p.ds, p.scale, p.method
        self.C_all = torch.cat([c.to(dt) for c in p.Cs])                 # [R, n_out]
        self.d_all = torch.cat([d.to(dt) for d in p.ds])                 # [R]
        self.owner = torch.cat([torch.full((c.shape[0],), k, device=c.device) for k, c in enumerate(p.Cs)])
        self.K = len(p.Cs)
        self.keep = prior_nodes(model.graph) if p.method == "crown" else []
        self.relus = [n.name for n in model.graph if n.op != "input" and RULES[n.op].sign_only]
        self.clip = p.clip
        vary = p.vary if p.vary is not None else (p.scale > 1e-12).nonzero().flatten()
        self.vary = vary if vary.numel() else torch.arange(p.scale.numel(), device=p.scale.device)

    def expand(self, batch: DomainBatch, seed: int, deadline: float, attack_after: float,
               stop=None) -> Expansion:
        """``expand_input_domains`` (``stop`` is not polled: a batch is one CROWN pass, and its
        attacks stop at ``deadline``)."""
        return expand_input_domains(self.model, self, batch, seed, deadline, attack_after)


def expand_input_domains(model, pr: InputPrepared, cur: DomainBatch, seed: int, deadline: float,
                         attack_after: float) -> Expansion:
    """Bound a batch of domains (``cur``: boxes ``lo, hi: [n, *input_shape]`` and, after the
    first round, their parents' intermediate bounds ``l:NODE, u:NODE``); try the centres and
    the bound-minimizing corners as counterexamples; attack the most open domains when
    ``perf_counter() >= attack_after``; split the open domains. Times are perf_counter().
    The children: boxes ``lo, hi``, bounds ``l:NODE, u:NODE`` and ``key: [2 n_open]`` (their
    parent's margin on its most open conjunction, the frontier's order)."""
    C_all, d_all, owner, K, keep, relus = pr.C_all, pr.d_all, pr.owner, pr.K, pr.keep, pr.relus
    dt = C_all.dtype
    blo, bhi = cur["lo"], cur["hi"]
    n = blo.shape[0]
    # a point of the batch that satisfies a conjunction: the centres
    centres = (blo + bhi) / 2
    with torch.no_grad():
        y_c, cvals = evaluate(model.graph, {model.input: centres})
    x = _holding(model, centres, C_all, d_all, owner, K, y=y_c)
    if x is not None:
        return Expansion(parents=n, candidate=(*x, "the centre of a domain"))
    spec = C_all.reshape(1, *C_all.shape[:1], *model.output_shape).expand(n, -1, *model.output_shape)
    leaves = {model.input: Box(blo, bhi)}
    A = None   # the output bound's A on the input: lower(C_r y) >= A_r x + b_r ([n, R, *in])
    if keep:
        prior = None
        if "l:" + keep[0] in cur:
            prior = {k: Interval(cur["l:" + k], cur["u:" + k]) for k in keep}
        with torch.no_grad():
            res = crown(model.graph, leaves, spec.to(dt), prior=prior, keep=(*relus, model.input),
                        box_rows=False, clipped_pass=False, relax_lines=False)
        low, nodes, record, A = res.lower, res.nodes, res.A, res.A[model.input]
        low = torch.nan_to_num(low, nan=-torch.inf)
        if prior is not None:
            # intervals that cross (beyond float slack) leave the domain no point: with the
            # priors of ReLU-split domains (``fallback``) a domain may be empty
            empty = torch.zeros(n, dtype=torch.bool, device=low.device)
            for k in keep:
                b = nodes[k]
                gap = b.lower - b.upper - INFEASIBLE_TOL * (1 + b.lower.abs() + b.upper.abs())
                empty |= (gap > 0).flatten(1).any(1)
            low = torch.where(empty.unsqueeze(1), torch.inf, low)
    elif pr.method in ("crown", "crown-ibp"):   # no node a relaxation reads (a linear net)
        with torch.no_grad():
            res = crown(model.graph, leaves, spec.to(dt), method=pr.method, keep=(model.input,))
        low = torch.nan_to_num(res.lower, nan=-torch.inf)
        if res.A[model.input] is not None:
            A = res.A[model.input][:, :C_all.shape[0]]
    else:
        low = model.bounds(leaves, pr.method, spec=spec).lower
    margin = low - d_all                                          # [n, R]: > 0 refutes a row
    per_k = torch.stack([margin[:, owner == k].max(1).values for k in range(K)], 1)
    open_ = (per_k <= 0).any(1)
    if not open_.any():
        return Expansion(bounded=n, parents=n)
    olo, ohi = blo[open_], bhi[open_]
    if pr.clip and keep and A is not None and A.shape[0] == n:
        # shrink each open box to where its conjunctions' linear lower bounds allow a
        # counterexample; a box left with none is closed
        lin = torch.nan_to_num(res.linear_lower, nan=-torch.inf)[open_] - d_all
        cl, ch, closed = _clip_boxes(A[open_].flatten(2), lin, per_k[open_] > 0, owner, K,
                                     olo.flatten(1), ohi.flatten(1))
        olo, ohi = cl.reshape(olo.shape), ch.reshape(ohi.shape)
        if closed.any():
            open_ = open_.clone()
            open_[open_.nonzero().squeeze(1)[closed]] = False
            olo, ohi = olo[~closed], ohi[~closed]
            if not open_.any():
                return Expansion(bounded=n, parents=n)
    out = Expansion(bounded=n, parents=n, open=int(open_.sum()),
                    worst=float(per_k[open_].min()))
    x = _corner_candidate(model, A, open_, margin, owner, K, olo, ohi, C_all, d_all)
    if x is not None:
        out.candidate = (*x, "a domain's bound-minimizing corner")
        return out
    # a short attack from the most open domains, while attacks have taken less than
    # ATTACK_SHARE of the time (corners and centres are tried on every domain anyway)
    if time.perf_counter() >= attack_after:
        ta = time.perf_counter()
        order = per_k[open_].min(1).values.argsort()[:4]
        for j in order.tolist():
            if time.perf_counter() > deadline:
                break
            x, k, v = spec_attack(model.graph_forward, olo[j], ohi[j], pr.Cs, pr.ds, steps=20,
                                  restarts=4, seed=seed + j, deadline=deadline)
            if v <= 0:
                out.candidate = (x, k, "PGD from an open domain")
                break
        out.attack_s = time.perf_counter() - ta
        if out.candidate is not None:
            return out
    terms = None
    if keep and all(v is not None for v in record.values()):
        oi = open_.nonzero().squeeze(1)
        terms = _relax_terms(model, relus, record, nodes, oi, cvals, centres[open_],
                             (ohi - olo).flatten(1), pr.vary)
    dim = _branch_dims(A, open_, margin, per_k, owner, olo, ohi, pr.scale, terms, pr.vary)
    mid = ((olo.flatten(1).gather(1, dim[:, None]) + ohi.flatten(1).gather(1, dim[:, None])) / 2)
    left_hi = ohi.flatten(1).clone()
    left_hi.scatter_(1, dim[:, None], mid)
    right_lo = olo.flatten(1).clone()
    right_lo.scatter_(1, dim[:, None], mid)
    new = {"lo": torch.cat([olo.flatten(1), right_lo]).reshape(-1, *olo.shape[1:]),
           "hi": torch.cat([left_hi, ohi.flatten(1)]).reshape(-1, *olo.shape[1:])}
    for k in keep:
        b = nodes[k].sanitized()
        new["l:" + k] = b.lower[open_].repeat(2, *[1] * (b.lower.ndim - 1))
        new["u:" + k] = b.upper[open_].repeat(2, *[1] * (b.upper.ndim - 1))
    # the children's key in the frontier: their parent's margin on its most open conjunction
    new["key"] = per_k[open_].min(1).values.repeat(2)
    out.children = new
    return out


def input_split_bab(model, lower: torch.Tensor, upper: torch.Tensor, Cs, ds, deadline: float,
                    batch: int = 4096, method: str = "crown", progress=None,
                    expander=None, frontier_bytes: int = FRONTIER_MEMORY, vary=None,
                    base: torch.Tensor | None = None, start: DomainBatch | None = None,
                    domains: int = 0) -> BabResult:
    """Branch and bound on input splits: ``lower, upper: [*input_shape]``;
    ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]``.

    ``progress(domains_left, worst_margin, elapsed)`` is called after every round.
    ``expander``: where batches are bounded (default ``LocalExpander(model)``, this process);
    the domains always cover the box: ``unsat`` only once every batch handed out has come back
    closed or split, and the frontier is empty. The frontier holds each domain's box and the
    intermediate bounds of its parent (over a superset of the domain: sound for it, and they
    let CROWN skip the neurons already stable there), the most open first while it fits in
    ``frontier_bytes`` (``BestFirstFrontier``). ``vary``: the inputs that may be split (a
    bool mask ``[*input_shape]`` or flat indices; default: those with ``lower < upper``): the
    spec's fixed inputs stay at their value even where float32 rounding leaves them a box of
    one ulp. When the affine layers the input goes through first end in vectors
    (``subspace.foldable``), the domains are boxes over the varying inputs alone, the others
    fixed at ``base`` (float64, default the box's centre) and folded into those layers
    (``subspace``). ``start``: the domains to begin with (default: the whole box), a batch as the
    expansions return (``lo, hi``, ``l:NODE, u:NODE`` intervals sound over each domain's part
    of the problem, ``key``); ``domains``: those bounded before (counted in the result)."""
    t0 = time.perf_counter()
    expander = expander if expander is not None else LocalExpander(model)
    scale = (upper - lower).flatten().clamp(min=1e-12)
    if vary is None:
        vary = (upper > lower).flatten()
    vary = torch.as_tensor(vary, device=lower.device)
    if vary.dtype == torch.bool:
        vary = vary.flatten().nonzero().flatten()
    vary = vary.long()
    if start is None:
        start = {"lo": lower.unsqueeze(0), "hi": upper.unsqueeze(0),
                 "key": torch.full((1,), -torch.inf, dtype=lower.dtype, device=lower.device)}
    sub = None
    if 0 < vary.numel() < scale.numel() and foldable(model.graph, model.input, int(vary.numel())):
        # the domains live in the subspace of the varying inputs
        base = ((lower.double() + upper.double()) / 2 if base is None else base.double()).flatten()
        sub = SubspaceModel(model, vary, base)
        problem = InputProblem(list(Cs), list(ds), scale, method, vary=vary, base=base)
        start = {**start, "lo": sub.restrict(start["lo"]), "hi": sub.restrict(start["hi"])}
    else:
        problem = InputProblem(list(Cs), list(ds), scale, method, vary=vary)
    root = BestFirstFrontier(start, frontier_bytes)
    r = branch_and_bound(problem, root, expander, deadline, batch=batch,
                         attack_after=time_share(t0, ATTACK_SHARE), proof="CROWN",
                         progress=progress, t0=t0, domains=domains,
                         name="input-split branch and bound")
    if sub is not None and r.x is not None:
        r.x = sub.lift(r.x)
    return r
