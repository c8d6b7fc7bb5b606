"""The forward interpreter: one pass over the graph in topological order, in the spirit of
``torch.fx.Interpreter`` with values that are whatever a method propagates.

``forward(graph, leaf, step)`` gives each leaf ``leaf(node)`` and every other node
``step(rule, node, [values of its inputs])``; the methods are step functions over it:

* IBP: ``rule.interval`` (``verifier.bounds.ibp``), intervals;
* points: ``rule.point`` (``evaluate``), tensors, differentiable (attacks, replays);
* weight deviation: ``rule.deviation`` (``verifier.bounds.deviation``), L2 distances;
* Lipschitz: ``rule.lipschitz`` (``verifier.analysis.lipschitz``), constants;
* CROWN's intermediate bounds: IBP, then a backward pass per node (``verifier.bounds.crown``).

Live training bounds are IBP / CROWN on a graph whose params are the module's live tensors
(``verifier.graph.live``), so they need no step of their own.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..graph.nodes import Graph
from ..ops import RULES


def forward(graph: Graph, leaf: Callable, step: Callable, names=None, out: dict | None = None
            ) -> dict:
    """Values of ``names`` (default: every node, in topological order) keyed by node name.
    ``out``: values already known (not computed again), filled in place and returned, so a step
    may read any earlier node's value from it."""
    out = {} if out is None else out
    for name in graph.order if names is None else names:
        if name in out:
            continue
        node = graph[name]
        if node.op == "input":
            out[name] = leaf(node)
        else:
            out[name] = step(RULES[node.op], node, [out[i] for i in node.inputs])
    return out


def evaluate(graph: Graph, values: dict[str, torch.Tensor]):
    """The graph at a point: ``values`` holds every leaf ``[B, *shape]``; -> (output, every
    node's value by name). Differentiable."""
    vals = forward(graph, lambda n: values[n.name], lambda r, n, ins: r.point(n, ins),
                   out=dict(values))
    return vals[graph.output], vals
