"""Part of the graph mapping: forms that exporters write for one operator, turned back into that
operator's node, so that its own (tighter) rule bounds it.

``fuse_gelu``: the exact GELU as ``torch.onnx.export`` writes it (opset < 20) or as it is often
written by hand, ``x * (1 + erf(x / sqrt(2)))`` times constants, is a ``mul`` of ``p·x`` and
``1 + erf(s·x)`` with ``s = 1/sqrt(2)``; bounding the product by McCormick planes over the two
factors' boxes loses their dependence (on the reference ``gelu_mlp``, CROWN's mean margin bound
is -32.9 that way). It becomes ``(2 p)·gelu(x)``: a ``gelu`` node and a scaling ``affine`` node
that keeps the product's name. ``s`` must be 1/sqrt(2) within 1e-6 (relative): the model then
computes GELU up to that rounding of the constant, which the smooth rule's slack covers.

``fuse_silu``: SiLU as exporters write it, ``x * sigmoid(x)`` (ONNX ``Sigmoid`` then ``Mul``),
becomes one ``silu`` node, for the same reason.

``fuse`` applies both.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .nodes import Graph, Node

_INV_SQRT2 = 1 / math.sqrt(2.0)


def _scalar(t) -> float | None:
    """A constant that is one number (any shape of equal entries), else None."""
    if t is None:
        return None
    t = torch.as_tensor(t)
    flat = t.reshape(-1)
    if flat.numel() == 0 or not bool((flat == flat[0]).all()):
        return None
    return float(flat[0])


def _scale_of(node: Node) -> float | None:
    """``w`` of an ``affine`` node ``y = w x`` (a number, no shift, no broadcast), else None."""
    p = node.params
    if node.op != "affine" or p.get("b") is not None or tuple(p["in_shape"]) != tuple(node.shape):
        return None
    return 1.0 if p.get("w") is None else _scalar(p["w"])


def _one_plus_erf_of(graph: Graph, node: Node):
    """-> the node x where ``node = 1 + erf(s x)`` with s = 1/sqrt(2), else None."""
    p = node.params
    if node.op != "affine" or p.get("w") is not None or _scalar(p.get("b")) != 1.0:
        return None
    erf = graph[node.inputs[0]]
    if erf.op != "erf" or len(graph.consumers(erf.name)) != 1:
        return None
    div = graph[erf.inputs[0]]
    s = _scale_of(div)
    if s is None or abs(s / _INV_SQRT2 - 1) > 1e-6 or len(graph.consumers(div.name)) != 1:
        return None
    return div.inputs[0], (div.name, erf.name, node.name)


def fuse_gelu(graph: Graph) -> Graph:
    """``graph`` with every exported exact GELU as a ``gelu`` node (see the module doc);
    ``graph`` itself when there is none."""
    plan = {}       # mul node -> (x, 2 p)
    dead = set()
    for node in graph:
        if node.op != "mul" or len(node.inputs) != 2:
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            got = _one_plus_erf_of(graph, graph[b])
            if got is None or len(graph.consumers(b)) != 1:
                continue
            x, chain = got
            pnode = graph[a]
            if a == x:
                p = 1.0
            elif pnode.op == "affine" and pnode.inputs == [x] and len(graph.consumers(a)) == 1 \
                    and (p := _scale_of(pnode)) is not None:
                chain = chain + (a,)
            else:
                continue
            if tuple(graph[x].shape) != tuple(node.shape):
                continue
            plan[node.name] = (x, 2 * p)
            dead.update(chain)
            break
    if not plan:
        return graph
    nodes = []
    for node in graph:
        if node.name in dead:
            continue
        if node.name in plan:
            x, scale = plan[node.name]
            g = Node(f"{node.name}/gelu", "gelu", [x], node.shape, {}, "GELU (fused erf form)")
            nodes.append(g)
            w = torch.tensor(scale, dtype=_dtype(graph))
            nodes.append(replace(node, op="affine", inputs=[g.name],
                                 params={"w": w, "b": None, "in_shape": tuple(node.shape)},
                                 source=f"{node.source} (x * (1 + erf(x / sqrt(2))))"))
        else:
            nodes.append(node)
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def fuse_silu(graph: Graph) -> Graph:
    """``graph`` with every ``x * sigmoid(x)`` as a ``silu`` node named after the product."""
    plan, dead = {}, set()
    for node in graph:
        if node.op != "mul" or len(node.inputs) != 2:
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            sig = graph[b]
            if (sig.op == "sigmoid" and sig.inputs == [a] and len(graph.consumers(b)) == 1
                    and tuple(graph[a].shape) == tuple(node.shape)):
                plan[node.name] = a
                dead.add(b)
                break
    if not plan:
        return graph
    nodes = [replace(n, op="silu", inputs=[plan[n.name]], params={},
                     source=f"{n.source} (x * sigmoid(x))") if n.name in plan else n
             for n in graph if n.name not in dead]
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def fuse(graph: Graph) -> Graph:
    """Every fusion of this module."""
    return fuse_silu(fuse_gelu(graph))


def _dtype(graph: Graph) -> torch.dtype:
    for node in graph:
        for v in node.params.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.dtype
    return torch.get_default_dtype()
