"""Soundness of every method under weight perturbations (alone and with an input set).

Truth comes from the source PyTorch module in float64, run by ``torch.func.functional_call`` with
the parameters replaced by points of the set: random points, vertices (L-inf), points on the
sphere (L2), and the weight-space PGD attack pushing every spec row down and up. Every output
bound and every intermediate node's bounds must contain them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from verifier import BoundedModel, LpBall, margin_spec
from verifier.graph.trace import _Recorder
from verifier.weight_attack import weight_pgd
from verifier.weights import ParameterSets, WeightPerturbation, WeightSegment

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")
TOL = 1e-4


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))


def tanh_mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4))


MODELS = {"mlp": (mlp, (6,)), "tanh_mlp": (tanh_mlp, (5,)), "cnn": (cnn, (1, 7, 7))}


class Truth:
    """Float64 outputs and node values of the source module with given parameters."""

    def __init__(self, module):
        self.gm = copy.deepcopy(fx.symbolic_trace(module)).double().eval()

    def nodes(self, x, params):
        gm = copy.deepcopy(self.gm)
        with torch.no_grad():
            for k, v in params.items():
                gm.get_parameter(k).copy_(v.double())
            rec = _Recorder(gm)
            out = rec.run(x.double())
        return out, rec.values


def weight_points(sets: ParameterSets, n: int, gen) -> list[dict]:
    """Parameter points of the sets: the center, vertices/sphere points and random points."""
    pts = []
    for i in range(n):
        pt = {}
        for name, p in sets.leaves.items():
            if name == "weight_segment.t":
                continue
            c = p.center[0].double()
            if p.norm == math.inf:
                e = p._eps_elementwise().expand_as(p.center)[0].double()
                u = torch.rand(c.shape, generator=gen, dtype=torch.float64) * 2 - 1
                if i % 2:
                    u = torch.sign(u)
                pt[name] = c + u * e
            else:
                g = torch.randn(c.shape, generator=gen, dtype=torch.float64)
                r = 1.0 if i % 2 else float(torch.rand((), generator=gen))
                pt[name] = c + g / g.norm() * float(p._eps_t[0]) * r * (1 - 1e-6)
        pts.append(pt)
    return pts


def check(bm: BoundedModel, module, x, weights, input_eps=0.0, methods=METHODS, n=24):
    """Assert every method's bounds contain sampled and attacked truths."""
    gen = torch.Generator().manual_seed(0)
    C = margin_spec(torch.zeros(x.shape[0], dtype=torch.long), bm.output_shape[0])
    pert = LpBall(x, input_eps) if input_eps > 0 else x
    sets = ParameterSets(bm.graph, weights, torch.float32)
    truth = Truth(module)
    seg = next((w for w in ([weights] if not isinstance(weights, list) else weights)
                if isinstance(w, WeightSegment)), None)
    points = weight_points(sets, n, gen)
    base = {k: v.double() for k, v in bm.parameters().items()}
    samples = []  # (input, params)
    for i, pt in enumerate(points):
        xi = x
        if input_eps > 0:
            xi = x + (torch.rand(x.shape, generator=gen) * 2 - 1) * input_eps
            if i % 2:
                xi = x + torch.sign(torch.rand(x.shape, generator=gen) - 0.5) * input_eps
        if seg is not None:
            t = seg.t[0] + (seg.t[1] - seg.t[0]) * (i % 3) / 2
            pt = dict(pt, **{k: base[k] + t * torch.as_tensor(d).double() for k, d in seg.delta.items()})
        samples.append((xi, pt))
    # the attack: every margin row pushed down and up (fixed input at the center)
    for b in range(x.shape[0]):
        for j in range(C.shape[1]):
            for sgn in (-1.0, 1.0):
                res = weight_pgd(sets, x.float(), lambda out, b=b, j=j, s=sgn: s * (C[b, j] @ out[b]),
                                 steps=15, restarts=1)
                samples.append((x, {k: v.double() for k, v in res.params.items()}))
    for method in methods:
        r = bm.bounds(pert, method, C, weights=weights)
        r_box = bm.bounds(pert, method, None, weights=weights)
        for xi, pt in samples:
            full = {**base, **pt}
            out, nodes = truth.nodes(xi, full)
            m = torch.einsum("bso,bo->bs", C.double(), out)
            tol = TOL * (1 + m.abs())
            assert (m >= r.lower.double() - tol).all(), (method, "spec lower", (m - r.lower).min())
            assert (m <= r.upper.double() + tol).all(), (method, "spec upper", (r.upper - m).min())
            tol = TOL * (1 + out.abs())
            assert (out >= r_box.lower.double() - tol).all(), (method, "output lower")
            assert (out <= r_box.upper.double() + tol).all(), (method, "output upper")
            for name, iv in r_box.nodes.items():
                if name in nodes and isinstance(nodes[name], torch.Tensor):
                    v = nodes[name]
                    t = TOL * (1 + v.abs())
                    assert (v >= iv.lower.double() - t).all() and (v <= iv.upper.double() + t).all(), \
                        (method, "node", name)


