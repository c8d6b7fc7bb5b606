"""Graph simplifications that leave the function computed unchanged, exactly.

``fold_bias_adds``: a ``linear`` node followed by its only consumer, an ``affine`` node that adds
a constant and scales nothing (ONNX's ``MatMul`` then ``Add``, or ``x @ W + b`` in PyTorch),
becomes one ``linear`` node with that bias. Fewer nodes means fewer bound passes per layer
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

import torch

from .nodes import Graph


def _row_bias(b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``b`` broadcast to the per-sample ``shape`` as one bias row of the last dim, or None when
    it does not broadcast or varies along a leading dim."""
    try:
        full = torch.broadcast_to(b, shape)
    except RuntimeError:
        return None
    rows = full.reshape(-1, shape[-1])
    if not bool((rows == rows[:1]).all()):
        return None
    return rows[0].clone()


def fold_bias_adds(graph: Graph) -> Graph:
    """``graph`` with every foldable ``linear -> affine(+b)`` pair merged (see the module
    docstring); the merged node keeps the affine node's name, so the graph's output and every
    consumer are unchanged. Returns ``graph`` itself when nothing folds."""
    fold: dict[str, str] = {}  # affine node -> the linear node it absorbs
    new_bias: dict[str, torch.Tensor] = {}
    for node in graph:
        if node.op != "affine" or node.params.get("w") is not None or node.params.get("b") is None:
            continue
        if len(node.inputs) != 1:
            continue
        src = graph[node.inputs[0]]
        if (src.op != "linear" or src.name == graph.output or src.name in graph.leaves
                or len(graph.consumers(src.name)) != 1 or not src.shape
                or "bias" in src.params.get("param_names", {})
                or tuple(node.shape) != tuple(src.shape)):
            continue
        row = _row_bias(node.params["b"], tuple(src.shape))
        if row is None:
            continue
        old = src.params.get("bias")
        dtype = src.params["weight"].dtype
        exact = row.double() + (0.0 if old is None else old.double())
        bias = exact.to(dtype)
        if not torch.equal(bias.double(), exact):
            continue  # not representable: keep the two nodes
        fold[node.name] = src.name
        new_bias[node.name] = bias.to(src.params["weight"].device)
    if not fold:
        return graph
    absorbed = set(fold.values())
    nodes = []
    for node in graph:
        if node.name in absorbed:
            continue
        if node.name in fold:
            src = graph[fold[node.name]]
            params = dict(src.params)
            params["bias"] = new_bias[node.name]
            nodes.append(replace(src, name=node.name, params=params,
                                 source=f"{src.source} + {node.source}".strip(" +")))
        else:
            nodes.append(node)
    return Graph(nodes, output=graph.output, leaves=graph.leaves)
