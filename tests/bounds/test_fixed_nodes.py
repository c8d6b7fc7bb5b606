"""CROWN's intermediate bounds keep the nodes that do not move over the sets (below the first
perturbed weight when the input is fixed) at their point value, without backward passes: the
bounds equal those of the full passes up to the slack, and contain the source model's values."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import verifier.bounds.crown as crown_mod
from verifier import BoundedModel, LpBall, margin_spec
from verifier.weights import ParameterSets, WeightPerturbation


class Net(nn.Module):
    """Token layers with a LayerNorm and a softmax over tokens, then a head."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b, self.head = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.ln(torch.relu(self.a(x)))
        w = torch.softmax(h.sum(-1, keepdim=True), dim=1)
        return self.head(torch.relu(self.b(h * w)).sum(1))


def _setup():
    torch.manual_seed(0)
    net = Net().eval()
    bm = BoundedModel(net, input_shape=(4, 5))
    x = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1)) - 0.5
    return net, bm, x


def test_fixed_nodes_are_those_below_the_perturbed_weights():
    net, bm, x = _setup()
    w = WeightPerturbation("b.weight", 0.01)
    sets = ParameterSets(bm.graph, w, torch.float32)
    g = sets.graph
    fixed = crown_mod.fixed_nodes(g, {g.leaves[0]: LpBall(x, 0.0), **sets.leaves}, g.order)
    assert g.leaves[0] in fixed and "b.weight" not in fixed
    assert g.output not in fixed
    for name in fixed:          # nothing downstream of the perturbed weight is fixed
        assert "b.weight" not in g.ancestors_order(name)
    moving = crown_mod.fixed_nodes(g, {g.leaves[0]: LpBall(x, 0.01), **sets.leaves}, g.order)
    assert not any(n in moving for n in g.order if g[n].op != "input" and g.leaves[0] in g.ancestors_order(n))


@pytest.mark.parametrize("pattern", ["b.weight", "head.weight"])
def test_point_shortcut_matches_full_passes_and_is_sound(pattern, monkeypatch):
    net, bm, x = _setup()
    w = WeightPerturbation(pattern, 0.02)
    C = margin_spec(torch.tensor([0, 1, 2]), 3)
    fast = bm.bounds(x, "crown", C, weights=w)
    monkeypatch.setattr(crown_mod, "fixed_nodes", lambda *a: set())
    full = bm.bounds(x, "crown", C, weights=w)
    monkeypatch.undo()
    assert torch.allclose(fast.lower, full.lower, atol=1e-4, rtol=1e-4)
    # truth: the source model with the weight at random points and vertices of the box
    gen = torch.Generator().manual_seed(2)
    p = dict(net.named_parameters())[pattern]
    W0 = p.detach().clone()
    try:
        for i in range(200):
            u = torch.rand(W0.shape, generator=gen) * 2 - 1
            with torch.no_grad():
                p.copy_(W0 + 0.02 * (u if i % 2 else u.sign()))
                m = torch.einsum("bso,bo->bs", C, net(x))
            assert (m >= fast.lower - 1e-4 * (1 + m.abs())).all()
    finally:
        with torch.no_grad():
            p.copy_(W0)