def _x(shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=g)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("case", ["inf_all", "relative_bias", "l2_one", "with_input"])
def test_weight_bounds_are_sound(model, case):
    make, shape = MODELS[model]
    module = make().eval()
    bm = BoundedModel(module, input_shape=shape)
    names = list(bm.parameters())
    if case == "inf_all":
        w, ie = WeightPerturbation("*.weight", 0.03), 0.0
    elif case == "relative_bias":
        w, ie = WeightPerturbation(["*.weight", "*.bias"], 0.1, relative=True), 0.0
    elif case == "l2_one":
        w, ie = [WeightPerturbation(names[0], 0.3, norm=2), WeightPerturbation(names[-2], 0.2, norm=2)], 0.0
    else:
        w, ie = WeightPerturbation(names[2], 0.05), 0.05
    check(bm, module, _x(shape), w, ie)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_segment_bounds_are_sound(model):
    make, shape = MODELS[model]
    module = make().eval()
    bm = BoundedModel(module, input_shape=shape)
    g = torch.Generator().manual_seed(5)
    delta = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in bm.parameters().items()
             if k.endswith("weight")}
    check(bm, module, _x(shape), WeightSegment(delta, t=(-0.5, 1.0)), methods=("ibp", "crown", "alpha-crown"))


def test_first_layer_with_fixed_input_is_exact():
    """With a fixed input, one perturbed layer's output range is exact: each entry moves by
    eps·||x||_1 (L-inf) or eps·||x||_2 (L2)."""
    module = nn.Sequential(nn.Linear(6, 3)).eval()
    bm = BoundedModel(module, input_shape=(6,))
    x = _x((6,), batch=1) - 0.5
    y = module(x)
    for norm, dual in ((math.inf, 1), (2, 2)):
        for method in METHODS:
            r = bm.bounds(x, method, weights=WeightPerturbation("0.weight", 0.1, norm=norm))
            rad = 0.1 * torch.linalg.vector_norm(x, ord=dual)
            assert torch.allclose(r.lower, y - rad, atol=1e-5), (norm, method)
            assert torch.allclose(r.upper, y + rad, atol=1e-5), (norm, method)


def test_zero_segment_equals_the_model():
    module = mlp().eval()
    bm = BoundedModel(module, input_shape=(6,))
    x = _x((6,))
    delta = {"0.weight": torch.ones(10, 6)}
    for method in ("ibp", "crown"):
        r = bm.bounds(x, method, weights=WeightSegment(delta, t=(0.0, 0.0)))
        assert torch.allclose(r.lower, module(x), atol=1e-5)
        assert torch.allclose(r.upper, module(x), atol=1e-5)


def test_crown_at_least_as_tight_as_ibp_and_alpha_at_least_as_tight_as_crown():
    module = mlp().eval()
    bm = BoundedModel(module, input_shape=(6,))
    x = _x((6,))
    C = margin_spec([0, 1], 4)
    w = WeightPerturbation("*.weight", 0.05)
    ibp = bm.bounds(x, "ibp", C, weights=w)
    crown = bm.bounds(x, "crown", C, weights=w)
    alpha = bm.bounds(x, "alpha-crown", C, weights=w)
    assert (crown.lower >= ibp.lower - 1e-5).all()
    assert (alpha.lower >= crown.lower - 1e-5).all()
    assert (crown.lower > ibp.lower + 1e-3).any()  # the relaxation is not just IBP


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("norm", [math.inf, 2])
def test_one_layer_input_and_weight_exact_extremes(layer, norm):
    """One layer, input box and weight ball: the exact max of each output is
    ``max over input vertices v of wc·v + b + eps ||v||_dual`` (the worst weight puts the whole
    radius on that output's row); every method's upper bound must reach it, and CROWN's stays
    within a factor of the exact spread."""
    import itertools
    torch.manual_seed(7)
    if layer == "linear":
        module, shape = nn.Sequential(nn.Linear(4, 2)).eval(), (4,)
    else:
        module, shape = nn.Sequential(nn.Conv2d(1, 2, 2)).eval(), (1, 2, 2)
    bm = BoundedModel(module, input_shape=shape)
    x = torch.tensor([0.3, -0.2, 0.5, 0.1]).reshape(1, *shape)
    r_in, eps = 0.4, 0.5
    W, b = module[0].weight.reshape(2, 4).double(), module[0].bias.double()
    dual = 1 if norm == math.inf else 2
    best_hi = torch.full((2,), -math.inf, dtype=torch.float64)
    best_lo = torch.full((2,), math.inf, dtype=torch.float64)
    for signs in itertools.product((-1, 1), repeat=4):
        v = x.reshape(4).double() + r_in * torch.tensor(signs, dtype=torch.float64)
        dev = eps * torch.linalg.vector_norm(v, ord=dual)
        best_hi = torch.maximum(best_hi, W @ v + b + dev)
        best_lo = torch.minimum(best_lo, W @ v + b - dev)
    w = WeightPerturbation("0.weight", eps, norm=norm)
    for method in METHODS:
        r = bm.bounds(LpBall(x, r_in), method, weights=w)
        up, lo = r.upper.reshape(2).double(), r.lower.reshape(2).double()
        assert (up >= best_hi - 1e-5).all(), (method, up, best_hi)
        assert (lo <= best_lo + 1e-5).all(), (method, lo, best_lo)
        if method == "crown":
            assert ((up - lo) <= 2.5 * (best_hi - best_lo)).all(), (up - lo, best_hi - best_lo)


def test_linear_before_a_convolution_with_perturbed_weights():
    """A perturbed dense layer below a convolution: the convolution's bounds take the
    patch-form pass, which must accept the dense layer concretizing its own weight set."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2 * 6 * 6)
            self.c = nn.Conv2d(2, 3, 3)
            self.o = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            h = torch.relu(self.fc(x)).view(-1, 2, 6, 6)
            return self.o(torch.relu(self.c(h)).flatten(1))

    torch.manual_seed(0)
    module = Net().eval()
    bm = BoundedModel(module, input_shape=(4,))
    check(bm, module, _x((4,)), WeightPerturbation(["fc.weight", "c.weight"], 0.02), 0.05,
          methods=("crown", "alpha-crown"), n=12)
