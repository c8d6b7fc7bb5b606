"""fold_bias_adds: ``x @ W + b`` (and ONNX MatMul + Add) becomes one linear node, the graph still
computes exactly what the model computes, and the bounds it gives are sound (sampling + PGD).
A bias that a weight perturbation may replace is never folded into."""
from __future__ import annotations

import torch
from torch import nn

from tests.helpers import check_sound
from verifier import BoundedModel, LpBall
from verifier.graph.simplify import fold_bias_adds


class MatMulAdd(nn.Module):
    def __init__(self, dims=(6, 9, 7, 3), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(a, b, generator=g) / a ** 0.5)
                                    for a, b in zip(dims, dims[1:])])
        self.bs = nn.ParameterList([nn.Parameter(torch.randn(b, generator=g) * 0.3) for b in dims[1:]])

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.ws, self.bs)):
            x = x @ w + b
            if i < len(self.ws) - 1:
                x = torch.relu(x)
        return x


def test_matmul_add_pairs_fold_into_linear_nodes():
    bm = BoundedModel(MatMulAdd(), input_shape=(6,))
    ops = [n.op for n in bm.graph]
    assert ops.count("linear") == 3 and "affine" not in ops, bm.graph
    assert bm.graph.output in bm.graph


def test_folded_graph_computes_the_model_and_bounds_are_sound():
    net = MatMulAdd(seed=1)
    bm = BoundedModel(net, input_shape=(6,))
    x = torch.randn(16, 6)
    torch.testing.assert_close(bm.graph_forward(x), net(x), rtol=1e-5, atol=1e-5)
    check_sound(bm, LpBall(torch.randn(3, 6), 0.3), methods=("ibp", "crown", "alpha-crown"))


def test_linear_bias_plus_add_folds_exactly_and_named_bias_is_kept_apart():
    class LinAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.register_buffer("shift", torch.tensor([0.5, -0.25, 1.0, 2.0, -4.0]))

        def forward(self, x):
            return self.fc(x) + self.shift

    bm = BoundedModel(LinAdd(), input_shape=(4,))
    # fc.bias is a named parameter (a weight perturbation may replace it): no fold
    assert [n.op for n in bm.graph][1:] == ["linear", "affine"]
    x = torch.randn(8, 4)
    torch.testing.assert_close(bm.graph_forward(x), bm(x))


def test_fold_skips_a_bias_not_representable_in_the_dtype():
    net = MatMulAdd(dims=(3, 2), seed=2)
    bm = BoundedModel(net, input_shape=(3,))
    g = bm.graph
    lin = next(n for n in g if n.op == "linear")
    assert lin.params["bias"] is not None
    # a linear with its own unnamed bias whose sum with the added constant rounds
    from dataclasses import replace

    from verifier.graph.nodes import Graph, Node
    nodes = [g[g.leaves[0]],
             replace(lin, name="lin", params={**lin.params, "bias": torch.tensor([1.0, 1.0]),
                                              "param_names": {}}),
             Node("add", "affine", ["lin"], lin.shape, {"w": None, "b": torch.tensor([2.0 ** -30, 0.0])})]
    raw = Graph(nodes, output="add", leaves=g.leaves)
    assert fold_bias_adds(raw) is raw
    nodes[2] = Node("add", "affine", ["lin"], lin.shape, {"w": None, "b": torch.tensor([0.5, -1.0])})
    folded = fold_bias_adds(Graph(nodes, output="add", leaves=g.leaves))
    assert [n.op for n in folded] == ["input", "linear"]
    assert torch.equal(folded["add"].params["bias"], torch.tensor([1.5, 0.0]))


def test_weight_perturbation_on_a_folded_linear_is_sound():
    from tests.weights.test_weight_soundness import check
    from verifier.weights import WeightPerturbation
    net = MatMulAdd(seed=3)
    bm = BoundedModel(net, input_shape=(6,))
    held = {n.params["param_names"]["weight"][0] for n in bm.graph if n.op == "linear"}
    assert held == {"ws.0", "ws.1", "ws.2"}, held
    x = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    check(bm, net, x, WeightPerturbation(["ws.0", "ws.2"], 0.02), input_eps=0.05,
          methods=("ibp", "crown"), n=12)
