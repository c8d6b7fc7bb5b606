"""Graph simplifications that leave the function computed unchanged, exactly.

``fold_bias_adds``: a node followed by its only consumer, a node that adds a constant and
scales nothing (its rule's ``constant_shift``), becomes one node with that bias where the first
node's rule can absorb it (``absorb_shift``): a ``linear`` node then an ``affine`` one (ONNX's
``MatMul`` then ``Add``, or ``x @ W + b`` in PyTorch) become one ``linear`` node. Fewer nodes means fewer bound passes per layer
(every CROWN pass, IBP pass and point evaluation visits each node), and the affine node's
bounds were the linear node's bounds shifted by a constant anyway.

The fold is exact or not done: the new bias is the sum of the old bias (zero when there is none)
and the added constant, which must be representable in the graph's dtype (it always is when the
linear node has no bias of its own). A linear node whose bias is a named parameter (a weight
perturbation may replace it) is never folded into, since the perturbed value would lose the
added constant.

``fold_channel_scales`` (not exact, so not part of the graph mapping): a ``linear`` or ``conv``
node followed by its only consumer, an ``affine`` node that scales and shifts each output
channel (a BatchNorm folded into ``y = x * w + b``), becomes one node of the first op with the
weight ``W * w`` (per output channel) and the bias ``b0 * w + b``. The two nodes computed the
same affine map up to the rounding of those products (a relative 1e-7 in float32): CROWN's
backward pass then maps A through one layer instead of two (one pass less over the widest A).
The certified-training loss uses it on its live graph (the products carry gradients); a graph
that is verified is never rewritten this way.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import RULES
from .nodes import Graph


def fold_bias_adds(graph: Graph) -> Graph:
    """``graph`` with every foldable ``linear -> affine(+b)`` pair merged (see the module
    docstring); the merged node keeps the affine node's name, so the graph's output and every
    consumer are unchanged. Returns ``graph`` itself when nothing folds."""
    fold: dict[str, str] = {}  # shifting node -> the node it absorbs
    new_params: dict[str, dict] = {}
    for node in graph:
        if node.op == "input" or len(node.inputs) != 1:
            continue
        shift = RULES[node.op].constant_shift(node)
        if shift is None:
            continue
        src = graph[node.inputs[0]]
        if (src.op == "input" or src.name == graph.output or src.name in graph.leaves
                or len(graph.consumers(src.name)) != 1 or tuple(node.shape) != tuple(src.shape)):
            continue
        params = RULES[src.op].absorb_shift(src, shift)
        if params is None:
            continue  # not that kind of node, or not exact: keep the two nodes
        fold[node.name] = src.name
        new_params[node.name] = params
    if not fold:
        return graph
    absorbed = set(fold.values())
    nodes = []
    for node in graph:
        if node.name in absorbed:
            continue
        if node.name in fold:
            src = graph[fold[node.name]]
            nodes.append(replace(src, name=node.name, params=new_params[node.name],
                                 source=f"{src.source} + {node.source}".strip(" +")))
        else:
            nodes.append(node)
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def _channel_scale(node, channels: int):
    """``(w, b)`` as ``[channels]`` vectors (None where absent) when ``node`` is an ``affine``
    node scaling and shifting each channel of its input (no broadcast), else None."""
    p = node.params
    if node.op != "affine" or tuple(p.get("in_shape", ())) != tuple(node.shape):
        return None
    want = (channels,) + (1,) * (len(node.shape) - 1)
    out = []
    for key in ("w", "b"):
        t = p.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != want):
            return None
        out.append(None if t is None else t.reshape(channels))
    return tuple(out)


def fold_channel_scales(graph: Graph) -> Graph:
    """``graph`` with every ``linear | conv -> affine`` pair that scales each output channel
    merged into one node named after the affine one (see the module docstring; not exact in
    floating point). Returns ``graph`` itself when nothing folds."""
    fold: dict[str, str] = {}
    for node in graph:
        if node.op != "affine" or len(node.inputs) != 1:
            continue
        src = graph[node.inputs[0]]
        if (src.op not in ("linear", "conv") or src.name == graph.output
                or src.name in graph.leaves or len(graph.consumers(src.name)) != 1
                or not src.shape or _channel_scale(node, src.shape[0]) is None):
            continue
        if src.op == "linear" and len(src.shape) != 1:
            continue  # a per-channel scale of a linear node over a sequence: not its rows
        fold[node.name] = src.name
    if not fold:
        return graph
    absorbed = set(fold.values())
    nodes = []
    for node in graph:
        if node.name in absorbed:
            continue
        if node.name not in fold:
            nodes.append(node)
            continue
        src = graph[fold[node.name]]
        w, b = _channel_scale(node, src.shape[0])
        params = {k: v for k, v in src.params.items() if k != "param_names"}
        W, b0 = params["weight"], params.get("bias")
        if w is not None:
            W = W * w.reshape(-1, *[1] * (W.ndim - 1))
            b0 = None if b0 is None else b0 * w
        if b is not None:
            b0 = b if b0 is None else b0 + b
        params["weight"], params["bias"] = W, b0
        nodes.append(replace(src, name=node.name, params=params,
                             source=f"{src.source} + {node.source}".strip(" +")))
    return Graph(nodes, output=graph.output, leaves=graph.leaves)
