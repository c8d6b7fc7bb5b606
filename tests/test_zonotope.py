"""Zonotope sets ``x = c + z G`` (``verifier.perturbation.Zonotope``), on the input and on an
intermediate node: CROWN's bounds are exact on a linear model (checked against the vertices of
the set, enumerated), sound on ReLU nets (points sampled in z and PGD in z, evaluated by the
torch module itself), never looser than the bounding box's; the style / brightness helpers
build the sets their formulas describe; bad input raises typed errors."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from verifier import BoundedModel, Box, PerturbationError, ShapeError, margin_spec
from verifier.attack import zonotope_pgd
from verifier.perturbation import Zonotope, brightness_contrast, style_shift


def _linear_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5))


def _relu_net(seed=0, side=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * (side // 2) ** 2, 8), nn.ReLU(), nn.Linear(8, 3))


def _zonotope(B=2, k=3, shape=(2, 4, 4), seed=0, norm=math.inf, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand((B, *shape), generator=g, dtype=dtype)
    G = 0.3 * torch.randn((B, k, *shape), generator=g, dtype=dtype)
    return Zonotope(c, G, norm)


def _first_relu(bm):
    return next(n.name for n in bm.graph if n.op == "relu")


# --- exactness and the box ---------------------------------------------------------------------
def test_crown_is_exact_on_a_linear_model_vertices_enumerated():
    net = _linear_net()
    bm = BoundedModel(net, (2, 4, 4), dtype=torch.float64)
    net = copy.deepcopy(net).double()
    Z = _zonotope(k=4)
    res = bm.bounds(Z, "crown", enclosing_box=False)
    # the min and max of a linear function over a zonotope lie at a vertex z in {-1, 1}^k
    verts = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=Z.k)), dtype=torch.float64)
    z = verts.unsqueeze(1).expand(-1, 2, -1)                           # [2^k, B, k]
    with torch.no_grad():
        y = net(Z.points(z).reshape(-1, 2, 4, 4)).reshape(len(verts), 2, -1)
    torch.testing.assert_close(res.lower, y.min(0).values, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.upper, y.max(0).values, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", [2, 1])
def test_crown_is_exact_on_a_linear_model_for_a_ball_of_z(norm):
    """z in the unit L2 / L1 ball: the least value of a·x is at z* = -Ga/||Ga|| (L2) or at
    -sign((Ga)_i) e_i for the largest |(Ga)_i| (L1); evaluated by the module."""
    net = _linear_net(1)
    bm = BoundedModel(net, (2, 4, 4), dtype=torch.float64)
    net = copy.deepcopy(net).double()
    Z = _zonotope(k=5, norm=norm, seed=1)
    res = bm.bounds(Z, "crown", enclosing_box=False)
    W = net[2].weight.detach()                                          # [5, 48]
    x0 = Z.center.clone().requires_grad_(True)
    J = torch.stack([torch.autograd.grad(net(x0)[:, j].sum(), x0)[0] for j in range(5)], 1)
    GA = torch.einsum("bkn,bjn->bjk", Z.generators.flatten(2), J.flatten(2))   # [B, out, k]
    if norm == 2:
        zs = -GA / GA.norm(dim=-1, keepdim=True)
    else:
        i = GA.abs().argmax(-1, keepdim=True)
        zs = torch.zeros_like(GA).scatter(-1, i, -torch.sign(GA.gather(-1, i)))
    assert W.shape == (5, 48)
    with torch.no_grad():
        for j in range(5):
            y = net(Z.points(zs[:, j].unsqueeze(0))[0])[:, j]
            torch.testing.assert_close(res.lower[:, j], y, rtol=1e-9, atol=1e-9)
            y = net(Z.points(-zs[:, j].unsqueeze(0))[0])[:, j]
            torch.testing.assert_close(res.upper[:, j], y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "alpha-crown"])
def test_never_looser_than_the_bounding_box(method):
    net = _relu_net(2)
    bm = BoundedModel(net, (2, 4, 4))
    Z = _zonotope(B=3, k=3, seed=2, dtype=torch.float32)
    C = margin_spec(torch.tensor([0, 1, 2]), 3)
    iv = Z.interval()
    box = bm.bounds(Box(iv.lower, iv.upper), method, spec=C)
    res = bm.bounds(Z, method, spec=C)
    assert (res.lower >= box.lower).all() and (res.upper <= box.upper).all()
    # the zonotope's own bound is the tighter one here (the set is much smaller than its box)
    assert (res.parts[method] > box.lower).float().mean() > 0.5
    # and on a linear model the zonotope's own bound alone is never looser (exact there)
    lin = BoundedModel(_linear_net(), (2, 4, 4), dtype=torch.float64)
    Z64 = _zonotope(k=3)
    own = lin.bounds(Z64, method, enclosing_box=False)
    iv = Z64.interval()
    b = lin.bounds(Box(iv.lower, iv.upper), method)
    assert (own.lower >= b.lower - 1e-9).all() and (own.upper <= b.upper + 1e-9).all()


# --- soundness on ReLU nets: sampled and attacked points inside every bound --------------------
def _check_inside(f, Z, res, C, n=500, tol=1e-4):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = Z.sample(n, g)                                              # [n, B, *shape]
        y = f(x.reshape(-1, *x.shape[2:])).reshape(n, x.shape[1], -1)
    v = torch.einsum("bso,nbo->nbs", C, y)
    assert (v >= res.lower - tol).all() and (v <= res.upper + tol).all()
    top = zonotope_pgd(f, Z, C, steps=30, restarts=3)
    low = zonotope_pgd(f, Z, -C, steps=30, restarts=3)
    assert (top.value <= res.upper + tol).all() and (-low.value >= res.lower - tol).all()
    assert (top.x.abs() <= 1 + 1e-6).all()                             # z stayed in its box
    return v, top.value, -low.value


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "alpha-crown"])
def test_sound_on_the_input(method):
    net = _relu_net(3)
    bm = BoundedModel(net, (2, 4, 4))
    Z = _zonotope(B=2, k=4, seed=3, dtype=torch.float32)
    C = margin_spec(torch.tensor([1, 2]), 3)
    res = bm.bounds(Z, method, spec=C)
    v, hi, lo = _check_inside(net, Z, res, C)
    assert (res.upper - res.lower).max() < 100   # not vacuous


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown"])
@pytest.mark.parametrize("about_mean", [True, False])
def test_sound_on_a_feature_map_style_shift(method, about_mean):
    net = _relu_net(4)
    bm = BoundedModel(net, (2, 4, 4))
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    node = _first_relu(bm)
    feat = bm.node_values(x)[node]
    torch.testing.assert_close(feat, net[:2](x))        # the node is the first ReLU's output
    Z = style_shift(feat, sigma=0.3, tau=0.2, about_mean=about_mean)
    C = margin_spec(net(x).argmax(1), 3)
    res = bm.bounds({node: Z}, method, spec=C)
    tail = net[2:]
    _check_inside(tail, Z, res, C)
    # the bounds of the nodes downstream hold too (the output's, by the model's node names)
    out = res[bm.graph.output]
    with torch.no_grad():
        y = tail(Z.sample(200).reshape(-1, 4, 4, 4)).reshape(200, 3, -1)
    assert (y >= out.lower - 1e-4).all() and (y <= out.upper + 1e-4).all()


def test_feature_map_set_is_tighter_than_its_box_and_zero_set_is_the_point():
    net = _relu_net(5)
    bm = BoundedModel(net, (2, 4, 4))
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    node = _first_relu(bm)
    feat = bm.node_values(x)[node]
    Z = style_shift(feat, 1e-7, 1e-7)
    res = bm.bounds({node: Z}, "crown")
    with torch.no_grad():
        y = net(x)
    assert (res.lower <= y + 1e-4).all() and (res.upper >= y - 1e-4).all()
    assert (res.upper - res.lower).max() < 1e-3


# --- the helpers build the sets their formulas describe ----------------------------------------
def test_style_shift_points_are_the_formula():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    sigma, tau = 0.4, 0.25
    Z = style_shift(x, sigma, tau)
    assert Z.k == 6
    s = (torch.rand(2, 3, generator=g, dtype=torch.float64) * 2 - 1) * sigma
    t = (torch.rand(2, 3, generator=g, dtype=torch.float64) * 2 - 1) * tau
    mu = x.mean(dim=(2, 3), keepdim=True)
    want = mu + (1 + s[..., None, None]) * (x - mu) + t[..., None, None]
    z = torch.cat([s / sigma, t / tau], 1)
    torch.testing.assert_close(Z.points(z), want)
    # the shifted channel's mean and std are the ones asked for
    torch.testing.assert_close(want.mean(dim=(2, 3)), mu[..., 0, 0] + t)
    torch.testing.assert_close(want.std(dim=(2, 3)), x.std(dim=(2, 3)) * (1 + s))
    Z0 = style_shift(x, sigma, tau, about_mean=False)
    torch.testing.assert_close(Z0.points(z), (1 + s[..., None, None]) * x + t[..., None, None])


def test_brightness_contrast_points_are_the_formula():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64)
    Z = brightness_contrast(x, brightness=0.1, contrast=0.2)
    assert Z.k == 2
    s, t = 0.15, -0.07
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    z = torch.tensor([[s / 0.2, t / 0.1]] * 3, dtype=torch.float64)
    torch.testing.assert_close(Z.points(z), mu + (1 + s) * (x - mu) + t)


def test_interval_contains_samples_and_is_tight_per_element():
    Z = _zonotope(B=2, k=3, seed=8)
    iv = Z.interval()
    x = Z.sample(2000)
    assert (x >= iv.lower).all() and (x <= iv.upper).all()
    # each element's extreme is attained at the vertex z = sign(G[:, i])
    zv = torch.sign(Z.generators.flatten(2)).transpose(1, 2)             # [B, n, k]
    hi = Z.points(zv.transpose(0, 1)).reshape(zv.shape[1], 2, -1)         # [n, B, n]
    diag = hi.diagonal(dim1=0, dim2=2)                                   # [B, n]
    torch.testing.assert_close(diag, iv.upper.flatten(1), rtol=1e-12, atol=1e-12)


def test_cast_to_float32_contains_the_float64_set():
    Z = _zonotope(B=1, k=3, seed=9)
    Z32 = Z.to(torch.float32)
    assert Z32.slack is not None and (Z32.slack > 0).any()
    a = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    exact_lo = Z.concretize(a, upper=False)
    lo32 = Z32.concretize(a.float(), upper=False).double()
    # the cast set contains the original: its min is no higher (up to float32 arithmetic)
    assert (lo32 <= exact_lo + 1e-5).all()


# --- bad input ----------------------------------------------------------------------------------
def test_errors_are_typed():
    c = torch.zeros(2, 3)
    with pytest.raises(PerturbationError, match="do not fit"):
        Zonotope(c, torch.zeros(4, 5))
    with pytest.raises(PerturbationError, match="NaN"):
        Zonotope(c, torch.full((4, 3), float("nan")))
    with pytest.raises(PerturbationError, match="NaN"):
        Zonotope(torch.full((2, 3), float("inf")), torch.zeros(4, 3))
    with pytest.raises(PerturbationError, match="k = 0"):
        Zonotope(c, torch.zeros(0, 3))
    with pytest.raises(PerturbationError):
        Zonotope(c, torch.zeros(4, 3), norm=3)
    with pytest.raises(PerturbationError):
        style_shift(torch.rand(1, 2, 3, 3), -0.1, 0.1)
    bm = BoundedModel(_relu_net(), (2, 4, 4))
    with pytest.raises(ShapeError, match="input shape"):
        bm.bounds(Zonotope(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2, 3, 3)))
    node = _first_relu(bm)
    with pytest.raises(ShapeError, match="per-sample shape"):
        bm.bounds({node: Zonotope(torch.zeros(1, 2, 4, 4), torch.ones(2, 2, 4, 4))})
    with pytest.raises(ShapeError, match="no node"):
        bm.bounds({"nope": Zonotope(torch.zeros(1, 2, 4, 4), torch.ones(2, 2, 4, 4))})


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + x


def test_a_set_on_a_node_that_a_skip_connection_bypasses_is_an_error():
    bm = BoundedModel(_Skip(), (4,))
    node = _first_relu(bm)
    with pytest.raises(ShapeError, match="bypass"):
        bm.bounds({node: Zonotope(torch.zeros(1, 4), torch.eye(4))})


@pytest.mark.parametrize("k", [3, 12])   # patch-form A at the leaf (k <= 8) and dense A
def test_every_intermediate_bound_holds(k):
    """Each node's interval (the zonotope's own, no box pass) holds at sampled points: node i
    of the graph is the output of the first i modules of the Sequential."""
    net = _relu_net(6, side=10)   # the second conv's window at the input: 5x5 of 10x10
    bm = BoundedModel(net, (2, 10, 10))
    Z = _zonotope(B=2, k=k, shape=(2, 10, 10), seed=6, dtype=torch.float32)
    res = bm.bounds(Z, "crown", enclosing_box=False)
    names = [n for n in bm.graph.order if n != bm.input]
    assert len(names) == len(net)
    x = torch.cat([Z.sample(300), Z.points(torch.sign(torch.randn(300, 2, k)))])
    checked = 0
    with torch.no_grad():
        for i, name in enumerate(names):
            v = net[:i + 1](x.reshape(-1, 2, 10, 10)).reshape(600, 2, *bm.graph[name].shape)
            b = res[name]
            assert (v >= b.lower - 1e-4).all() and (v <= b.upper + 1e-4).all(), name
            checked += 1
    assert checked == len(net)


def test_one_channel_style_shift_is_brightness_contrast():
    x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    a, b = style_shift(x, 0.3, 0.1), brightness_contrast(x, brightness=0.1, contrast=0.3)
    torch.testing.assert_close(a.generators, b.generators)
    torch.testing.assert_close(a.center, b.center)


def test_restrict_is_the_image_of_the_sub_box():
    Z = _zonotope(B=2, k=3, seed=11)
    zl = torch.tensor([[-1.0, 0.0, -0.5], [0.2, -1.0, -1.0]], dtype=torch.float64)
    zu = torch.tensor([[0.0, 1.0, 0.5], [0.4, 1.0, -0.8]], dtype=torch.float64)
    R = Z.restrict(zl, zu)
    u = torch.rand(100, 2, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z = zl + u * (zu - zl)                                   # points of the sub-box
    torch.testing.assert_close(R.points(2 * u - 1), Z.points(z))
    with pytest.raises(PerturbationError):
        Z.restrict(zu, zl)
