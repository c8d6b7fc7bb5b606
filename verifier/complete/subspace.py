"""The subspace of the inputs that vary: ``x = lift(v)``, the spec's fixed inputs at their value.

A VNN-LIB region may fix most inputs (``lower == upper``) and let a few vary (a generator's
latent code in front of a classifier: 800 values, 8 varying). Input-split branch and bound then
works on ``v`` (the varying values): ``x = base`` with ``x[vary] = v``. The fixed inputs fold
into the graph's *affine front*: the nodes from the input up to the first nonlinearity (every
node whose rule is affine or moves data and reads only front nodes: dense layers, reshapes,
gathers, sums, ...). Each front node read from outside the front (a *frontier* node) is a
constant affine function of ``v``, ``F = W_F v + b_F``, and becomes one dense node from the
``n_vary`` inputs under its own name (``W_F`` and ``b_F`` probed through the front in float64
at ``lift(0)`` and ``lift(e_i)``, then rounded to the model's dtype, as the weights are), so
that every CROWN pass ends at ``n_vary`` inputs instead of ``n_in`` (A tensors ``[n, S, 8]``,
not ``[n, S, 800]``). Only vector-shaped frontier nodes fold: a convolution's output as a dense
layer would turn the patch-form CROWN passes of the layers after it into dense ones (measured:
1.6x slower on a small CNN), so a front ending in a feature map is left as it is.
``SubspaceModel`` is that graph with the attributes branch and bound reads of a
``BoundedModel``.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ..bounds.forward import evaluate, forward
from ..graph.nodes import Graph, Node
from ..ops import RULES


MAX_FOLD_ENTRIES = 50_000_000   # W_F entries of all frontier nodes together


def affine_front(graph: Graph, input_name: str) -> tuple[list[str], list[str]]:
    """``(front, frontier)``: the nodes affine in the input (in topological order, the input
    first) and those of them read by a node outside the front or being the output."""
    front = {input_name}
    for name in graph.order:
        node = graph[name]
        if name == input_name or node.op == "input" or not node.inputs:
            continue
        rule = RULES[node.op]
        if (rule.affine or rule.data_movement) and all(i in front for i in node.inputs):
            front.add(name)
    order = [n for n in graph.order if n in front]
    frontier = [n for n in order if n == graph.output
                or any(c.name not in front for c in graph.consumers(n))]
    return order, frontier


def foldable(graph: Graph, input_name: str, n_vary: int = 1) -> bool:
    """Whether the fixed inputs can be folded: the graph has one perturbed input, every
    frontier node is a vector, and the front's dense replacement (``n_vary`` columns per
    frontier element) stays under ``MAX_FOLD_ENTRIES``."""
    if [n for n in graph.order if graph[n].op == "input"] != [input_name]:
        return False
    _, frontier = affine_front(graph, input_name)
    if any(len(graph[f].shape) != 1 for f in frontier):
        return False
    return sum(math.prod(graph[f].shape) for f in frontier) * max(n_vary, 1) <= MAX_FOLD_ENTRIES


class SubspaceModel:
    """``model`` restricted to ``x = lift(v)``: ``vary`` (flat indices, ``[n_vary]``) the free
    inputs, ``base: [n_in]`` (float64) the values of the others. The nodes after the affine front
    keep their names, and so do the frontier nodes (now dense layers from the input); where the
    input itself is read from outside the front, its consumers read ``<input>__lift``."""

    def __init__(self, model, vary: torch.Tensor, base: torch.Tensor):
        g, name = model.graph, model.input
        if not foldable(g, name, int(vary.numel())):
            raise ValueError("the model's fixed inputs cannot be folded (several perturbed "
                             "inputs, an affine front that ends in a feature map, or folded "
                             "layers too large)")
        self.full = model
        self.vary = vary.long()
        self.base = base.double().flatten()
        front, frontier = affine_front(g, name)
        W, b = self._probe(g, name, front, frontier, model.input_shape)
        dtype = model.dtype
        n_vary = self.vary.numel()
        rename = {name: f"{name}__lift"}
        nodes = [dataclasses.replace(g[name], shape=(n_vary,), params=dict(g[name].params))]
        drop = set(front)
        for f in frontier:
            nodes.append(Node(rename.get(f, f), "linear", [name], tuple(g[f].shape),
                              {"weight": W[f].to(dtype).contiguous(), "bias": b[f].to(dtype)},
                              source="folded fixed inputs"))
        for node in g:
            if node.name in drop:
                continue
            ins = [rename.get(i, i) for i in node.inputs]
            nodes.append(node if ins == node.inputs else dataclasses.replace(node, inputs=ins))
        output = rename.get(g.output, g.output)
        self.graph = Graph(nodes, output, [name])
        self.input = name
        self.input_shape = (n_vary,)
        self.output_shape = model.output_shape
        self.dtype = model.dtype

    def _probe(self, g: Graph, name: str, front: list, frontier: list, input_shape):
        """``W[f]: [numel_f, n_vary]`` and ``b[f]: [numel_f]`` (float64) of each frontier node as
        an affine function of the varying inputs."""
        g64 = copy.deepcopy(g).to(torch.float64)
        n_vary = self.vary.numel()
        pts = self.base.expand(n_vary + 1, -1).clone()
        pts[:, self.vary] = 0.0
        pts[torch.arange(1, n_vary + 1, device=pts.device), self.vary] = 1.0
        pts = pts.reshape(n_vary + 1, *input_shape)
        with torch.no_grad():
            vals = forward(g64, lambda n: pts, lambda r, n, ins: r.point(n, ins), names=front)
        W, b = {}, {}
        for f in frontier:
            v = vals[f].reshape(n_vary + 1, -1)
            b[f] = v[0]
            W[f] = (v[1:] - v[:1]).T
        return W, b

    def restrict(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, *full input shape]`` -> the varying values ``[n, n_vary]``."""
        return x.reshape(x.shape[0], -1)[:, self.vary]

    def lift(self, v: torch.Tensor) -> torch.Tensor:
        """``[n, n_vary]`` (or ``[n_vary]``) -> full inputs ``[n, *input_shape]`` (or one)."""
        one = v.ndim == 1
        v = v.reshape(-1, self.vary.numel())
        x = self.base.to(v.dtype).expand(v.shape[0], -1).clone()
        x[:, self.vary] = v
        x = x.reshape(v.shape[0], *self.full.input_shape)
        return x[0] if one else x

    def graph_forward(self, v: torch.Tensor) -> torch.Tensor:
        """The restricted graph at ``v: [n, n_vary]`` (differentiable)."""
        return evaluate(self.graph, {self.input: v.to(self.dtype)})[0]
