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


def _merge_pairs(graph: Graph, pick) -> Graph:
    """``graph`` with each pair ``src -> node`` that ``pick(node, src)`` accepts (it returns the
    merged node's params, or None) replaced by one node of ``src``'s op named after ``node``
    (so the graph's output and every consumer are unchanged); ``src`` must have ``node`` as
    its only consumer and be neither the output nor a leaf. Returns ``graph`` itself when
    nothing merges."""
    fold: dict[str, str] = {}
    new_params: dict[str, dict] = {}
    for node in graph:
        if node.op == "input" or len(node.inputs) != 1:
            continue
        src = graph[node.inputs[0]]
        if (src.op == "input" or src.name == graph.output or src.name in graph.leaves
                or len(graph.consumers(src.name)) != 1):
            continue
        params = pick(node, src)
        if params is not None:
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


def fold_bias_adds(graph: Graph) -> Graph:
    """``graph`` with every foldable ``linear -> affine(+b)`` pair merged (see the module
    docstring). Returns ``graph`` itself when nothing folds."""
    def pick(node, src):
        shift = RULES[node.op].constant_shift(node)
        if shift is None or tuple(node.shape) != tuple(src.shape):
            return None
        return RULES[src.op].absorb_shift(src, shift)  # None: not exact, keep the two nodes
    return _merge_pairs(graph, pick)


def fold_channel_scales(graph: Graph) -> Graph:
    """``graph`` with every pair ``a -> b`` merged where ``b`` scales and shifts each output
    channel of ``a`` (its rule's ``channel_scale``) and ``a``'s rule can take that into its
    weight and bias (``absorb_channel_scale``: linear and conv layers); see the module
    docstring (not exact in floating point). Returns ``graph`` itself when nothing folds."""
    def pick(node, src):
        if not src.shape:
            return None
        scale = RULES[node.op].channel_scale(node, src.shape[0])
        return None if scale is None else RULES[src.op].absorb_channel_scale(src, *scale)
    return _merge_pairs(graph, pick)
