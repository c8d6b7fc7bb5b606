"""Branch and bound by input splitting, for low-dimensional inputs (ACAS Xu has 5).

A domain is a sub-box of the region's box. Every domain is bounded with CROWN (in batches); a
conjunction ``C y <= d`` is refuted on a domain when some row has ``lower(C_r y) > d_r``, and
a domain is closed when all of its region's conjunctions are refuted. An open domain's box is
first clipped to the part where the output pass's linear lower bounds still allow a
counterexample (``_clip_boxes``: every point cut away is refuted by those bounds), then split
in two at the midpoint of one input (``_branch_dims``), so the domains always cover every
counterexample the box may hold: when none is left open the property holds (``unsat``). The
domains waiting form a best-first frontier (``_Frontier``: the lowest parent margin first,
depth first while it holds more than ``FRONTIER_MEMORY`` bytes). A child
starts from its parent's intermediate bounds (sound over the parent's box, hence over the
child's), intersected with its own: neurons stable in the parent are never bounded again, and
CROWN bounds each domain's own unstable neurons. Each round also evaluates the model at the open
domains' centres and, every few rounds, runs a short PGD attack from the worst domains; a point
that satisfies a conjunction is returned as a candidate (the caller replays it on the original
model).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..bound_types import Interval
from ..bounds.crown import crown
from ..ops import RULES
from ..perturbation import Box, round_down, round_up
from ..bounds.forward import evaluate

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


def _branch_dims(A, open_, margin, per_k, owner, olo, ohi, scale, relax_terms=None):
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
    Without A: the widest input (relative to the region)."""
    width = (ohi - olo).flatten(1)
    if A is None or A.shape[0] != open_.shape[0]:
        return (width / scale).argmax(1)
    A = A[open_].flatten(2)                              # [n_open, R, n_in]
    m = margin[open_]                                    # [n_open, R]
    k = per_k[open_].argmin(1)                           # the most open conjunction
    mask = owner.unsqueeze(0) == k.unsqueeze(1)          # rows of that conjunction
    r = torch.where(mask, m, torch.full_like(m, -torch.inf)).argmax(1)
    a = A[torch.arange(A.shape[0]), r]                   # [n_open, n_in]
    score = a.abs() * width / 4
    if relax_terms:
        idx = torch.arange(A.shape[0])
        for ak, gk, Jk in relax_terms:                   # Jk: [n_open, n_in, n_k]
            slack = ak[idx, r].flatten(1).abs() * gk      # [n_open, n_k]
            share = slack / Jk.sum(1).clamp(min=1e-30) / 2
            score = score + torch.bmm(Jk, share.unsqueeze(2)).squeeze(2)
    # ties (an input the bound does not see): fall back to the widest
    return torch.where(score.amax(1) > 0, score.argmax(1), (width / scale).argmax(1))


def _relax_terms(model, relus, record, nodes, oi, cvals, centres, widths):
    """For each ReLU-like node k, over the open domains ``oi``: the output pass's lower-bound A
    on its output ``[n, R, *shape]``, the largest gap of its relaxation ``g = u(-l)/(u-l)`` (0
    where stable), and the variation ``[n, n_in, n_k]`` of its input along each input dimension
    over the middle half of the domain's range, on both sides of the centre (a secant through
    the centre would miss an input the neuron sees symmetrically, as |x|). ``cvals``: the
    graph's node values at the domains' centres."""
    g = model.graph
    ins = [g[k].inputs[0] for k in relus]
    n, n_in = widths.shape
    step = torch.diag_embed(widths / 4)                    # [n, n_in, n_in]
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
    inf = torch.tensor(torch.inf, dtype=torch.float64)
    new_l, new_h = torch.full_like(l0, torch.inf), torch.full_like(h0, -torch.inf)
    alive = torch.zeros(l0.shape[0], dtype=torch.bool)
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
    idx = torch.arange(A.shape[0])
    lo, hi = olo.flatten(1), ohi.flatten(1)
    pts = []
    for k in range(K):
        rows = (owner == k).nonzero().flatten()
        r = rows[m[:, rows].argmax(1)]
        pts.append(torch.where(A[idx, r] > 0, lo, hi))
    return _holding(model, torch.cat(pts).reshape(-1, *olo.shape[1:]), C_all, d_all, owner, K)


def _prior_nodes(graph) -> list[str]:
    """Nodes whose bounds a relaxation reads: a domain's children start from its bounds."""
    return [n.name for n in graph if n.op != "input"
            and any(RULES[c.op].needs_bounds for c in graph.consumers(n.name))]


# bytes of waiting domains above which the frontier hands out its newest domains first
FRONTIER_MEMORY = 2 ** 30


