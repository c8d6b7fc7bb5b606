"""When ReLU splits run out: the domains left become one input-split domain.

A ReLU-split domain with no unstable neuron left to split but still open (its bound is loose
because of other nonlinearities, e.g. a sigmoid generator in front of a ReLU classifier, or
because a linear region's LP was inconclusive) is the set ``{x in box : its splits hold}``. Its
refined pre-activation bounds (each split clamps its neuron's interval at 0) are sound over
that set, so their *hull* over all the stuck domains is sound over the union of their sets:
input-split branch and bound (``input_bab``) starts from the whole box with those hull
intervals as its prior (each CROWN pass intersects its own bounds with them) and splits the
box over the varying inputs. The ReLU-split domains already closed hold no counterexample, and
every counterexample of the others lies in the box and inside the hull intervals, so when input
splits close their domain the property holds. One domain with the hull, not one per stuck
domain: each stuck domain covers the whole box, and splitting each of them anew multiplied the
work (45 stuck domains of a generator took 95,000 input-split domains without closing, where
the box alone closes in about 1,500).
"""
from __future__ import annotations

import torch

from ..bound_types import Interval
from ..bounds.crown import intermediate_bounds
from ..perturbation import Box
from .bab import DomainBatch
from .input_bab import prior_nodes


def stuck_domains(frontier) -> DomainBatch | None:
    """The ReLU-split domains of a stuck ``relu_bab.ReluFrontier`` with no neuron left to split,
    as one input-split domain over its box (``lo, hi``, ``key``: their worst margin) whose
    prior intervals ``l:NODE, u:NODE`` of every node a relaxation reads hold on each of them
    (the hull of theirs), or None when there are none."""
    P, q = frontier.P, frontier.q
    stuck = (q["which"] < 0).nonzero().flatten()
    if not stuck.numel():
        return None
    g, model = P.graph, P.model
    box = {model.input: Box(P.lower.unsqueeze(0), P.upper.unsqueeze(0))}
    base = dict(P.root)
    need = prior_nodes(g)
    if any(k not in base for k in need):
        with torch.no_grad():
            crown = intermediate_bounds(g, box, "crown", upto=g.output)
        base = {**crown, **base}
    out = {"lo": P.lower.unsqueeze(0).clone(), "hi": P.upper.unsqueeze(0).clone(),
           "key": frontier.cm[stuck].min().reshape(1)}
    for k in need:
        lo, up = base[k].lower, base[k].upper
        if k in q["lo"]:                     # a split neuron's interval: the domains' hull
            lo = torch.maximum(lo, q["lo"][k][stuck].amin(0, keepdim=True))
            up = torch.minimum(up, q["up"][k][stuck].amax(0, keepdim=True))
        iv = Interval(torch.minimum(lo, up), torch.maximum(lo, up)).sanitized()
        out["l:" + k], out["u:" + k] = iv.lower.clone(), iv.upper.clone()
    return out
