"""Parameters as perturbed inputs of the graph.

Linear and convolution nodes record which named parameters they hold (``params["param_names"]``:
role -> (name, layout)). ``lift`` returns a copy of the graph in which chosen parameters are
nodes of their own (a leaf with a perturbation set, or a node computed from one, such as
``W0 + t·delta``) and the layers that use them read them as inputs (``linear_w``, ``conv_w``).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import VerifierError
from ..ops import RULES
from ..ops.base import NotSupported
from .nodes import Graph, Node


def parameter_uses(graph: Graph) -> dict[str, list[tuple[str, str, str | None]]]:
    """Every named parameter a node of the graph holds: name -> [(node, role, layout)]."""
    uses: dict[str, list] = {}
    for node in graph:
        for role, (pname, layout) in node.params.get("param_names", {}).items():
            uses.setdefault(pname, []).append((node.name, role, layout))
    return uses


def parameter_values(graph: Graph) -> dict[str, torch.Tensor]:
    """Name -> the parameter's value as the source model stores it."""
    out = {}
    for pname, uses in parameter_uses(graph).items():
        node_name, role, layout = uses[0]
        v = graph[node_name].params[role]
        out[pname] = v.t() if layout == "t" else v
    return out


def _lifted_op(node: Node, pname: str) -> str:
    """The op of ``node`` with its parameter ``pname`` read as an input (its rule's answer)."""
    if node.op == "input":
        raise VerifierError(f"parameter {pname!r} is held by a leaf {node.name!r}")
    try:
        return RULES[node.op].lifted(node, pname)
    except NotSupported as e:
        raise VerifierError(e.why) from None


def lift(graph: Graph, sources: dict[str, str], extra: list[Node]) -> Graph:
    """A copy of ``graph`` where each parameter in ``sources`` (name -> the node producing its
    value, in the stored layout) is read from that node; ``extra`` are the new nodes (leaves
    first). The original graph is not modified."""
    uses = parameter_uses(graph)
    unknown = [p for p in sources if p not in uses]
    if unknown:
        raise VerifierError(f"unknown parameter(s) {unknown}; the model's perturbable parameters: "
                            f"{sorted(uses)}")
    taken = set(graph.order)
    for n in extra:
        if n.name in taken:
            raise VerifierError(f"parameter node name {n.name!r} clashes with a node of the model")
    nodes = list(extra)
    for node in graph:
        names = node.params.get("param_names", {})
        roles = [r for r in ("weight", "bias") if r in names and names[r][0] in sources]
        if not roles:
            nodes.append(node)
            continue
        ops = {_lifted_op(node, names[r][0]) for r in roles}
        params = dict(node.params)
        params["roles"] = tuple(roles)
        params["layouts"] = {r: names[r][1] for r in roles}
        params.setdefault("in_shape", graph[node.inputs[0]].shape)
        nodes.append(replace(node, op=ops.pop(),
                             inputs=list(node.inputs) + [sources[names[r][0]] for r in roles],
                             params=params))
    leaves = list(graph.leaves) + [n.name for n in extra if n.op == "input"]
    return Graph(nodes, output=graph.output, leaves=leaves)
