"""Interval bound propagation: the forward interpreter with ``rule.interval`` as its step."""
from __future__ import annotations

from ..bound_types import Interval
from ..graph.nodes import Graph
from ..perturbation import Perturbation
from .forward import forward


def ibp_bounds(graph: Graph, leaves: dict[str, Perturbation], upto: str | None = None,
               known: dict[str, Interval] | None = None) -> dict[str, Interval]:
    """Intervals of every node (or of the ancestors of ``upto``), keyed by node name."""
    names = graph.order if upto is None else graph.ancestors_order(upto)
    return forward(graph, lambda n: leaves[n.name].interval(),
                   lambda rule, node, ins: rule.interval(node, ins), names, dict(known or {}))
