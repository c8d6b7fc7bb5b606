"""Every zoo architecture builds, runs, traces, and gets sound IBP / CROWN / CROWN-IBP bounds.

Soundness is checked the differential way: sample points of the L-inf ball, run the plain
PyTorch model on them (and record every intermediate value with torch.fx), and check that each
value lies inside the bounds the verifier computed for it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import ZOO, build, cnn_cert, mlp, resnet_block_net, small_cnn  # noqa: E402
from verifier import BoundedModel, LpBall, margin_spec  # noqa: E402

N_SAMPLES = 300
TOL = 1e-4  # float32 rounding of the bounds and of the model's own forward pass


class _Recorder(fx.Interpreter):
    """Runs a traced model and keeps every node's value, by fx node name."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n.name] = v
        return v


def _randomize_batchnorm(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so BatchNorm is really exercised."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def _inside(name: str, values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> None:
    """values: [n, B, *shape] inside [lower, upper]: [B, *shape] up to TOL."""
    scale = 1.0 + values.abs()
    below = (lower.unsqueeze(0) - values) / scale
    above = (values - upper.unsqueeze(0)) / scale
    worst = max(below.max().item(), above.max().item())
    assert worst <= TOL, f"{name}: a sampled value lies {worst:.3g} (relative) outside its bounds"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_architecture_builds_and_runs_forward(name):
    net, shape = build(name)
    assert not net.training, "zoo models are returned in eval mode"
    y = net(torch.rand(3, *shape))
    n_classes = ZOO[name][1].get("out", ZOO[name][1].get("n_classes"))
    assert y.shape == (3, n_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_bounds_contain_sampled_outputs_and_intermediates(name, method):
    gen = torch.Generator().manual_seed(1)
    net, shape = build(name, seed=0)
    _randomize_batchnorm(net, gen)
    model = BoundedModel(net, input_shape=shape)
    x = torch.rand(2, *shape, generator=gen)
    ball = LpBall(x, eps=0.02, clip=(0.0, 1.0))
    res = model.bounds(ball, method=method)
    assert res.lower.shape == res.upper.shape == (2, *model.output_shape)
    assert (res.lower <= res.upper).all()

    pts = ball.sample(N_SAMPLES, generator=gen)                  # [n, B, *shape]
    assert (pts >= 0).all() and (pts <= 1).all() and ((pts - x).abs() <= 0.02 + 1e-7).all()
    flat = pts.reshape(-1, *shape)
    rec = _Recorder(fx.symbolic_trace(net))
    with torch.no_grad():
        out = rec.run(flat)
    _inside("output", out.reshape(N_SAMPLES, 2, -1), res.lower.reshape(2, -1),
            res.upper.reshape(2, -1))

    checked = 0
    for node, iv in res.nodes.items():
        v = rec.values.get(node)
        if isinstance(v, torch.Tensor) and v.shape[1:] == iv.lower.shape[1:]:
            _inside(node, v.reshape(N_SAMPLES, 2, *v.shape[1:]), iv.lower, iv.upper)
            checked += 1
    assert checked >= 3, f"only {checked} intermediate nodes could be matched by name"


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet_block_net"])
def test_margin_bounds_contain_sampled_margins(name, method):
    gen = torch.Generator().manual_seed(2)
    net, shape = build(name, seed=3)
    _randomize_batchnorm(net, gen)
    model = BoundedModel(net, input_shape=shape)
    x = torch.rand(3, *shape, generator=gen)
    labels = net(x).argmax(1)
    C = margin_spec(labels, 10)                                  # [3, 9, 10]
    ball = LpBall(x, eps=0.01, clip=(0.0, 1.0))
    res = model.bounds(ball, method=method, spec=C)
    assert res.lower.shape == (3, 9) and res.verified.shape == (3,)
    pts = ball.sample(N_SAMPLES, generator=gen)
    with torch.no_grad():
        y = net(pts.reshape(-1, *shape)).reshape(N_SAMPLES, 3, 10)
    margins = torch.einsum("bsk,nbk->nbs", C, y)
    _inside("margins", margins, res.lower, res.upper)


def test_eps_zero_bounds_equal_the_forward_pass():
    net, shape = build("resnet_block_net", seed=0)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    res = BoundedModel(net, input_shape=shape).bounds(LpBall(x, 0.0), method="crown")
    y = net(x)
    assert torch.allclose(res.lower, y, atol=1e-4) and torch.allclose(res.upper, y, atol=1e-4)


def test_builders_validate_their_arguments():
    with pytest.raises(ValueError, match="activation"):
        mlp(4, 8, 2, activation="gelu")
    with pytest.raises(ValueError, match="pool"):
        small_cnn(pool="min")
    with pytest.raises(KeyError, match="unknown model"):
        build("vgg16")
    with pytest.raises(ValueError, match="extra_convs=-1"):
        cnn_cert(extra_convs=-1)


def test_builders_accept_other_sizes():
    assert mlp(6, [5, 4, 3], 2)(torch.rand(1, 2, 3)).shape == (1, 2)
    assert small_cnn(3, 5, input_size=17, pool="avg")(torch.rand(1, 3, 17, 17)).shape == (1, 5)
    assert resnet_block_net(1, 4, width=4, n_blocks=1)(torch.rand(1, 1, 9, 12)).shape == (1, 4)


def test_cnn_cert_extra_convolutions_keep_channels_and_side():
    """extra_convs=K: K 3x3 stride-1 convolutions (with their BatchNorm) after each strided one."""
    net = cnn_cert(1, 10, 28, width=4, fc=16, bn=True, extra_convs=2)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 4, (4, 4), (2, 2)), (4, 4, (3, 3), (1, 1)), (4, 4, (3, 3), (1, 1)),
        (4, 8, (4, 4), (2, 2)), (8, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net) == 6
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert len(cnn_cert(width=4, extra_convs=0)) == len(cnn_cert(width=4))
