"""The Lipschitz constant of a ViT on an input domain (attention included) against autograd
Jacobians at sampled points and against an attack on ||f(x) - f(x')|| / ||x - x'||."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models import trained
from models.architectures import vit_lipschitz
from verifier.analysis.lipschitz import LipschitzError, lipschitz_constant
from verifier.lipschitz.train import constrained_weights, project_
from verifier.ops.domain import Reciprocal
from verifier.train.data import load_npz

SHAPE = (1, 8, 8)


def small_vit(seed: int, w_max: float) -> nn.Module:
    """4 tokens of width 8, 2 heads, 2 blocks; every matrix at spectral norm w_max (> 1 makes the
    attention logits large, so the softmax is far from uniform)."""
    torch.manual_seed(seed)
    net = vit_lipschitz(in_ch=1, n_classes=3, input_size=8, patch=4, dim=8, depth=2, heads=2,
                        mlp=16, alpha=0.5)
    with torch.no_grad():
        for _, p, _ in constrained_weights(net):
            p.normal_()
        net.pos.normal_()
    project_(net, "svd_clip", w_max)
    with torch.no_grad():   # svd_clip caps; scale each matrix up to exactly w_max
        for _, p, s in constrained_weights(net):
            W = p.reshape(p.shape[0], -1)
            p.mul_(w_max * s / torch.linalg.matrix_norm(W.double(), ord=2).item())
    return net.eval()


def jacobian_norms(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """||J(x)||_2 per sample (x: [n, *SHAPE])."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda t: net(t.unsqueeze(0))[0], xi)
        out.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2))
    return torch.stack(out)


def attack_ratio(net: nn.Module, n: int = 64, steps: int = 150, seed: int = 0,
                 shape=SHAPE) -> float:
    """The largest ||f(x) - f(x')|| / ||x - x'|| found by Adam over pairs in [0, 1]^d (near and
    far pairs), plus the largest Jacobian norm at the pairs' end points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64).requires_grad_(True)
    scale = torch.logspace(-3, 0, n, dtype=torch.float64).view(n, 1, 1, 1)
    d = (torch.randn(n, *shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=0.02)
    best = 0.0
    for _ in range(steps):
        a = x.clamp(0, 1)
        b = (x + d).clamp(0, 1)
        num = (net(a) - net(b)).norm(dim=1)
        den = (a - b).flatten(1).norm(dim=1).clamp(min=1e-9)
        r = num / den
        best = max(best, float(r.detach().max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    top = x.detach().clamp(0, 1)[r.detach().topk(4).indices]
    return max(best, float(jacobian_norms(net, top).max()))


@pytest.mark.parametrize("seed,w_max", [(0, 1.0), (1, 2.0), (2, 3.0)])
def test_domain_constant_bounds_sampled_jacobians_and_attacks(seed, w_max):
    net = small_vit(seed, w_max)
    L = lipschitz_constant(net, SHAPE, domain=(0.0, 1.0)).lipschitz
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(24, *SHAPE, generator=g, dtype=torch.float64)
    x[:4] = (x[:4] > 0.5).double()         # corners of the domain too
    net64 = copy.deepcopy(net).double()
    jac = float(jacobian_norms(net64, x).max())
    att = attack_ratio(net64, seed=seed)
    assert jac <= L and att <= L, (jac, att, L)
    assert att > 0.0


def test_a_planted_bug_dropping_the_softmax_factor_is_caught(monkeypatch):
    """The same check fails when the softmax's factor is dropped (the attention weights then
    count as constant): the test above can fail."""
    net = small_vit(1, 2.0)
    orig = Reciprocal.lipschitz_on

    def buggy(self, node, ctx):
        L, c, how = orig(self, node, ctx)
        return (0.0, 0.0, how) if self.softmax_logits(node, ctx.graph) else (L, c, how)

    monkeypatch.setattr(Reciprocal, "lipschitz_on", buggy)
    L_bug = lipschitz_constant(net, SHAPE, domain=(0.0, 1.0)).lipschitz
    assert attack_ratio(copy.deepcopy(net).double(), seed=1) > L_bug


def test_attention_without_a_domain_is_refused():
    with pytest.raises(LipschitzError, match="product of two perturbed tensors"):
        lipschitz_constant(small_vit(0, 1.0), SHAPE)


def test_broadcast_branches_scale_the_sum():
    """``x + sum(x)`` (the sum broadcast over n elements) has constant 1 + n along ones."""

    class F(nn.Module):
        def forward(self, x):
            return x + x.sum(-1, keepdim=True)

    L = lipschitz_constant(F(), (5,)).lipschitz
    assert L >= 6.0 - 1e-9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_zoo_lip_vit_constant_bounds_jacobians_at_test_images_and_attacks():
    """The shipped ``lip_vit_mnist``: its recomputed constant on [0, 1]^784 matches the zoo
    entry and lies above Jacobian norms at test images, at random points and attacked pairs."""
    net, entry = trained("lip_vit_mnist")
    L = lipschitz_constant(net, (1, 28, 28), domain=tuple(entry["lipschitz_domain"])).lipschitz
    assert L == pytest.approx(entry["measured"]["lipschitz"], rel=1e-6)
    net64 = copy.deepcopy(net).double()
    data = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist_test1k.npz"
    x = load_npz(data).x[:6].double() if data.is_file() else torch.rand(6, 1, 28, 28,
                                                                         dtype=torch.float64)
    x = torch.cat([x, torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)])
    assert float(jacobian_norms(net64, x).max()) <= L
    assert attack_ratio(net64, n=16, steps=40, shape=(1, 28, 28)) <= L
