"""Graph surgery for sets placed on an intermediate node, or given as an affine image of a
low-dimensional variable.

* ``cut_at(graph, name)``: the part of the graph downstream of node ``name``, with that node
  turned into the only leaf (same name and shape). A set placed there ("the feature map at N is
  replaced by any point of S") is then bounded like an input set; what lies upstream of N
  was computed exactly for the fixed input and is not needed.
* ``affine_prefix(graph, center, G)``: the graph with its leaf ``x`` replaced by
  ``x = center + z G`` over a new leaf ``z: [k]`` (a linear node, then a reshape), so that
  input-split branch and bound can split the low-dimensional ``z``.
"""
from __future__ import annotations

import dataclasses
import math

import networkx as nx
import torch

from ..errors import ShapeError
from .nodes import Graph, Node


def cut_at(graph: Graph, name: str) -> Graph:
    """The subgraph of ``name``'s descendants with ``name`` as an input leaf (see module doc).

    Raises ShapeError when ``name`` is not a node, the output does not depend on it, or a node
    downstream also reads a perturbed value that does not pass through it (a skip connection
    around it): then replacing the node's value does not determine the output."""
    if name not in graph:
        raise ShapeError(f"no node {name!r} in the graph; nodes: {graph.order}")
    node = graph[name]
    if node.op == "input":
        if graph.leaves != [name]:
            raise ShapeError(f"node {name!r} is one of several leaves {graph.leaves}")
        return graph
    down = nx.descendants(graph.dag, name)
    if graph.output not in down:
        raise ShapeError(f"the output {graph.output!r} does not depend on node {name!r}")
    keep = down | {name}
    around = sorted({(d, i) for d in down for i in graph[d].inputs if i not in keep})
    if around:
        what = ", ".join(f"{d!r} reads {i!r}" for d, i in around)
        raise ShapeError(f"a set on node {name!r} does not determine the output: downstream "
                         f"nodes also read values that bypass it ({what}); place the set on a "
                         "node that every path from the input to the output goes through")
    nodes = [Node(name, "input", [], tuple(node.shape), source=f"cut at {node.source or node.op}")]
    nodes += [dataclasses.replace(graph[d], inputs=list(graph[d].inputs))
              for d in graph.order if d in down]
    return Graph(nodes, graph.output, [name])


def affine_prefix(graph: Graph, center: torch.Tensor, generators: torch.Tensor,
                  z_name: str = "z") -> Graph:
    """``graph`` with its only leaf ``x`` computed as ``center + z G`` from a new leaf
    ``z: [k]`` (``center: [*shape]``, ``generators: [k, *shape]``, one set: no batch)."""
    if len(graph.leaves) != 1:
        raise ShapeError(f"affine_prefix needs one leaf, the graph has {graph.leaves}")
    x = graph.leaves[0]
    shape = tuple(graph[x].shape)
    n = math.prod(shape)
    if tuple(center.shape) != shape or tuple(generators.shape[1:]) != shape:
        raise ShapeError(f"center {list(center.shape)} and generators {list(generators.shape)} "
                         f"do not fit the leaf {x!r} of shape {list(shape)}")
    if z_name in graph:
        raise ShapeError(f"the graph already has a node named {z_name!r}")
    k = generators.shape[0]
    W = generators.reshape(k, n).t().contiguous()                  # [n, k]: x_flat = W z + c
    flat = f"{x}.flat" if len(shape) != 1 else x
    nodes = [Node(z_name, "input", [], (k,), source="generator coefficients"),
             Node(flat, "linear", [z_name], (n,), {"weight": W, "bias": center.reshape(n).clone()},
                  source="center + z G")]
    if len(shape) != 1:
        idx = torch.arange(n, device="cpu")
        nodes.append(Node(x, "select", [flat], shape,
                          {"index": idx, "fill": None, "identity": True, "permutation": True,
                           "in_shape": (n,)}, source="reshape"))
    nodes += [graph[d] for d in graph.order if d != x]
    return Graph(nodes, graph.output, [z_name])
