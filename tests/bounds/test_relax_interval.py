"""``Interval.relax``: where IBP tightens CROWN's bounds of a pre-activation, ReLU draws the lines
of neurons that stay unstable over CROWN's own (wider) interval and uses the intersection only
to detect stable neurons (``verifier.bounds.crown.intermediate_bounds``).

- the lines are valid on the true range and exact for stable neurons (sampled);
- on the IBP-trained reference CNN, where IBP does tighten CROWN, the path is taken, the
  bounds contain sampled and PGD values, and they are at least as tight as plain CROWN without
  any IBP intersection, row by row.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import check_sound
from verifier import BoundedModel, Box, margin_spec
from verifier.bound_types import Interval
from verifier.bounds import crown
from verifier.ops import RULES

DATA = Path(__file__).resolve().parents[1] / "data" / "classifiers"


@pytest.mark.parametrize("op", ["relu", "leaky_relu"])
def test_relaxation_over_relax_interval_is_valid_and_exact_when_stable(op):
    g = torch.Generator().manual_seed(0)
    n = 4000
    a = torch.randn(1, n, generator=g) * 2
    b = torch.randn(1, n, generator=g) * 2
    lo, up = torch.minimum(a, b), torch.maximum(a, b)           # the (tight) interval
    wl = lo - torch.rand(1, n, generator=g) * 3                    # a wider sound one
    wu = up + torch.rand(1, n, generator=g) * 3
    x = Interval(lo, up, relax=Interval(wl, wu))
    node = type("N", (), {"name": "r", "params": {"negative_slope": 0.1} if op == "leaky_relu" else {}})()
    rule = RULES[op]
    kl, bl, ku, bu = rule.relaxation(node, x)
    t = torch.rand(64, n, generator=g)
    pts = torch.cat([lo + t * (up - lo), lo, up])                  # points of the true range
    f = rule.f(node, pts)
    tol = 1e-5 * (1 + pts.abs())
    assert (kl * pts + bl <= f + tol).all()
    assert (f <= ku * pts + bu + tol).all()
    stable = ((lo >= 0) | (up <= 0)).expand_as(pts)
    assert stable.any() and (~stable).any()
    assert torch.allclose((kl * pts + bl)[stable], f[stable], atol=1e-6)
    assert torch.allclose((ku * pts + bu)[stable], f[stable], atol=1e-6)
    # unstable neurons take the lines of the wide interval
    wide = rule.relax(node, wl, wu)
    unstable = ~stable[0]
    assert torch.equal(ku[0, unstable], wide[2][0, unstable])


def _cnn_small():
    name = "lirpa_mnist_cnn_small"
    d = DATA
    if not (d / f"{name}.onnx").exists():
        pytest.skip("tests/data/classifiers missing")
    import numpy as np
    bm = BoundedModel.from_onnx(d / f"{name}.onnx")
    xl = torch.from_numpy(np.load(d / f"{name}_xl.npy")).float()
    xu = torch.from_numpy(np.load(d / f"{name}_xu.npy")).float()
    y = torch.from_numpy(np.load(d / f"{name}_y.npy")).long()
    return bm, xl, xu, y


def test_relax_path_taken_sound_and_not_looser_than_plain_crown(monkeypatch):
    bm, xl, xu, y = _cnn_small()
    box, C = Box(xl, xu), margin_spec(y, 10)
    res = bm.bounds(box, "crown", spec=C)
    _, _, nodes = crown.crown_bounds(bm.graph, bm._leaves(box), C)
    assert any(iv.relax is not None for iv in nodes.values()), \
        "IBP never tightened CROWN here: the test no longer exercises Interval.relax"
    check_sound(bm, Box(xl[:2], xu[:2]), spec=C[:2], methods=("crown",), n_random=32,
                n_extreme=32, pgd_steps=10, restarts=1, node_neurons=2)

    # plain CROWN: intermediate bounds never intersected with IBP
    def no_ibp(graph, leaves, method, upto=None, prior=None, relax_lines=True):
        bounds = {}
        for name in (graph.order if upto is None else graph.ancestors_order(upto)):
            node = graph[name]
            if node.op == "input":
                bounds[name] = leaves[name].interval()
                continue
            rule = RULES[node.op]
            bounds[name] = rule.interval(node, [bounds[i] for i in node.inputs])
            if (name != upto and not crown._ibp_exact(graph, node, leaves)
                    and any(RULES[c.op].needs_bounds for c in graph.consumers(name))):
                bounds[name] = crown.refine_node(graph, name, bounds, leaves)
        return bounds

    monkeypatch.setattr(crown, "intermediate_bounds", no_ibp)
    plain = bm.bounds(box, "crown", spec=C)
    tol = 1e-4 * (1 + plain.lower.abs())
    assert (res.lower >= plain.lower - tol).all()
    assert (res.lower > plain.lower + tol).any()  # and the IBP intersection does help here
