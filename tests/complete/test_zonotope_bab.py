"""Branch and bound over the coefficients z of a zonotope (``zonotope_bab``) agrees with an
exhaustive grid over z plus PGD in z, evaluated by the torch module itself: ``unsat`` only where
no grid point or attack violates the property, ``sat`` only with a z in [-1, 1]^k whose point
violates it when the module is run on it; both verdicts occur (the test is not vacuous)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from verifier import BoundedModel, PerturbationError
from verifier.attack import zonotope_pgd
from verifier.complete.zonotope_bab import robustness_conjunctions, zonotope_bab
from verifier.perturbation import Zonotope, style_shift


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _grid_min_margin(f, Z, label, per_dim, attack=True):
    """min over a grid of z in [-1, 1]^k (and PGD in z) of y_label - max_{j != label} y_j."""
    ticks = torch.linspace(-1, 1, per_dim)
    z = torch.tensor(list(itertools.product(ticks.tolist(), repeat=Z.k)))     # [N, k]
    with torch.no_grad():
        y = f(Z.points(z.unsqueeze(1))[:, 0])                                 # [N, 3]
    other = torch.cat([y[:, :label], y[:, label + 1:]], 1)
    grid = float((y[:, label] - other.max(1).values).min())
    if not attack:
        return grid
    C = torch.zeros(1, 2, 3)
    C[0, :, label] = -1.0
    C[0, 0, [j for j in range(3) if j != label][0]] += 1.0
    C[0, 1, [j for j in range(3) if j != label][1]] += 1.0
    att = zonotope_pgd(f, Z, C, steps=40, restarts=4)                         # max y_j - y_label
    return min(grid, -float(att.value.max()))


def _edge(make, f, label, per_dim=7):
    """The magnitude where the coarse grid's least margin crosses 0 (bisection on a log
    scale): sets a bit smaller are hard to prove, a bit larger hold violations."""
    lo, hi = 1e-3, 1e2
    for _ in range(14):
        mid = (lo * hi) ** 0.5
        if _grid_min_margin(f, make(mid), label, per_dim, attack=False) > 0:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def _check(f, Z, label, v, per_dim):
    m = _grid_min_margin(f, Z, label, per_dim)
    if v.status == "unsat":
        assert m > 0, f"BaB said unsat, the grid/PGD found margin {m}"
    elif v.status == "sat":
        assert v.z.abs().max() <= 1.0
        x = Z.points(v.z.reshape(1, 1, -1).to(Z.center.dtype))[0]
        with torch.no_grad():
            y = f(x)[0]
        # the replayed point of the set violates the property in the module itself
        assert y[label] <= max(y[j] for j in range(3) if j != label) + 1e-5
        assert m <= 1e-4
    else:
        pytest.fail(f"no verdict: {v}")
    return v.status


def test_bab_over_z_on_the_input_agrees_with_a_grid():
    seen, splits = set(), 0
    for seed in range(3):
        net = _net(seed)
        bm = BoundedModel(net, (2, 4, 4))
        x = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
        label = int(net(x).argmax())
        edge = _edge(lambda m: style_shift(x, m, m), net, label)
        for mag in (0.8 * edge, 1.25 * edge):                   # near the edge: BaB must split
            Z = style_shift(x, mag, mag)                       # k = 4
            Cs, ds = robustness_conjunctions(label, 3)
            v = zonotope_bab(bm, Z, Cs, ds, timeout=20)
            seen.add(_check(net, Z, label, v, per_dim=9))
            splits = max(splits, v.domains if v.status == "unsat" else 0)
    assert seen == {"sat", "unsat"}
    assert splits > 1   # some unsat verdict needed branching


def test_bab_over_z_on_a_feature_map_agrees_with_a_grid():
    seen, splits = set(), 0
    for seed in range(3):
        net = _net(10 + seed)
        bm = BoundedModel(net, (2, 4, 4))
        node = next(n.name for n in bm.graph if n.op == "relu")
        x = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
        label = int(net(x).argmax())
        feat = bm.node_values(x)[node]
        edge = _edge(lambda m: style_shift(feat, m, 0.0), net[2:], label)
        for mag in (0.8 * edge, 1.25 * edge):
            Z = style_shift(feat, mag, 0.0)                    # k = 4 scales of 4 channels
            Cs, ds = robustness_conjunctions(label, 3)
            v = zonotope_bab(bm, Z, Cs, ds, node=node, timeout=20)
            seen.add(_check(net[2:], Z, label, v, per_dim=9))
            splits = max(splits, v.domains if v.status == "unsat" else 0)
    assert seen == {"sat", "unsat"}
    assert splits > 1


def test_bab_needs_one_box_zonotope():
    bm = BoundedModel(_net(0), (2, 4, 4))
    Cs, ds = robustness_conjunctions(0, 3)
    with pytest.raises(PerturbationError, match="batch 1"):
        zonotope_bab(bm, Zonotope(torch.zeros(2, 2, 4, 4), torch.ones(1, 2, 4, 4)), Cs, ds)
    with pytest.raises(PerturbationError, match="ball"):
        zonotope_bab(bm, Zonotope(torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4), norm=2), Cs, ds)
    with pytest.raises(PerturbationError, match="dtype"):
        zonotope_bab(bm, Zonotope(torch.zeros(1, 2, 4, 4, dtype=torch.float64),
                                  torch.ones(1, 2, 4, 4, dtype=torch.float64)), Cs, ds)
