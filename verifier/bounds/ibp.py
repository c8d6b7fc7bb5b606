"""Interval bound propagation: one forward pass of ``rule.interval`` in topological order."""
from __future__ import annotations

from ..bound_types import Interval
from ..graph.nodes import Graph
from ..ops import RULES
from ..perturbation import Perturbation


def ibp_bounds(graph: Graph, leaves: dict[str, Perturbation], upto: str | None = None,
               known: dict[str, Interval] | None = None) -> dict[str, Interval]:
    """Intervals of every node (or of the ancestors of ``upto``), keyed by node name."""
    out: dict[str, Interval] = dict(known or {})
    names = graph.order if upto is None else graph.ancestors_order(upto)
    for name in names:
        if name in out:
            continue
        node = graph[name]
        if node.op == "input":
            out[name] = leaves[name].interval()
        else:
            out[name] = RULES[node.op].interval(node, [out[i] for i in node.inputs])
    return out
