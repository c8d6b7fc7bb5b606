"""The backward interpreter: CROWN's back-substitution over the graph, the one loop that
CROWN, CROWN-IBP, alpha-CROWN, beta-CROWN (branch and bound) and the patch form share.

From ``A`` at a start node (``A: [B, S, *shape]``, or patches, see ``verifier.bounds.patches``),
every node in reverse topological order passes its A to its inputs through its rule
(``rule.backward``, or ``rule.patch_step`` while A is patches) and adds the bias its relaxation
makes; at a leaf the linear bound is concretized over the leaf's perturbation set (dual norm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..graph.nodes import Graph
from ..ops import RULES
from .patches import Store, can_step, concretize, stays_patch


def dense_step(node, A_l, A_u, bounds, leaves, alpha=None, beta=None):
    """One backward step with dense A at ``node``: -> ([(A_l, A_u) per input], bias_l, bias_u);
    at a leaf, no inputs and the concretized bounds over its perturbation set. ``alpha``,
    ``beta``: per node name, passed to the rules that take them. ``A_u`` None: the lower bound
    only (every upper A and the upper bias are None)."""
    if node.op == "input":
        leaf = leaves[node.name]
        return [], leaf.concretize(A_l, upper=False), (None if A_u is None else
                                                       leaf.concretize(A_u, upper=True))
    rule = RULES[node.op]
    ins = [bounds[i] for i in node.inputs] if rule.needs_bounds else None
    extra = {}
    if alpha is not None and node.name in alpha:
        extra["alpha"] = alpha[node.name]
    if beta is not None and node.name in beta:
        extra["beta"] = beta[node.name]
    if A_u is None and not rule.lower_only:
        # a rule without a one-sided backward: its upper half is computed and dropped
        parts, b_l, _ = rule.backward(node, A_l, A_l, ins, **extra)
        return [(al, None) for al, _ in parts], b_l, None
    return rule.backward(node, A_l, A_u, ins, **extra)


def patch_step(node, g, vl, vu, bounds, leaves):
    """One backward step with patches: -> ([(geometry, A_l, A_u) per input], bias_l, bias_u);
    ``vu`` None: the lower bound only (as ``dense_step``)."""
    if node.op == "input":
        leaf = leaves[node.name]
        return [], concretize(g, vl, leaf, node.name, False), (
            None if vu is None else concretize(g, vu, leaf, node.name, True))
    rule = RULES[node.op]
    ins = [bounds[i] for i in node.inputs] if rule.needs_bounds else None
    if vu is None:
        outs, b_l, _ = rule.patch_step(node, g, vl, vl, ins)
        return [(gi, al, None) for gi, al, _ in outs], b_l, None
    return rule.patch_step(node, g, vl, vu, ins)


def _add(total, b):
    return total if b is None else total + b


def backward(graph: Graph, start: str, store: Store, bounds, leaves, alpha: dict | None = None,
             beta: dict | None = None, record: dict | None = None):
    """Lower and upper bounds ``[B, S]`` of the linear function whose A at ``start`` the
    ``store`` holds (dense or patches). A node's patches turn dense where its rule has no patch
    step or the window grows past ``patches.DENSE_SHARE`` of its map. ``record``: a dict whose
    keys are node names; each gets the dense lower-bound A that reaches that node. A store whose
    upper A is None asks for the lower bound only: ``upper`` is then None."""
    lower = upper = 0.0
    if store.dense.get(start, (None, 0))[1] is None or (
            start in store.patches and store.patches[start][2] is None):
        upper = None
    for name in reversed(graph.ancestors_order(start)):
        node = graph[name]
        if name in store.patches and not (can_step(node, leaves)
                                          and stays_patch(node, store.patches[name][0])):
            store.densify(name)
        if name in store.patches:
            g, vl, vu = store.patches.pop(name)
            outs, b_l, b_u = patch_step(node, g, vl, vu, bounds, leaves)
            lower, upper = lower + b_l, (None if upper is None else _add(upper, b_u))
            for inp, (gi, al, au) in zip(node.inputs, outs):
                store.add_patch(inp, gi, al, au)
        elif name in store.dense:
            A_l, A_u = store.dense.pop(name)
            if record is not None and name in record:
                record[name] = A_l
            parts, b_l, b_u = dense_step(node, A_l, A_u, bounds, leaves, alpha, beta)
            lower, upper = lower + b_l, (None if upper is None else _add(upper, b_u))
            for inp, (al, au) in zip(node.inputs, parts):
                if al is not None:  # None: the rule concretized that input itself
                    store.add_dense(inp, al, au)
    return lower, upper


@dataclass
class LinearBounds:
    """``lower, upper: [B, S]``: bounds of ``C·x_start``; ``A``: for each node asked for, the
    A of the lower bound that reached it (``[B, S, *shape]``): at a leaf, ``lower`` is the least
    value of ``A·x + bias`` over the leaf's set."""

    lower: torch.Tensor
    upper: torch.Tensor
    A: dict[str, torch.Tensor] = field(default_factory=dict)


def backward_linear(graph: Graph, start: str, C: torch.Tensor, bounds, leaves,
                    alpha: dict | None = None, beta: dict | None = None, keep=()) -> LinearBounds:
    """``backward_bound`` that also returns the lower bound's A at the nodes ``keep`` (e.g. for
    branching heuristics, or the input's for clipping a box)."""
    record = {k: None for k in keep}
    lower, upper = backward_bound(graph, start, C, bounds, leaves, alpha, beta, record)
    return LinearBounds(lower, upper, record)


def backward_bound(graph: Graph, start: str, C: torch.Tensor, bounds, leaves,
                   alpha: dict | None = None, beta: dict | None = None, record: dict | None = None,
                   upper: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lower and upper bounds ``[B, S]`` of ``C·x_start`` (``C: [B, S, *shape(start)]``);
    ``alpha``: optimized relaxation parameters by node name (alpha-CROWN, see
    ``BoundRule.alpha_init``); ``beta``: split multipliers by ReLU node name (beta-CROWN, see
    ``ReLU.backward``); ``record``: see ``backward`` (``backward_linear`` returns it).
    ``upper=False``: the lower bound only (about half the work), the upper one is None."""
    store = Store(graph)
    store.dense[start] = (C, C if upper else None)
    lower, up = backward(graph, start, store, bounds, leaves, alpha, beta, record)
    B, S = C.shape[:2]
    if not isinstance(lower, torch.Tensor):  # the start does not depend on any leaf
        lower = C.new_zeros(B, S) + lower
        up = None if up is None else C.new_zeros(B, S) + up
    return lower, up
