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
"""
from __future__ import annotations

from dataclasses import replace

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
