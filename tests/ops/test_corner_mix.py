"""CROWN's choice of McCormick planes per output element (``verifier.ops.bilinear.corner_mix``):
of each pair of planes, the one whose coefficients move least over the box. The choice matches
the costs recomputed term by term; its lines hold at sampled points (float32 and float64, boxes
straddling 0, one-signed, points, wide); and on LayerNorm models, where the plane through the
end of ``c`` nearer 0 leans least on ``1 / sqrt(var)``, CROWN is sound by sampling and PGD and
tighter than with the fixed planes ``P(lx, ly)`` / ``P(lx, uy)``."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, margin_spec
from verifier.bound_types import Interval
from verifier.graph.nodes import Node
from verifier.ops import RULES
import verifier.ops.bilinear as bilinear
from verifier.ops.bilinear import corner_mix


def _cost(cx, cy, wx, wy):
    """The spread over the box of the plane through the corner ``(cx, cy)``: its coefficients
    are ``cy`` on x and ``cx`` on y."""
    return wx * abs(cy) + abs(cx) * wy


@pytest.mark.parametrize("seed", range(3))
def test_picks_the_plane_of_least_spread_term_by_term(seed):
    g = torch.Generator().manual_seed(seed)
    lx = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    ux = lx + torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 2
    ly = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    uy = ly + torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * 2
    mix = corner_mix(Interval(lx, ux), Interval(ly, uy),
                     lambda a, b: torch.einsum("bij,bjk->bik", a, b))
    assert mix is not None
    ml, mu = mix
    for b, i, k in itertools.product(range(2), range(3), range(5)):
        c = {}
        for name, (ex, ey) in {"ll": ("l", "l"), "uu": ("u", "u"), "lu": ("l", "u"),
                               "ul": ("u", "l")}.items():
            c[name] = sum(_cost((lx if ex == "l" else ux)[b, i, j].item(),
                                (ly if ey == "l" else uy)[b, j, k].item(),
                                (ux - lx)[b, i, j].item(), (uy - ly)[b, j, k].item())
                          for j in range(4))
        assert ml[b, i, k].item() == (1.0 if c["uu"] < c["ll"] - 1e-9 else 0.0) or \
            abs(c["uu"] - c["ll"]) < 1e-9
        assert mu[b, i, k].item() == (1.0 if c["ul"] < c["lu"] - 1e-9 else 0.0) or \
            abs(c["ul"] - c["lu"]) < 1e-9


def test_hand_computed_cases():
    """x in [-2, 0], y in [-0.1, 3]: below, P(ll) spreads 2*0.1 + 2*3.1 = 6.4 and P(uu) 2*3 + 0 =
    6 (mix 1); above, P(lu) 2*3 + 2*3.1 = 12.2 and P(ul) 2*0.1 + 0 = 0.2 (mix 1). x in [0, 1],
    y in [-5, 0.5]: P(ll) 5 < P(uu) 6, P(lu) 0.5 < P(ul) 10.5 (mix 0 both). A LayerNorm's
    ``c * r`` with ``r > 0`` and ``c`` straddling 0: P(lc, lr) below, P(uc, lr) above (both
    lines have the coefficient ``lr`` on ``c``)."""
    x = Interval(torch.tensor([[-2.0, 0.0, -3.0]]), torch.tensor([[0.0, 1.0, 0.1]]))
    y = Interval(torch.tensor([[-0.1, -5.0, 2.0]]), torch.tensor([[3.0, 0.5, 2.01]]))
    ml, mu = corner_mix(x, y, lambda a, b: a * b)
    assert ml.tolist() == [[1.0, 0.0, 0.0]]
    assert mu.tolist() == [[1.0, 0.0, 1.0]]


def test_infinite_ends_keep_the_default_planes():
    x = Interval(torch.tensor([[-float("inf"), 0.0]]), torch.tensor([[1.0, 1.0]]))
    y = Interval(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    mix = corner_mix(x, y, lambda a, b: a * b)
    assert mix is None or float(mix[0][0, 0]) == 0.0


class LNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.n1, self.n2 = nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x):
        return self.o(torch.relu(self.n2(self.b(torch.relu(self.n1(self.a(x)))))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layernorm_model_is_sound_and_tighter_than_fixed_planes(dtype, monkeypatch):
    torch.manual_seed(0)
    bm = BoundedModel(LNMLP(), input_shape=(6,), dtype=dtype)
    assert any(n.op == "normalize" for n in bm.graph)
    x = torch.randn(4, 6)
    C = margin_spec([0, 1, 2, 0], 3)
    rep = check_sound(bm, linf(x, 0.05), spec=C, pgd_steps=10, restarts=1,
                      methods=("crown", "alpha-crown"))
    new = rep.results["crown"].lower
    monkeypatch.setattr(bilinear, "CROWN_MIX", False)
    old = bm.bounds(linf(x, 0.05), "crown", spec=C).lower
    assert float((new - old).mean()) > 0
