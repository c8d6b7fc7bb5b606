"""LP-refined bounds of ReLU chains (``complete/lp_refine.py``): every refined pre-activation
interval holds the network's pre-activations at sampled and PGD points of the box, the LP
margins of a domain lie below the exact MILP minimum, a domain whose splits no input satisfies
is certified empty, and graphs that are not chains are left alone."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.bound_types import Interval
from verifier.bounds.crown import intermediate_bounds
from verifier.complete import lp_refine
from verifier.complete.lp_refine import chain_layers, chain_lp_margins, refine_chain_bounds
from verifier.perturbation import Box

from complete.test_relu_bab import _milp_min, _net, _pre_activations

N_IN = 5
pytestmark = pytest.mark.skipif(not lp_refine.available(), reason="SciPy without HiGHS bindings")


def _crown_root(bm, lo, hi):
    with torch.no_grad():
        return intermediate_bounds(bm.graph, {bm.input: Box(lo.unsqueeze(0), hi.unsqueeze(0))},
                                   "crown", upto=bm.graph.output)


def _pres(bm):
    return [bm.graph[r].inputs[0] for r in bm.graph.ancestors_order(bm.graph.output)
            if bm.graph[r].op == "relu"]


def _extremes(net, lo, hi, layer, seed, steps=40):
    """Points of the box that push each neuron of ReLU input ``layer`` down and up (signed
    gradient steps from random starts): ``[2 * width, n_in]``."""
    g = torch.Generator().manual_seed(seed)
    width = _pre_activations(net, lo.unsqueeze(0))[0][layer].shape[1]
    x = (lo + torch.rand(2 * width, lo.numel(), generator=g) * (hi - lo)).requires_grad_(True)
    sign = torch.cat([torch.ones(width), -torch.ones(width)])
    pick = torch.arange(2 * width) % width
    for _ in range(steps):
        z = _pre_activations(net, x)[0][layer]
        obj = (sign * z[torch.arange(2 * width), pick]).sum()
        grad, = torch.autograd.grad(obj, x)
        with torch.no_grad():
            x -= 0.05 * (hi - lo) * grad.sign()
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return x.detach()


@pytest.mark.parametrize("seed", range(3))
def test_refined_bounds_hold_sampled_and_attacked_pre_activations(seed):
    net = _net(seed, (12, 12, 12), N_IN)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = -0.6 * torch.ones(N_IN), 0.6 * torch.ones(N_IN)
    root = _crown_root(bm, lo, hi)
    new, stats = refine_chain_bounds(bm.graph, lo, hi, root, deadline=float("inf"))
    assert stats.lps > 0 and stats.layers_done == 3
    g = torch.Generator().manual_seed(seed)
    pts = [lo + torch.rand(4000, N_IN, generator=g) * (hi - lo)]
    pts += [_extremes(net, lo, hi, k, seed) for k in range(3)]
    x = torch.cat(pts)
    with torch.no_grad():
        pre, _ = _pre_activations(net, x)
    tighter = 0.0
    for k, (p, z) in enumerate(zip(_pres(bm), pre)):
        iv = new[p]
        assert bool((z >= iv.lower - 1e-5).all()), (k, float((iv.lower - z).max()))
        assert bool((z <= iv.upper + 1e-5).all()), (k, float((z - iv.upper).max()))
        # never looser than the bounds it started from
        assert bool((iv.lower >= root[p].lower).all() and (iv.upper <= root[p].upper).all())
        tighter += float(((iv.upper - iv.lower) - (root[p].upper - root[p].lower)).abs().sum())
    assert tighter > 0          # CROWN's bounds of the deeper layers are not the LP optimum


def _milp_min_under(net, lo, hi, W_out, b_out):
    """The exact minimum of ``W_out y + b_out`` over the box (a MILP): the network with its
    last layer replaced."""
    last = net[-1]
    head = nn.Linear(last.in_features, 1).double()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W_out).double() @ last.weight.double())
        head.bias.copy_(torch.as_tensor(W_out).double() @ last.bias.double() + b_out)
    return _milp_min(nn.Sequential(*list(net)[:-1], head), lo, hi)[0]


@pytest.mark.parametrize("seed", range(3))
def test_lp_margins_lie_below_the_exact_minimum(seed):
    net = _net(seed, (10, 10), N_IN)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = -0.5 * torch.ones(N_IN), 0.5 * torch.ones(N_IN)
    root = _crown_root(bm, lo, hi)
    C = np.array([[1.0], [-1.0]])
    d = np.array([0.1, -0.2])
    got = chain_lp_margins(bm.graph, lo, hi, root, C, d, deadline=float("inf"))
    for r in range(2):
        exact = _milp_min_under(net, lo, hi, C[r:r + 1], -d[r])
        assert got[r] <= exact + 1e-6, (r, got[r], exact)
        assert got[r] > -np.inf


def test_a_domain_whose_splits_contradict_is_certified_empty():
    # z1 = x and z2 = -x - 0.5 over x in [-1, 1]: z1 >= 0 and z2 >= 0 is impossible
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -0.5]))
    out = nn.Linear(2, 1)
    net = nn.Sequential(lin, nn.ReLU(), out)
    bm = BoundedModel(net, input_shape=(1,))
    lo, hi = -torch.ones(1), torch.ones(1)
    root = _crown_root(bm, lo, hi)
    p = _pres(bm)[0]
    both = {**root, p: Interval(root[p].lower.clamp(min=0), root[p].upper)}
    got = chain_lp_margins(bm.graph, lo, hi, both, np.ones((1, 1)), np.zeros(1), float("inf"))
    assert np.all(got == np.inf)
    one = {**root, p: Interval(torch.tensor([[0.0, -1.5]]), root[p].upper)}
    got = chain_lp_margins(bm.graph, lo, hi, one, np.ones((1, 1)), np.zeros(1), float("inf"))
    assert np.all(np.isfinite(got))


def test_graphs_that_are_not_relu_chains_are_left_alone():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(N_IN, 6), nn.Linear(6, N_IN)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + x

    lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
    tanh = nn.Sequential(nn.Linear(N_IN, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    for m in (Skip(), tanh):
        bm = BoundedModel(m, input_shape=(N_IN,))
        assert chain_layers(bm.graph, lo, hi) is None
        root = _crown_root(bm, lo, hi)
        new, stats = refine_chain_bounds(bm.graph, lo, hi, root, float("inf"))
        assert stats.lps == 0 and all(new[k] is root[k] for k in root)


def test_chain_maps_are_the_network():
    net = _net(1, (7, 9), N_IN)
    bm = BoundedModel(net, input_shape=(N_IN,))
    lo, hi = -torch.ones(N_IN), torch.ones(N_IN)
    lo[2] = hi[2] = 0.3                         # a fixed input folds into the first bias
    layers, (Wo, bo), vary, half = chain_layers(bm.graph, lo, hi)
    assert list(vary) == [0, 1, 3, 4]
    x = lo + torch.rand(50, N_IN) * (hi - lo)
    with torch.no_grad():
        pre, y = _pre_activations(net, x)
    h = (x.double() - (lo + hi).double() / 2)[:, vary].numpy()
    for layer, z in zip(layers, pre):
        np.testing.assert_allclose(h @ layer.W.T + layer.b, z.double().numpy(), atol=1e-5)
        h = np.maximum(z.double().numpy(), 0)
    np.testing.assert_allclose(h @ Wo.T + bo, y.double().numpy(), atol=1e-5)
