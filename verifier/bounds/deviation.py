"""Certified L2 deviations: for every node, its value at the sets' centers ``v0`` (the clean
model on the clean input) and a bound ``d`` with ``||v - v0||_2 <= d`` for every point of the
sets, per sample.

One pass of the forward interpreter with each rule's ``deviation`` as its step (norm
inequalities): a layer ``y = f(x, W) + b`` (f bilinear) moves by at most
``||f(., Wc)||·d_x + ||f(., dW)||·(||x0|| + d_x) + ||db||``, with operator norms bounded by the
spectral norm (dense layers, exact SVD) or ``||K||_F sqrt(m)`` (convolutions, m the most windows
that hold one input entry); activations by their largest slope; sums add; a copy that repeats
an entry k times scales by sqrt(k). Ops whose rule has no deviation get no bound (inf).

Per-neuron intervals bound each entry separately; a perturbed weight moves all of a layer's
outputs together, and this bound keeps that joint constraint: the weight rules intersect their
output interval with ``y0 ± d_y`` and use ``d_x`` for the bilinear remainder of L2 weight balls.
"""
from __future__ import annotations

import math

import torch

from ..graph.nodes import Graph
from ..ops.base import NotSupported
from ..perturbation import Box, LpBall
from .forward import evaluate, forward

INF = math.inf


def _center(p):
    if isinstance(p, Box):
        return (p.lower + p.upper) / 2
    return p.center


def _leaf_dev(p, c) -> torch.Tensor:
    """Largest ``||x - c||_2`` over the leaf's set, per batch entry: [B]."""
    if isinstance(p, LpBall) and p.norm in (2.0, 1.0) and p.clip is None:
        return p._eps_t.reshape(-1).to(torch.float64).expand(c.shape[0])
    box = p.interval()
    far = torch.maximum(c - box.lower, box.upper - c).double()
    return torch.linalg.vector_norm(far.flatten(1), dim=1)


def deviations(graph: Graph, leaves: dict) -> tuple[dict, dict]:
    """-> (v0, d): node name -> value at the centers ``[B | 1, *shape]``, and -> ``[B | 1]``
    float64 bounds (inf where the rule has none)."""
    centers = {k: _center(p) for k, p in leaves.items()}
    where = next(iter(centers.values())).device
    with torch.no_grad():
        _, v0 = evaluate(graph, centers)

    def step(rule, node, devs):
        if devs and all(bool((d == 0).all()) for d in devs):
            return torch.zeros_like(devs[0])   # no input moves: the node stays at v0
        try:
            return rule.deviation(node, [v0[i] for i in node.inputs], devs)
        except NotSupported:
            return torch.full_like(devs[0], INF) if devs else torch.tensor([INF], dtype=torch.float64, device=where)

    d = forward(graph, lambda n: _leaf_dev(leaves[n.name], centers[n.name]), step)
    return v0, d