class _Frontier:
    """Domains waiting to be bounded, each with a ``key``: its parent's margin on its most open
    conjunction (lower is more open; children of one parent share it). Held as the batches of
    children pushed (dicts of tensors with the same leading size), never copied when more is
    pushed; each keeps its keys sorted and the order of its rows by key.

    ``pop(k)`` is best first: the ``k`` lowest keys of all parts (ties: the older part first).
    Best first can hold far more domains than depth first, so while the parts take more than
    ``max_bytes``, ``pop`` hands out the newest part's domains instead (depth first, as a
    stack: then each round adds at most one batch, and the subtrees being closed are the
    newest). ``bytes`` counts the parts' whole blocks; a part three quarters handed out is
    compacted (its rows left are copied), so the blocks hold at most four times the bytes of
    the domains waiting. Which domains get bounded never depends on the order (a domain's
    expansion depends only on itself); the order decides how soon a counterexample turns up
    and how much memory waits."""

    def __init__(self, first: dict, max_bytes: int = FRONTIER_MEMORY):
        # per part: its tensors, its keys left (sorted), their rows, its rows in all, row bytes
        self.parts, self.keys, self.rows, self.size, self.row_bytes = [], [], [], [], []
        self.n = self.bytes = 0
        self.max_bytes = max_bytes
        self.push(first)

    def __len__(self) -> int:
        return self.n

    def push(self, part: dict) -> None:
        """``part``: a batch with a ``key: [m]`` entry (taken out and kept beside it)."""
        part = dict(part)
        if "key" not in part:
            raise ValueError("a batch of children has no 'key' (its parents' margins): "
                             "the expander must return expand_domains' children")
        key = torch.nan_to_num(part.pop("key"), nan=-torch.inf)
        m = key.shape[0]
        if m == 0:
            return
        key, rows = torch.sort(key, stable=True)
        row = sum(v[0].numel() * v.element_size() for v in part.values()) + key.element_size()
        for lst, v in ((self.parts, part), (self.keys, key), (self.rows, rows),
                       (self.size, m), (self.row_bytes, row)):
            lst.append(v)
        self.n += m
        self.bytes += m * row

    def lowest(self) -> float:
        """The lowest key waiting (inf when empty)."""
        return min((float(k[0]) for k in self.keys), default=float("inf"))

    def _counts(self, k: int) -> dict:
        """How many domains to take from each part (the first of its sorted rows)."""
        if self.bytes > self.max_bytes:       # depth first: the newest parts
            counts, size = {}, 0
            for i in reversed(range(len(self.parts))):
                if size >= k:
                    break
                counts[i] = min(self.keys[i].shape[0], k - size)
                size += counts[i]
            return counts
        heads = [key[:k] for key in self.keys]
        sizes = [h.shape[0] for h in heads]
        if sum(sizes) <= k:
            return dict(enumerate(sizes))
        # each part is sorted, so the k lowest keys are prefixes of the parts: all keys below
        # the k-th lowest, then the keys equal to it, older parts first
        t = torch.kthvalue(torch.cat(heads), k).values
        counts, need = {}, k
        below = [int(torch.searchsorted(h, t)) for h in heads]
        need -= sum(below)
        for i, h in enumerate(heads):
            extra = min(int(torch.searchsorted(h, t, right=True)) - below[i], need)
            need -= extra
            if below[i] + extra:
                counts[i] = below[i] + extra
        return counts

    def pop(self, k: int) -> dict:
        """Up to ``k`` domains: the lowest keys (best first), or, above ``max_bytes``, the
        newest part's (depth first). Their order within the batch is not the keys' order."""
        if not self.n or k < 1:
            raise IndexError(f"pop({k}) from a frontier of {self.n} domains")
        counts = self._counts(k)
        names = [name for name in self.parts[next(iter(counts))]
                 if all(name in self.parts[i] for i in counts)]
        whole = [i for i, c in counts.items() if c == self.size[i]]   # untouched parts
        if len(counts) == 1 and whole:
            i = whole[0]
            out = {name: self.parts[i][name] for name in names}
        else:
            total = sum(counts.values())
            first = self.parts[next(iter(counts))]
            out = {name: torch.empty(total, *first[name].shape[1:], dtype=first[name].dtype)
                   for name in names}
            at = 0
            for i, c in counts.items():
                sel = self.rows[i][:c]
                for name in names:
                    torch.index_select(self.parts[i][name], 0, sel, out=out[name][at:at + c])
                at += c
        for i, c in counts.items():
            self.keys[i], self.rows[i] = self.keys[i][c:], self.rows[i][c:]
            self.n -= c
            left = self.keys[i].shape[0]
            if left and 4 * left < self.size[i]:
                # the rest is a small share of a big block: copy it, so the block can go
                self.parts[i] = {name: v.index_select(0, self.rows[i])
                                 for name, v in self.parts[i].items()}
                self.rows[i] = torch.arange(left)
                self.bytes -= (self.size[i] - left) * self.row_bytes[i]
                self.size[i] = left
            elif not left:
                self.bytes -= self.size[i] * self.row_bytes[i]
        keep = [i for i, key in enumerate(self.keys) if key.shape[0]]
        if len(keep) < len(self.keys):
            for lst in (self.parts, self.keys, self.rows, self.size, self.row_bytes):
                lst[:] = [lst[i] for i in keep]
        return out


