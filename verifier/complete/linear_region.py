"""Decide a ReLU-split domain exactly once every neuron in it is fixed: a linear program.

When every ReLU of a domain is fixed (split, or stable by its bounds) and every other node of
the graph is affine, the network is affine on the domain's polytope
``P = {x in box : s_j z_j(x) >= 0 for every neuron j}`` (``s_j = +1`` active, ``-1`` inactive,
``z_j(x)`` its pre-activation, affine in x there). A conjunction ``C y <= d`` holds somewhere in
the domain iff the LP

    min t  s.t.  (C_r y(x) - d_r) / n_r <= t  (rows r),   -s_j z_j(x) / n_j <= t  (neurons j),
                 x in box

has ``t* <= 0`` (each row scaled by ``n = ||a||_1 + |b|`` of its affine form ``a x + b``). So

* ``t* > 0``: the conjunction is refuted on the domain (or the domain is empty). The verdict
  does not trust the solver: any multipliers ``lambda >= 0`` (HiGHS's duals) give, for every
  x in the box, ``t >= sum_i lambda_i (a_i x + b_i) / sum_i lambda_i``, whose least value over
  the box is computed here in float64; the conjunction is refuted only when that certificate
  exceeds ``CERT_TOL`` (relative to the box's scale);
* ``t* <= 0``: the optimum ``x*`` satisfies every row and every sign with slack ``-t*``: a
  candidate, kept only if the model (in its own dtype) violates the property there (the caller
  replays it on the original model).

The affine forms are computed in float64 on a float64 copy of the graph, by evaluating it (each
ReLU replaced by its fixed linear piece) at the box centre and one unit step along each input
that varies. Domains where neither happens stay open.
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from ..bounds.forward import forward
from ..ops import RULES

log = logging.getLogger(__name__)

# a refutation needs its certificate above this (times the scale of the box)
CERT_TOL = 1e-7
# points per forward pass when computing the affine forms
_CHUNK = 4096


def piecewise_linear(graph) -> bool:
    """Whether every node the output depends on is affine, moves data, or is a splittable
    ReLU-like node (linear on each side of 0): fixing the ReLUs makes the network affine."""
    for name in graph.ancestors_order(graph.output):
        node = graph[name]
        if node.op == "input":
            continue
        rule = RULES[node.op]
        if not (rule.affine or rule.data_movement or (rule.splittable and rule.sign_only)):
            return False
    return True


class LinearRegions:
    """Exact decisions for the fully fixed domains of one ReLU-split run.

    ``relus``: the splittable nodes in order, ``pre``: relu -> its input node; ``C: [R, n_out]``,
    ``d: [R]``, ``owner: [R]`` (each row's conjunction), ``K`` conjunctions; ``lower, upper``:
    the input box (``[*input_shape]``)."""

    def __init__(self, model, relus, pre, C, d, owner, K, lower, upper):
        self.model, self.relus, self.pre = model, list(relus), dict(pre)
        self._graph = None
        self.C = C.double().cpu().numpy()
        self.d = d.double().cpu().numpy()
        self.owner = owner.cpu().numpy()
        self.K = K
        lo, hi = lower.double().flatten(), upper.double().flatten()
        self.vary = (hi > lo).nonzero().flatten()
        self.centre = (lo + hi) / 2
        self.half = ((hi - lo) / 2)[self.vary].cpu().numpy()        # the box of dx: [-half, half]
        self.shape = tuple(lower.shape)

    @classmethod
    def of(cls, model, relus, pre, C, d, owner, K, lower, upper):
        """-> LinearRegions, or None when the graph has nodes that are not piecewise linear."""
        if not relus or not piecewise_linear(model.graph):
            return None
        return cls(model, relus, pre, C, d, owner, K, lower, upper)

    @property
    def graph(self):
        """A float64 copy of the model's graph (made when first needed)."""
        if self._graph is None:
            self._graph = copy.deepcopy(self.model.graph).to(torch.float64)
        return self._graph

    def affine_forms(self, active: dict) -> dict:
        """``active``: relu -> bool ``[m, *shape]`` (its fixed piece per domain) -> for each
        relu's input node and the output, ``(a [m, n, n_vary], b [m, n])``: the node's value
        ``a dx + b`` at ``x = centre + dx`` (float64)."""
        g = self.graph
        m = next(iter(active.values())).shape[0]
        nv = self.vary.numel()
        pts = self.centre.expand(nv + 1, -1).clone()
        pts[torch.arange(1, nv + 1, device=pts.device), self.vary] += 1.0
        want = [self.pre[r] for r in self.relus] + [g.output]
        per = max(1, _CHUNK // (nv + 1))
        parts = {k: [] for k in want}
        for s in range(0, m, per):
            e = min(m, s + per)
            masks = {r: active[r][s:e].double().repeat_interleave(nv + 1, 0) for r in self.relus}
            x = pts.repeat(e - s, 1).reshape(-1, *self.shape)

            def step(rule, node, ins):
                if node.name in masks:
                    slope = node.params.get("negative_slope", getattr(rule, "slope", 0.0))
                    mk = masks[node.name]
                    return ins[0] * (mk + (1 - mk) * slope)
                return rule.point(node, ins)

            with torch.no_grad():
                vals = forward(g, lambda n: x, step, names=g.ancestors_order(g.output))
            for k in want:
                v = vals[k].reshape(e - s, nv + 1, -1)
                parts[k].append(((v[:, 1:] - v[:, :1]).transpose(1, 2), v[:, 0]))
        return {k: (torch.cat([a for a, _ in v]).cpu().numpy(), torch.cat([b for _, b in v]).cpu().numpy())
                for k, v in parts.items()}

    def decide(self, lo: dict, up: dict, sg: dict, margin: torch.Tensor, deadline=None):
        """Decide ``m`` fully fixed domains (``lo, up``: {pre: [m, *shape]} bounds, ``sg``:
        {relu: int8 [m, *shape]} splits, ``margin: [m, R]``: rows already refuted where > 0).
        -> (closed: bool [m], candidate ``(x [*input_shape], conjunction)`` or None)."""
        m = margin.shape[0]
        closed = torch.zeros(m, dtype=torch.bool, device=margin.device)
        active = {r: (sg[r] > 0) | ((sg[r] == 0) & (lo[self.pre[r]] >= 0)) for r in self.relus}
        forms = self.affine_forms(active)
        ya, yb = forms[self.graph.output]
        # the property's rows as affine forms of dx: [m, R, n_vary], [m, R]
        ra = np.einsum("rn,mnv->mrv", self.C, ya)
        rb = yb @ self.C.T - self.d
        sa, sb = [], []
        for r in self.relus:
            a, b = forms[self.pre[r]]
            s = torch.where(active[r], 1.0, -1.0).double().flatten(1).cpu().numpy()[:, :, None]
            sa.append(-s * a)
            sb.append(-s[..., 0] * b)
        sa, sb = np.concatenate(sa, 1), np.concatenate(sb, 1)        # sign rows: <= 0 holds
        refuted = (margin > 0).cpu().numpy()
        for i in range(m):
            if deadline is not None and time.perf_counter() > deadline:
                break
            done = True
            for k in range(self.K):
                rows = self.owner == k
                if refuted[i, rows].any():
                    continue
                A = np.concatenate([ra[i, rows], sa[i]])
                b = np.concatenate([rb[i, rows], sb[i]])
                verdict, x = self._solve(A, b)
                if verdict == "refuted":
                    continue
                done = False
                if verdict == "point":
                    xf = self.centre.clone()
                    xf[self.vary] += torch.as_tensor(x, dtype=xf.dtype, device=xf.device)
                    pt = xf.reshape(self.shape).to(self.model.dtype)
                    with torch.no_grad():
                        y = self.model.graph_forward(pt.unsqueeze(0)).reshape(-1).double()
                    v = (torch.as_tensor(self.C, device=y.device) @ y
                         - torch.as_tensor(self.d, device=y.device))[torch.as_tensor(rows, device=y.device)]
                    if bool((v <= 0).all()):
                        return closed, (pt, k)
                break
            closed[i] = done
        return closed, None

    def _solve(self, A: np.ndarray, b: np.ndarray):
        """min t s.t. (A dx + b) / n <= t, |dx| <= half -> ("refuted", None) with a checked
        certificate, ("point", dx) when t* < 0, else ("open", None)."""
        from scipy.optimize import linprog   # scipy: a base dependency, loaded when first used
        norm = np.abs(A).sum(1) + np.abs(b)
        keep = norm > 0
        A, b, norm = A[keep], b[keep], norm[keep]
        A, b = A / norm[:, None], b / norm
        nv = A.shape[1]
        c = np.zeros(nv + 1)
        c[-1] = 1.0
        res = linprog(c, A_ub=np.hstack([A, -np.ones((A.shape[0], 1))]), b_ub=-b,
                      bounds=[(-h, h) for h in self.half] + [(None, None)], method="highs")
        if res.status != 0:
            return "open", None
        t = float(res.fun)
        if t > 0:
            lam = np.clip(-np.asarray(res.ineqlin.marginals), 0, None)
            s = lam.sum()
            if s > 0:
                w = lam @ A                                     # sum_i lambda_i a_i
                least = -(np.abs(w) * self.half).sum() + lam @ b
                scale = 1.0 + float(np.abs(self.half).max(initial=0.0))
                if least / s > CERT_TOL * scale:
                    return "refuted", None
            return "open", None
        if t < 0:
            return "point", res.x[:nv]
        return "open", None
