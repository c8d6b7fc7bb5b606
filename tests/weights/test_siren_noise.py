"""SIRENs under initialization-scale weight noise (per layer, element-wise radii) and coordinate
boxes: every method's bounds contain the outputs of sampled and attacked models and coordinates.

Truth: the source module run by ``torch.func.functional_call`` in float64 with its parameters
replaced by points of the set (uniform samples, vertices), and a joint signed-gradient attack on
weights and coordinates pushing each output up and down.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from verifier import BoundedModel, Box
from verifier.weights import WeightPerturbation

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models import siren  # noqa: E402

METHODS = ("ibp", "crown", "alpha-crown")


def _net():
    torch.manual_seed(4)
    net = siren(in_dim=2, hidden=12, depth=2, out=2, omega0=12.0)
    with torch.no_grad():                  # a non-initial point: biases and weights moved
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.abs().mean())
    return net


def _outputs(net, params, coords):
    """[n] parameter sets and [n, B, 2] coordinates -> [n, B, out] in float64."""
    f = lambda p, x: functional_call(net, p, (x,))                    # noqa: E731
    return torch.vmap(f)(params, coords)


def _truth(net, radii, coords, delta, n=400, steps=40):
    """(min, max) [B, out] over samples (random and vertex) and a joint attack, float64."""
    net = net.double()
    w0 = {k: v.detach() for k, v in net.named_parameters()}
    c0 = coords.double()
    gen = torch.Generator().manual_seed(0)
    ps, cs = [], []
    for vertex in (False, True):
        u = {k: torch.rand((n, *v.shape), generator=gen, dtype=torch.float64) for k, v in w0.items()}
        uc = torch.rand((n, *c0.shape), generator=gen, dtype=torch.float64)
        if vertex:
            u = {k: v.round() for k, v in u.items()}
            uc = uc.round()
        ps.append({k: v + radii.get(k, 0.0) * (2 * u[k] - 1) for k, v in w0.items()})
        cs.append(c0 + delta * (2 * uc - 1))
    ys = [_outputs(net, p, c) for p, c in zip(ps, cs)]
    lo = torch.stack([y.min(0).values for y in ys]).min(0).values
    hi = torch.stack([y.max(0).values for y in ys]).max(0).values
    B, out = lo.shape
    for sign in (1.0, -1.0):
        for j in range(out):
            p = {k: (v + radii.get(k, 0.0) * (2 * torch.rand((B, *v.shape), generator=gen,
                                                              dtype=torch.float64) - 1))
                 .requires_grad_() for k, v in w0.items()}
            c = c0.clone().unsqueeze(1).requires_grad_()
            for it in range(steps):
                y = _outputs(net, p, c)[:, 0, j]
                grads = torch.autograd.grad((sign * y).sum(), [*p.values(), c])
                size = 0.25 * (1 - it / steps) + 0.02
                with torch.no_grad():
                    for (k, v), g in zip(p.items(), grads):
                        r = radii.get(k, 0.0)
                        v.add_(size * r * g.sign()).clamp_(w0[k] - r, w0[k] + r)
                    c.add_(size * delta * grads[-1].sign())
                    c.copy_(torch.maximum(torch.minimum(c, c0.unsqueeze(1) + delta), c0.unsqueeze(1) - delta))
            with torch.no_grad():
                y = _outputs(net, p, c)[:, 0]
            lo, hi = torch.minimum(lo, y), torch.maximum(hi, y)
    return lo, hi


COORDS = torch.tensor([[-0.7, 0.2], [0.0, 0.0], [0.5, -0.9]])


@functools.lru_cache(maxsize=None)
def _cached_truth(noise, delta):
    net = _net()
    return _truth(net, net.noise_radii(noise, k=3.0) if noise else {}, COORDS, delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("noise,delta", [(0.002, 0.0), (0.01, 0.0), (0.0, 0.02), (0.003, 0.01)])
def test_bounds_contain_noisy_sirens(method, dtype, noise, delta):
    net = _net()
    radii = net.noise_radii(noise, k=3.0) if noise else {}
    model = BoundedModel(net, input_shape=(2,), dtype=dtype)
    w = WeightPerturbation(None, radii) if radii else None
    x = Box(COORDS - delta, COORDS + delta) if delta else COORDS
    res = model.bounds(x, method, weights=w)
    lo, hi = _cached_truth(noise, delta)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert (res.lower.double() <= lo + tol).all(), (res.lower, lo)
    assert (hi <= res.upper.double() + tol).all(), (res.upper, hi)
    # the set is not degenerate: the truth moves, and the bounds are finite
    assert (hi - lo).min() > 1e-4 and torch.isfinite(res.lower).all() and torch.isfinite(res.upper).all()


def test_noise_radii_follow_the_siren_initialization():
    net = siren(in_dim=3, hidden=10, depth=2, out=1, omega0=20.0)
    r = net.noise_radii(0.1, k=2.0)
    assert set(r) == {"layers.0.weight", "layers.1.weight", "out.weight"}
    assert r["layers.0.weight"] == pytest.approx(2 * 0.1 / 3)
    assert r["layers.1.weight"] == pytest.approx(2 * 0.1 * (6 / 10) ** 0.5 / 20)
    # the initial weights lie inside their uniform bounds
    for name in r:
        assert net.get_parameter(name).abs().max() <= net.init_bound(name)