# the most of branch and bound's time spent on PGD attacks from open domains
ATTACK_SHARE = 0.05


@dataclass
class BabResult:
    status: str                 # "unsat", "candidate", "timeout"
    x: torch.Tensor | None = None
    disjunct: int | None = None
    domains: int = 0            # domains bounded in all
    rounds: int = 0
    worst: float = float("nan")  # the worst (lowest) refutation margin still open


@dataclass
class SplitProblem:
    """What every batch of one branch and bound run shares (cheap to send to a worker):
    ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]``, ``scale: [n_in]`` the region's widths."""
    Cs: list
    ds: list
    scale: torch.Tensor
    method: str = "crown"
    clip: bool = True           # shrink open boxes by their linear bounds (``_clip_boxes``)


@dataclass
class Expansion:
    """One batch of domains bounded and split: ``bounded`` domains bounded, ``open`` of them
    not refuted (``worst`` their lowest margin), ``children`` their two halves each (a batch
    for the queue, None when all closed), or a ``candidate`` ``(x, disjunct)`` to replay."""
    bounded: int = 0
    open: int = 0
    worst: float = float("nan")
    children: dict | None = None
    candidate: tuple | None = None
    attack_s: float = 0.0


class Prepared:
    """A SplitProblem's tensors in the box's dtype, and the graph's nodes it needs."""

    def __init__(self, model, p: SplitProblem):
        dt = p.scale.dtype
        self.Cs, self.ds, self.scale, self.method = p.Cs, p.ds, p.scale, p.method
        self.C_all = torch.cat([c.to(dt) for c in p.Cs])                 # [R, n_out]
        self.d_all = torch.cat([d.to(dt) for d in p.ds])                 # [R]
        self.owner = torch.cat([torch.full((c.shape[0],), k) for k, c in enumerate(p.Cs)])
        self.K = len(p.Cs)
        self.keep = _prior_nodes(model.graph) if p.method == "crown" else []
        self.relus = [n.name for n in model.graph if n.op != "input" and RULES[n.op].sign_only]
        self.clip = p.clip


def expand_domains(model, pr: Prepared, cur: dict, seed: int, deadline: float,
                   attack_after: float) -> Expansion:
    """Bound a batch of domains (``cur``: boxes ``lo, hi: [n, *input_shape]`` and, after the
    first round, their parents' intermediate bounds ``l:NODE, u:NODE``); try the centres and
    the bound-minimizing corners as counterexamples; attack the most open domains when
    ``perf_counter() >= attack_after``; split the open domains. Times are perf_counter()."""
    from .spec_attack import spec_attack
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
        return Expansion(candidate=x)
    spec = C_all.reshape(1, *C_all.shape[:1], *model.output_shape).expand(n, -1, *model.output_shape)
    leaf = _RecordingBox(blo, bhi, rows=C_all.shape[0])
    if keep:
        prior = None
        if "l:" + keep[0] in cur:
            prior = {k: Interval(cur["l:" + k], cur["u:" + k]) for k in keep}
        with torch.no_grad():
            res = crown(model.graph, {model.input: leaf}, spec.to(dt), prior=prior, keep=relus,
                        box_rows=False, clipped_pass=False, relax_lines=False)
        low, nodes, record = res.lower, res.nodes, res.A
        low = torch.nan_to_num(low, nan=-torch.inf)
    else:
        res = model.bounds({model.input: leaf}, pr.method, spec=spec)
        low = res.lower
    margin = low - d_all                                          # [n, R]: > 0 refutes a row
    per_k = torch.stack([margin[:, owner == k].max(1).values for k in range(K)], 1)
    open_ = (per_k <= 0).any(1)
    if not open_.any():
        return Expansion(bounded=n)
    olo, ohi = blo[open_], bhi[open_]
    if pr.clip and keep and leaf.A is not None and leaf.A.shape[0] == n:
        # shrink each open box to where its conjunctions' linear lower bounds allow a
        # counterexample; a box left with none is closed
        lin = torch.nan_to_num(res.linear_lower, nan=-torch.inf)[open_] - d_all
        cl, ch, closed = _clip_boxes(leaf.A[open_].flatten(2), lin, per_k[open_] > 0, owner, K,
                                     olo.flatten(1), ohi.flatten(1))
        olo, ohi = cl.reshape(olo.shape), ch.reshape(ohi.shape)
        if closed.any():
            open_ = open_.clone()
            open_[open_.nonzero().squeeze(1)[closed]] = False
            olo, ohi = olo[~closed], ohi[~closed]
            if not open_.any():
                return Expansion(bounded=n)
    out = Expansion(bounded=n, open=int(open_.sum()), worst=float(per_k[open_].min()))
    x = _corner_candidate(model, leaf.A, open_, margin, owner, K, olo, ohi, C_all, d_all)
    if x is not None:
        out.candidate = x
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
                out.candidate = (x, k)
                break
        out.attack_s = time.perf_counter() - ta
        if out.candidate is not None:
            return out
    terms = None
    if keep and all(v is not None for v in record.values()):
        oi = open_.nonzero().squeeze(1)
        terms = _relax_terms(model, relus, record, nodes, oi, cvals, centres[open_],
                             (ohi - olo).flatten(1))
    dim = _branch_dims(leaf.A, open_, margin, per_k, owner, olo, ohi, pr.scale, terms)
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


