"""alpha-CROWN's intermediate phase on the operands of attention's products
(``verifier.bounds.alpha``: ``intermediate="operands"``, the default on graphs with products of
perturbed tensors): which nodes it picks, that every bound it returns (the output's and every
intermediate node's, the tightened operands included) holds at sampled and PGD points in float32
and float64, that it is never looser than CROWN, and that its option is validated."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, Box, margin_spec
from verifier.bounds.alpha import alpha_crown, product_operands
from verifier.bounds.crown import crown
from verifier.errors import VerifierError
from tests.helpers import check_sound


class Block(nn.Module):
    """Pre-LN encoder block: softmax attention (2 heads) and a ReLU MLP, both residual."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):                                       # [B, n, d]
        B, n, d = x.shape
        z = self.ln1(x)
        q = self.q(z).reshape(B, n, self.h, self.dh).transpose(1, 2)
        k = self.k(z).reshape(B, n, self.h, self.dh).transpose(1, 2)
        v = self.v(z).reshape(B, n, self.h, self.dh).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        x = x + self.o((w @ v).transpose(1, 2).reshape(B, n, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    def __init__(self, d=4, blocks=2, out=3):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.Sequential(*(Block(d) for _ in range(blocks)))
        self.head = nn.Linear(d, out)

    def forward(self, x):                                       # [B, n, d]
        return self.head(self.blocks(self.embed(x)).mean(1))


def _model(dtype, blocks=2, seed=0):
    torch.manual_seed(seed)
    return BoundedModel(TinyViT(blocks=blocks), input_shape=(3, 4), dtype=dtype)


def _box(eps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 4, generator=g, dtype=dtype)
    return Box(x - eps, x + eps)


def test_operands_are_the_projections_read_by_the_products_after_the_first():
    """Block 0's products have no product before their Q, K and V; block 1's Q, K (of Q K^T)
    and V (of weights @ values) have, and none depends on another: one group. The softmax
    weights are no projection: never picked."""
    bm = _model(torch.float64)
    g = bm.graph
    products = [n for n in g.order if g[n].op == "einsum"]
    assert len(products) == 4
    groups = product_operands(g)
    assert len(groups) == 1
    want = [*g[products[2]].inputs, g[products[3]].inputs[1]]
    assert sorted(groups[0]) == sorted(want)
    assert g[products[3]].inputs[0] not in groups[0]          # the softmax weights
    # three blocks: block 2's projections depend on block 1's (through its products)
    three = _model(torch.float64, blocks=3).graph
    assert [len(grp) for grp in product_operands(three)] == [3, 3]
    # one block: nothing to pick, and "auto" is layer by layer
    assert product_operands(_model(torch.float64, blocks=1).graph) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_operand_alpha_is_sound_and_never_looser_than_crown(dtype):
    bm = _model(dtype)
    box = _box(0.05, dtype)
    C = margin_spec([0], 3, dtype=dtype)
    rep = check_sound(bm, box, spec=C, methods=("crown", "alpha-crown"), pgd_steps=10,
                      restarts=1)
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert bool((a.lower >= c.lower - tol).all() and (a.upper <= c.upper + tol).all())
    assert float((a.lower - c.lower).max()) > 1e-3


def test_operand_bounds_tighten_crowns_and_stay_inside_them():
    """The tightened operands (and every node re-bounded over them) lie inside CROWN's own
    intervals, and the operands are strictly tighter somewhere."""
    bm = _model(torch.float64)
    g = bm.graph
    leaves = bm._leaves(_box(0.05, torch.float64))
    C = margin_spec([0], 3, dtype=torch.float64)
    c = crown(g, leaves, C)
    a = alpha_crown(g, leaves, C, intermediate="operands", iterations=5, target=None)
    for name, iv in c.nodes.items():
        assert bool((a.nodes[name].lower >= iv.lower - 1e-9).all()), name
        assert bool((a.nodes[name].upper <= iv.upper + 1e-9).all()), name
    gain = max(float(((c.nodes[n].upper - c.nodes[n].lower) - (a.nodes[n].upper - a.nodes[n].lower)).max())
               for grp in product_operands(g) for n in grp)
    assert gain > 1e-3


def test_named_nodes_and_output_only_are_sound_too():
    bm = _model(torch.float64, seed=3)
    g = bm.graph
    box = _box(0.04, torch.float64, seed=5)
    leaves = bm._leaves(box)
    C = margin_spec([1], 3, dtype=torch.float64)
    c = crown(g, leaves, C)
    q1 = product_operands(g)[0][0]
    for option in ([q1], False, True):
        a = alpha_crown(g, leaves, C, intermediate=option, iterations=5, intermediate_iterations=3)
        assert bool((a.lower >= c.lower - 1e-9).all())
        # the truth at sampled points of the box
        x = box.lower + (box.upper - box.lower) * torch.rand(256, *box.lower.shape[1:],
                                                             dtype=torch.float64).unsqueeze(1)
        y = bm.module.double()(x.flatten(0, 1)).view(256, 1, 3)
        m = torch.einsum("bsk,nbk->nbs", C, y)
        assert bool((m >= a.lower - 1e-9).all()), option


def test_a_past_deadline_gives_crowns_bounds():
    bm = _model(torch.float64)
    g = bm.graph
    leaves = bm._leaves(_box(0.05, torch.float64))
    C = margin_spec([0], 3, dtype=torch.float64)
    c = crown(g, leaves, C)
    a = alpha_crown(g, leaves, C, deadline=time.perf_counter() - 1)
    assert torch.allclose(a.lower, c.lower)


@pytest.mark.parametrize("bad", ["everything", ["no_such_node"], [3]])
def test_an_invalid_intermediate_option_is_a_typed_error(bad):
    bm = _model(torch.float64)
    leaves = bm._leaves(_box(0.05, torch.float64))
    with pytest.raises(VerifierError, match="intermediate"):
        alpha_crown(bm.graph, leaves, None, intermediate=bad)


def test_auto_is_layer_by_layer_without_products(monkeypatch):
    """On a plain MLP "auto" keeps the layer-by-layer optimization (no operands to pick)."""
    torch.manual_seed(0)
    bm = BoundedModel(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                    nn.Linear(16, 3)), input_shape=(4,), dtype=torch.float64)
    assert product_operands(bm.graph) == []
    x = torch.randn(2, 4, dtype=torch.float64)
    leaves = bm._leaves(Box(x - 0.3, x + 0.3))
    auto = alpha_crown(bm.graph, leaves, None, iterations=10)
    layers = alpha_crown(bm.graph, leaves, None, iterations=10, intermediate=True)
    assert torch.equal(auto.lower, layers.lower) and torch.equal(auto.upper, layers.upper)


def test_operands_run_only_where_the_output_slopes_leave_a_row_unproved(monkeypatch):
    """With a spec and a target, the output slopes come first: the operand phase runs only
    when some row's lower bound is still at or below the target."""
    from verifier.bounds import alpha as alpha_mod
    bm = _model(torch.float64)
    g = bm.graph
    leaves = bm._leaves(_box(0.05, torch.float64))
    C = margin_spec([0], 3, dtype=torch.float64)
    calls = []
    real = alpha_mod._tighten_operands
    monkeypatch.setattr(alpha_mod, "_tighten_operands",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    c = crown(g, leaves, C)
    low = float(c.lower.min()) - 1.0          # every row already above it: no operand phase
    a = alpha_crown(g, leaves, C, iterations=3, target=low)
    assert calls == [] and bool((a.lower >= c.lower - 1e-9).all())
    high = float(c.upper.max()) + 1.0         # no row can reach it: the operands run
    b = alpha_crown(g, leaves, C, iterations=3, target=torch.full((2,), high, dtype=torch.float64))
    assert calls == [1] and bool((b.lower >= a.lower - 1e-9).all())


MODERN = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "modern"


@pytest.mark.slow
@pytest.mark.skipif(not (MODERN / "reference.json").exists(), reason="needs ../shared")
def test_vit_tiny_box_4_is_sound_against_the_empirical_minima_and_tighter_than_crown():
    """The benchmark ViT's hardest box: alpha-CROWN's default (the operands of block 1) stays
    below the reference's sampled + PGD minimum of every margin, and above CROWN."""
    ref = json.loads((MODERN / "reference.json").read_text())["models"]["vit_tiny"]
    s = next(s for s in ref["samples"] if s["index"] == 4)
    bm = BoundedModel.from_onnx(MODERN / "vit_tiny.onnx")
    xl, xu = np.load(MODERN / "vit_tiny_xl.npy")[4:5], np.load(MODERN / "vit_tiny_xu.npy")[4:5]
    box = Box(torch.tensor(xl), torch.tensor(xu))
    C = margin_spec([int(s["y"])], 10)
    c = bm.bounds(box, "crown", spec=C).lower[0].double()
    a = bm.bounds(box, "alpha-crown", spec=C).lower[0].double()
    emp = torch.tensor(s["empirical"]["min"], dtype=torch.float64)
    assert bool((a <= emp + 1e-5).all())
    assert bool((a >= c - 1e-5).all()) and float((a - c).min()) > 0.5
