"""The example operator of docs/adding-an-operator.md (softsign), added with only the three
pieces (a rule, a mapping entry, this test), reaches every method: IBP, CROWN (dense and
patches), alpha-CROWN (its tangent points are free), a weight perturbation and a certified
Lipschitz constant, each checked by sampling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_sound, linf
from verifier import BoundedModel
from verifier.graph import mapping
from verifier.lipschitz import lipschitz_constant
from verifier.ops import RULES, register
from verifier.ops.activation import SShaped
from verifier.weights import WeightPerturbation


@pytest.fixture
def softsign():
    """Register the doc's rule and mapping entry for this test only."""
    saved_rules, saved_fns = dict(RULES), dict(mapping.FUNCTIONS)

    @register("softsign")
    class Softsign(SShaped):
        """f(x) = x / (1 + |x|)."""

        def f(self, node, x):
            return x / (1 + x.abs())

        def df(self, x):
            return 1 / (1 + x.abs()) ** 2

    mapping.FUNCTIONS[F.softsign] = mapping.activation("softsign")
    yield Softsign
    RULES.clear()
    RULES.update(saved_rules)
    mapping.FUNCTIONS.clear()
    mapping.FUNCTIONS.update(saved_fns)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.softsign(self.fc1(x)))


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        h = F.softsign(self.c2(F.softsign(self.c1(x))))
        return self.fc(h.flatten(1))


def test_new_operator_is_sound_under_every_method(softsign):
    torch.manual_seed(0)
    bm = BoundedModel(Mlp(), input_shape=(6,), dtype=torch.float64)
    assert any(n.op == "softsign" for n in bm.graph)
    rep = check_sound(bm, linf(torch.randn(3, 6), 0.8),
                      methods=("ibp", "crown", "crown-ibp", "alpha-crown"))
    a, c = rep.results["alpha-crown"], rep.results["crown"]
    assert (a.lower >= c.lower - 1e-9).all() and (a.upper <= c.upper + 1e-9).all()
    assert float((a.upper - a.lower).sum()) < float((c.upper - c.lower).sum()) - 1e-6, \
        "alpha-CROWN found no freedom in the new rule's tangent points"


def test_new_operator_in_a_convolutional_net_uses_the_patch_step(softsign, monkeypatch):
    torch.manual_seed(1)
    bm = BoundedModel(Cnn(), input_shape=(1, 7, 7), dtype=torch.float64)
    calls = []
    orig = softsign.patch_step

    def counted(self, *args):
        calls.append(1)
        return orig(self, *args)

    monkeypatch.setattr(softsign, "patch_step", counted)
    check_sound(bm, linf(torch.rand(2, 1, 7, 7), 0.2), methods=("crown",))
    assert calls, "CROWN never took the new rule's patch step"


def test_new_operator_under_a_weight_perturbation(softsign):
    torch.manual_seed(2)
    net = Mlp()
    bm = BoundedModel(net, input_shape=(6,), dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    eps = 0.05
    res = bm.bounds(x, "crown", weights=WeightPerturbation(["fc1.weight", "fc2.weight"], eps))
    assert torch.isfinite(res.lower).all() and torch.isfinite(res.upper).all()
    W1, W2 = net.fc1.weight.detach().double(), net.fc2.weight.detach().double()
    gen = torch.Generator().manual_seed(0)
    for k in range(200):
        s = (lambda W: torch.sign(torch.randn(W.shape, generator=gen, dtype=W.dtype))) if k % 2 \
            else (lambda W: torch.rand(W.shape, generator=gen, dtype=W.dtype) * 2 - 1)
        y = bm.graph_forward(x, params={"fc1.weight": W1 + eps * s(W1), "fc2.weight": W2 + eps * s(W2)})
        assert (y >= res.lower - 1e-9).all() and (y <= res.upper + 1e-9).all()


def test_new_operator_gets_a_certified_lipschitz_constant(softsign):
    torch.manual_seed(3)
    net = Mlp()
    rep = lipschitz_constant(BoundedModel(net, input_shape=(6,), dtype=torch.float64))
    net = net.double()
    row = [l for l in rep.layers if l.op == "softsign"]
    assert row and row[0].constant == pytest.approx(1.0)
    x = torch.randn(500, 6, dtype=torch.float64)
    d = torch.randn(500, 6, dtype=torch.float64) * 0.1
    with torch.no_grad():
        ratio = (net(x + d) - net(x)).norm(dim=1) / d.norm(dim=1)
    assert float(ratio.max()) <= rep.lipschitz
    assert math.isfinite(rep.lipschitz)