class LocalExpander:
    """The default expander: each batch expanded in this process when it is collected.

    An expander is the seam between branch and bound's coordinator (``input_split_bab``: the
    queue, the deadline, candidates) and where batches are bounded: ``start(problem)`` once per
    run, then up to ``slots`` batches ``submit``-ted before each ``collect(deadline)`` (which
    returns one finished Expansion, or None if the deadline passed first), and ``cancel()``
    when the run ends (outstanding work is dropped). An expander whose batches run in other
    processes implements the same four methods and ``slots`` (how many batches at once)."""

    slots = 1

    def __init__(self, model):
        self.model = model
        self._job = None

    def start(self, problem: SplitProblem) -> None:
        self._pr = Prepared(self.model, problem)

    def submit(self, cur: dict, seed: int, deadline: float, attack_after: float) -> None:
        self._job = (cur, seed, deadline, attack_after)

    def collect(self, deadline: float) -> Expansion | None:
        job, self._job = self._job, None
        return expand_domains(self.model, self._pr, *job)

    def cancel(self) -> None:
        self._job = None


def input_split_bab(model, lower: torch.Tensor, upper: torch.Tensor, Cs, ds, deadline: float,
                    batch: int = 4096, method: str = "crown", progress=None,
                    expander=None, frontier_bytes: int = FRONTIER_MEMORY) -> BabResult:
    """``lower, upper: [*input_shape]``; ``Cs[k]: [rows_k, n_out]``, ``ds[k]: [rows_k]``.

    ``progress(domains_left, worst_margin, elapsed)`` is called after every round.
    ``expander``: where batches are bounded (default ``LocalExpander(model)``, this process);
    the domains always cover the box: ``unsat`` only once every batch handed out has come back
    closed or split, and the queue is empty."""
    t0 = time.perf_counter()
    expander = expander if expander is not None else LocalExpander(model)
    expander.start(SplitProblem(list(Cs), list(ds), (upper - lower).flatten().clamp(min=1e-12),
                                method))
    # the queue: each domain's box and the intermediate bounds of its parent (over a superset
    # of the domain: sound for it, and they let CROWN skip the neurons already stable there),
    # the most open first while it fits in ``frontier_bytes`` (``_Frontier``)
    queue = _Frontier({"lo": lower.unsqueeze(0), "hi": upper.unsqueeze(0),
                       "key": torch.full((1,), -torch.inf, dtype=lower.dtype)}, frontier_bytes)
    total = rounds = inflight = 0
    attack_s = 0.0
    worst = float("nan")
    try:
        while len(queue) or inflight:
            while len(queue) and inflight < expander.slots:
                if time.perf_counter() > deadline:
                    return BabResult("timeout", domains=total, rounds=rounds, worst=worst)
                rounds += 1
                expander.submit(queue.pop(batch), rounds, deadline,
                                t0 + attack_s / ATTACK_SHARE)
                inflight += 1
            e = expander.collect(deadline)
            if e is None:
                return BabResult("timeout", domains=total, rounds=rounds, worst=worst)
            inflight -= 1
            total += e.bounded
            attack_s += e.attack_s
            if e.children is not None:
                queue.push(e.children)
            if len(queue):   # the lowest margin of the domains waiting
                worst = queue.lowest()
            elif e.open:
                worst = e.worst
            if e.candidate is not None:
                return BabResult("candidate", e.candidate[0], e.candidate[1], total, rounds,
                                 worst)
            if progress is not None and e.bounded:
                progress(len(queue), worst, time.perf_counter() - t0)
            log.debug("round %d: %d domains left, worst margin %.4g", rounds, len(queue),
                      worst)
    finally:
        expander.cancel()  # a candidate or the deadline: outstanding batches are dropped
    return BabResult("unsat", domains=total, rounds=rounds, worst=worst)
