"""The subspace of the inputs that vary: ``x = lift(v)``, the spec's fixed inputs at their value.

A VNN-LIB region may fix most inputs (``lower == upper``) and let a few vary (a generator's
latent code in front of a classifier: 800 values, 8 varying). Input-split branch and bound then
works on ``v`` (the varying values): ``x = base`` with ``x[vary] = v``. When every consumer of
the model's (flat) input is a linear layer ``y = W x + b``, the fixed inputs fold into it:
``y = W[:, vary] v + (b + W[:, fixed] base[fixed])`` (computed in float64, then rounded to the
model's dtype, as the weights are), so every CROWN pass ends at ``n_vary`` inputs instead of
``n_in`` (A tensors ``[n, S, 8]``, not ``[n, S, 800]``). ``SubspaceModel`` is that graph with
the attributes branch and bound reads of a ``BoundedModel``.
"""
from __future__ import annotations

import dataclasses

import torch

from ..bounds.forward import evaluate
from ..graph.nodes import Graph


def foldable(graph: Graph, input_name: str) -> bool:
    """Whether the fixed inputs can be folded: a flat input read only by linear layers."""
    consumers = graph.consumers(input_name)
    return (len(graph[input_name].shape) == 1 and bool(consumers)
            and all(c.op == "linear" and c.inputs == [input_name] for c in consumers))


class SubspaceModel:
    """``model`` restricted to ``x = lift(v)``: ``vary`` (flat indices, ``[n_vary]``) the free
    inputs, ``base: [n_in]`` (float64) the values of the others. Same node names as
    ``model.graph`` (only the input's shape and its consumers' weights and biases change)."""

    def __init__(self, model, vary: torch.Tensor, base: torch.Tensor):
        g, name = model.graph, model.input
        if not foldable(g, name):
            raise ValueError("the model's input is not a flat vector read only by linear layers")
        self.full = model
        self.vary = vary.long()
        self.base = base.double().flatten()
        fixed = torch.ones(self.base.numel(), dtype=torch.bool, device=self.base.device)
        fixed[self.vary] = False
        nodes = []
        for node in g:
            if node.name == name:
                node = dataclasses.replace(node, shape=(self.vary.numel(),),
                                           params=dict(node.params))
            elif node.inputs == [name]:
                W = node.params["weight"]
                b = node.params.get("bias")
                shift = W.double()[:, fixed] @ self.base[fixed]
                bias = shift if b is None else b.double() + shift
                params = {**node.params, "weight": W[:, self.vary].contiguous(),
                          "bias": bias.to(W.dtype)}
                params.pop("param_names", None)  # no longer the source model's parameters
                node = dataclasses.replace(node, params=params)
            nodes.append(node)
        self.graph = Graph(nodes, g.output, g.leaves)
        self.input = name
        self.input_shape = (self.vary.numel(),)
        self.output_shape = model.output_shape
        self.dtype = model.dtype

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
