"""Merging the spec C into the bound computation is never looser than bounding f and combining
the bounds afterwards by interval arithmetic: ``C+ l_f + C- u_f <= lower(C·f)`` and
``upper(C·f) <= C+ u_f + C- l_f``, for IBP, CROWN and CROWN-IBP; and with C = I (or a row
selection) the bounds equal those of f."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_sound, flat_margin_spec, model_perturbation, random_spec
from verifier import BoundedModel, Interval, LpBall
from verifier.bound_types import concretize_interval

METHODS = ("ibp", "crown", "crown-ibp")


def _nets():
    torch.manual_seed(0)
    yield "mlp", nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                               nn.Linear(12, 5)), (6,)
    yield "sigmoid", nn.Sequential(nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 10), nn.Tanh(),
                                   nn.Linear(10, 5)), (6,)
    yield "cnn", nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
                               nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 5)), (1, 6, 6)
    yield "pool_last", nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                                     nn.MaxPool2d(2, stride=1, padding=1)), (6,)


NETS = {name: (net, shape) for name, net, shape in _nets()}


def _cases():
    for name in NETS:
        for m in METHODS:
            yield pytest.param(name, m, id=f"{name}-{m}")


@pytest.mark.parametrize("name,method", list(_cases()))
@pytest.mark.parametrize("norm,eps", [("inf", 0.3), (2, 0.8)])
def test_merged_spec_at_least_as_tight_as_interval_combination(name, method, norm, eps):
    net, shape = NETS[name]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    B = 3
    pert = LpBall(torch.randn((B, *shape), generator=g), eps, norm)
    out = tuple(bm.output_shape)
    n = torch.Size(out).numel()
    for C in (random_spec(B, 4, out, seed=2), flat_margin_spec(torch.arange(B) % n, out)):
        rf = bm.bounds(pert, method=method)
        rc = bm.bounds(pert, method=method, spec=C)
        box = Interval(rf.lower, rf.upper)
        lo_comb = concretize_interval(C, box, upper=False)
        up_comb = concretize_interval(C, box, upper=True)
        tol = 1e-9 * (1 + lo_comb.abs())
        assert bool((rc.lower >= lo_comb - tol).all()), \
            f"merged lower below the combination by {(lo_comb - rc.lower).max().item():.3g}"
        assert bool((rc.upper <= up_comb + tol).all()), \
            f"merged upper above the combination by {(rc.upper - up_comb).max().item():.3g}"


@pytest.mark.parametrize("name", list(NETS))
def test_identity_and_selection_specs_equal_plain_bounds(name):
    net, shape = NETS[name]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    pert = LpBall(torch.randn((2, *shape), generator=torch.Generator().manual_seed(3)), 0.2)
    out = tuple(bm.output_shape)
    n = torch.Size(out).numel()
    eye = torch.eye(n, dtype=torch.float64).view(n, *out)
    for m in METHODS:
        rf = bm.bounds(pert, method=m)
        ri = bm.bounds(pert, method=m, spec=eye)                    # shared by the batch
        torch.testing.assert_close(ri.lower, rf.lower.reshape(2, n))
        torch.testing.assert_close(ri.upper, rf.upper.reshape(2, n))
        rows = eye[[n - 1, 0]]
        rs = bm.bounds(pert, method=m, spec=rows)
        torch.testing.assert_close(rs.lower, rf.lower.reshape(2, n)[:, [n - 1, 0]])


def test_margin_spec_sound_on_all_nets():
    for name, (net, shape) in NETS.items():
        bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
        out = tuple(bm.output_shape)
        n = torch.Size(out).numel()
        pert = LpBall(torch.randn((2, *shape), generator=torch.Generator().manual_seed(4)), 0.3)
        check_sound(bm, pert, spec=flat_margin_spec(torch.tensor([0, n - 1]), out), pgd_steps=10)


@pytest.mark.parametrize("name", list(NETS))
def test_backward_pass_with_spec_beats_combination_of_identity_pass(name):
    """The core statement, without the IBP intersections of ``crown_bounds``: with the same
    intermediate bounds (here IBP's), ``backward_bound(C)`` is never looser than the interval
    combination of ``backward_bound(I)`` (each neuron's line is picked by the sign of the merged
    coefficient, and the set is concretized once)."""
    from verifier.bounds import backward_bound, ibp_bounds

    net, shape = NETS[name]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    for norm in ("inf", 2, 1):
        pert = LpBall(torch.randn((3, *shape), generator=torch.Generator().manual_seed(5)), 0.4, norm)
        leaves = {bm.input: model_perturbation(bm, pert)}
        bounds = ibp_bounds(bm.graph, leaves)
        out = bm.graph.output
        shp = tuple(bm.output_shape)
        n = torch.Size(shp).numel()
        eye = torch.eye(n, dtype=torch.float64).view(1, n, *shp).expand(3, n, *shp)
        lf, uf = backward_bound(bm.graph, out, eye, bounds, leaves)
        box = Interval(lf.view(3, *shp), uf.view(3, *shp))
        C = random_spec(3, 5, shp, seed=6)
        lc, uc = backward_bound(bm.graph, out, C, bounds, leaves)
        assert bool((lc >= concretize_interval(C, box, upper=False) - 1e-9).all())
        assert bool((uc <= concretize_interval(C, box, upper=True) + 1e-9).all())
