"""The normalized computational graph: perturbed nodes only; constants live in node params.

A ``Node`` is one operator application whose value depends on a perturbed leaf. Its ``op`` names
a bound rule in ``verifier.ops``; ``inputs`` are the names of the perturbed nodes it reads;
``params`` hold the constant tensors and attributes the rule needs. ``shape`` is the per-sample
shape (the batch dimension excluded). While a model is traced, a ``Ref`` stands for a perturbed
argument of a source operator (see ``verifier.graph.mapping``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch


@dataclass(frozen=True)
class Ref:
    """A perturbed argument of an fx node: the graph node it refers to and its per-sample shape."""
    name: str
    shape: tuple


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    shape: tuple[int, ...]
    params: dict = field(default_factory=dict)
    source: str = ""  # the source model's op (module type or function) for messages

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op}{tuple(self.inputs)} -> {list(self.shape)})"


class Graph:
    """A DAG of ``Node`` (networkx.DiGraph, edges input -> consumer) with one output node.

    ``leaves`` are the perturbed inputs (``op == "input"``) in the model's argument order.
    """

    def __init__(self, nodes: list[Node], output: str, leaves: list[str]):
        self.dag = nx.DiGraph()
        for n in nodes:
            self.dag.add_node(n.name, node=n)
        for n in nodes:
            for i in n.inputs:
                self.dag.add_edge(i, n.name)
        self.output = output
        self.leaves = list(leaves)
        rank = {n.name: i for i, n in enumerate(nodes)}
        self.order: list[str] = list(nx.lexicographical_topological_sort(self.dag, key=rank.__getitem__))
        self._ancestors: dict[str, list[str]] = {}

    def __getitem__(self, name: str) -> Node:
        return self.dag.nodes[name]["node"]

    def __contains__(self, name: str) -> bool:
        return name in self.dag

    def __iter__(self):
        return (self[n] for n in self.order)

    def __len__(self) -> int:
        return len(self.order)

    def consumers(self, name: str) -> list[Node]:
        return [self[s] for s in self.dag.successors(name)]

    def ancestors_order(self, name: str) -> list[str]:
        """Names of ``name`` and every node it depends on, in topological order."""
        if name not in self._ancestors:
            keep = nx.ancestors(self.dag, name) | {name}
            self._ancestors[name] = [n for n in self.order if n in keep]
        return self._ancestors[name]

    def to(self, dtype: torch.dtype, device=None) -> "Graph":
        """Cast every floating constant held in node params to ``dtype`` and move every tensor
        constant (index tensors too) to ``device`` (None: where each is); in place, returns self."""
        def cast(x):
            if not isinstance(x, torch.Tensor):
                return x
            return x.to(dtype=dtype if x.is_floating_point() else x.dtype, device=device)

        for node in self:
            for k, v in node.params.items():
                node.params[k] = [cast(x) for x in v] if isinstance(v, list) else cast(v)
        return self

    def __repr__(self) -> str:
        body = "\n".join(f"  {self[n]!r}" for n in self.order)
        return f"Graph(output={self.output}, {len(self)} nodes)\n{body}"
