"""Certified L2 deviations: for every node, its value at the sets' centers ``v0`` (the clean
model on the clean input) and a bound ``d`` with ``||v - v0||_2 <= d`` for every point of the
sets, per sample.

One forward pass of norm inequalities: a layer ``y = f(x, W) + b`` (f bilinear) moves by at most
``||f(., Wc)||·d_x + ||f(., dW)||·(||x0|| + d_x) + ||db||``, with operator norms bounded by the
spectral norm (dense layers, exact SVD) or ``||K||_F sqrt(m)`` (convolutions, m the most windows
that hold one input entry); activations are 1-Lipschitz (sigmoid 1/4); sums add; a copy that
repeats an entry k times scales by sqrt(k). Ops without a rule here get no bound (inf).

Per-neuron intervals bound each entry separately; a perturbed weight moves all of a layer's
outputs together, and this bound keeps that joint constraint: the weight rules intersect their
output interval with ``y0 ± d_y`` and use ``d_x`` for the bilinear remainder of L2 weight balls.
"""
from __future__ import annotations

import math

import torch

from ..graph.nodes import Graph
from ..perturbation import Box, LpBall

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


def _sigma(W: torch.Tensor) -> float:
    """An upper bound on the spectral norm of a matrix (float64 SVD, plus slack)."""
    return float(torch.linalg.matrix_norm(W.double(), ord=2)) * (1 + 1e-6) + 1e-12


def _windows(p) -> int:
    k = p["weight"].shape[2:]
    if any(d != 1 for d in p["dilation"]):
        return math.prod(k)
    return math.prod(math.ceil(kk / s) for kk, s in zip(k, p["stride"]))


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.double().flatten(1), dim=1)


def deviations(graph: Graph, leaves: dict) -> tuple[dict, dict]:
    """-> (v0, d): node name -> value at the centers ``[B | 1, *shape]``, and -> ``[B | 1]``
    float64 bounds (inf where no rule applies)."""
    from ..weight_attack import evaluate
    centers = {k: _center(p) for k, p in leaves.items()}
    with torch.no_grad():
        _, v0 = evaluate(graph, centers)
    d: dict[str, torch.Tensor] = {}
    for node in graph:
        if node.op == "input":
            d[node.name] = _leaf_dev(leaves[node.name], centers[node.name])
            continue
        ins = [d[i] for i in node.inputs]
        d[node.name] = _rule(graph, node, ins, v0)
    return v0, d


def _bilinear(graph, node, ins, v0):
    p = node.params
    roles = dict(zip(p.get("roles", ()), ins[1:]))
    names = dict(zip(p.get("roles", ()), node.inputs[1:]))
    d_x = ins[0]
    x0n = _norm(v0[node.inputs[0]])
    conv = node.op in ("conv", "conv_w")
    if "weight" in roles:
        Wc = v0[names["weight"]][0]
        if p.get("layouts", {}).get("weight") == "t":
            Wc = Wc.t()
    else:
        Wc = p["weight"]
    if conv:
        m = math.sqrt(_windows(p))
        op_c = float(torch.linalg.vector_norm(Wc.double())) * m
    else:
        op_c = _sigma(Wc)
    out = op_c * d_x
    if "weight" in roles:
        dW = roles["weight"]          # ||dW||_F >= its operator norm (conv: times sqrt(m))
        out = out + dW * (m if conv else 1.0) * (x0n + d_x)
    if "bias" in roles:
        positions = math.prod(node.shape[1:]) if conv else 1
        out = out + roles["bias"] * math.sqrt(positions)
    return out


def _rule(graph, node, ins, v0):
    op, p = node.op, node.params
    if op in ("linear", "conv", "linear_w", "conv_w"):
        return _bilinear(graph, node, ins, v0)
    if op in ("relu", "leaky_relu", "tanh"):
        return ins[0]
    if op == "sigmoid":
        return ins[0] * 0.25
    if op == "affine":
        w = p.get("w")
        return ins[0] * (float(w.abs().max()) if w is not None else 1.0)
    if op == "add":
        return sum(ins)
    if op == "concat":
        return torch.sqrt(sum(t * t for t in ins))
    if op == "matmul_left":
        return ins[0] * _sigma(p["M"])
    if op == "select":
        idx = p["index"]
        idx = idx[idx >= 0]
        k = int(torch.bincount(idx).max()) if idx.numel() else 0
        return ins[0] * math.sqrt(k)
    if op == "param_affine":
        # W0 + t·delta moves by |t - t_c| ||delta||_F
        return ins[0] * float(torch.linalg.vector_norm(p["direction"].double()))
    return torch.full_like(ins[0], INF) if ins else torch.tensor([INF], dtype=torch.float64)
