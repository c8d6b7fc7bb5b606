"""Building the graph from torch.fx (verifier/graph/trace.py, mapping.py): node names are the fx
node names and key the intermediate bounds; identity ops become aliases; a bare torch.nn layer,
an fx.GraphModule and constant-first arithmetic trace; constants folded into a float64 graph are
exact; inputs the graph cannot bound are clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import Reference, check_sound, linf
from verifier import BoundedModel, LpBall, UnsupportedOpsError


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_node_names_are_fx_names_and_key_the_results():
    torch.manual_seed(0)
    bm = BoundedModel(Small(), input_shape=(3,))
    fx_names = [n.name for n in fx.symbolic_trace(Small()).graph.nodes]
    assert set(bm.graph.order) <= set(fx_names)
    assert "drop" not in bm.graph                       # Dropout in eval: an alias
    x = torch.randn(2, 3)
    for m in ("ibp", "crown", "crown-ibp"):
        r = bm.bounds(linf(x, 0.1), method=m)
        assert r["fc1"].lower.shape == (2, 4)
        assert r["relu"].lower.shape == (2, 4)
        with pytest.raises(KeyError, match="fc1"):
            r["nonexistent"]
    vals = Reference(bm).nodes(x)
    assert torch.allclose(vals["fc1"].float(), bm.module.fc1(x), atol=1e-6)


def test_graph_module_and_bare_layers_are_accepted():
    torch.manual_seed(1)
    gm = fx.symbolic_trace(Small())
    bm = BoundedModel(gm, input_shape=(3,), dtype=torch.float64)
    check_sound(bm, linf(torch.randn(2, 3), 0.2))
    for layer, shape in ((nn.ConvTranspose2d(2, 2, 3, stride=2), (2, 3, 3)),
                         (nn.Conv2d(1, 2, 3), (1, 4, 4)), (nn.Linear(3, 2), (3,)),
                         (nn.MaxPool2d(2), (1, 4, 4)), (nn.Sigmoid(), (5,))):
        bm = BoundedModel(layer, input_shape=shape, dtype=torch.float64)
        check_sound(bm, linf(torch.randn(2, *shape), 0.3), pgd_steps=5, n_random=32)


def test_constant_first_arithmetic_traces():
    """``c - x``, ``c * x``, ``c + x`` with a tensor attribute c are fx call_methods on c."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor([1.0, -2.0, 0.5]))

        def forward(self, x):
            return self.c - x + self.c * x + self.c.add(x) + torch.sub(self.c, x) + (2.0 - x)

    bm = BoundedModel(M(), input_shape=(3,), dtype=torch.float64)
    check_sound(bm, linf(torch.randn(2, 3), 0.5))


def test_float64_graph_folds_constants_exactly():
    """Division by a constant, BatchNorm and a constant pad value are folded in float64 (then
    cast): in a float64 graph, zero-width bounds equal the float64 model to 1e-12."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3).eval()
            with torch.no_grad():
                self.bn.running_var.copy_(torch.tensor([0.3, 1.7, 2.9]))
                self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.7]))

        def forward(self, x):
            return F.pad(self.bn(x / 3.0), (1, 1), value=0.1)

    bm = BoundedModel(M(), input_shape=(3,), dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    want = Reference(bm).outputs(x)
    for m in ("ibp", "crown"):
        r = bm.bounds(LpBall(x, 0.0), method=m)
        torch.testing.assert_close(r.lower, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(r.upper, want, atol=1e-12, rtol=1e-12)


def test_output_independent_of_input_is_an_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.ones(1, 2))

        def forward(self, x):
            return self.c * 2

    with pytest.raises(UnsupportedOpsError, match="does not depend"):
        BoundedModel(M(), input_shape=(2,))


def test_several_outputs_is_an_error():
    class M(nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    with pytest.raises(UnsupportedOpsError, match="2 outputs"):
        BoundedModel(M(), input_shape=(2,))


def test_batch_changing_ops_are_reported():
    class M(nn.Module):
        def forward(self, x):
            return x.sum(0, keepdim=True) + x.flatten(0)[:2].view(1, 2)

    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel(M(), input_shape=(2,))
    assert len(info.value.problems) >= 2
