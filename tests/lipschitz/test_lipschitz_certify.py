"""The certified constant is an upper bound: it is >= every ratio |f(x) - f(x')| / |x - x'|
found by sampling and by gradient ascent on the ratio; layer norms are compared with exact
dense operators built another way (the Jacobian of the layer)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from verifier.lipschitz import LipschitzError, lipschitz_constant
from verifier.ops.norms import conv_fft_norm, conv_norm, dense_norm


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + torch.tanh(self.bn(self.conv(h)))
        return self.head(h.flatten(1))


class Square(nn.Module):
    def forward(self, x):
        return x * (x + 1) + x      # a product of two perturbed tensors (x * x would be pow 2)


def models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1, dilation=1), nn.Sigmoid(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 4)).eval()
    with torch.no_grad():
        cnn[1].running_var.uniform_(0.3, 2.0)
        cnn[1].running_mean.uniform_(-1, 1)
        cnn[1].weight.uniform_(-2, 2)
    res = Residual().eval()
    with torch.no_grad():
        res.bn.running_var.uniform_(0.3, 2.0)
    return {
        "mlp_relu": (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                   nn.Linear(16, 3)).eval(), (6,)),
        "mlp_tanh_leaky": (nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16),
                                         nn.LeakyReLU(0.2), nn.Linear(16, 3)).eval(), (6,)),
        "cnn_bn_pool": (cnn, (1, 8, 8)),
        "residual": (res, (1, 8, 8)),
    }


MODELS = models()


def empirical_ratio(net, shape, seed=0, n=256, steps=60):
    """The largest |f(x) - f(x')| / |x - x'| found by random pairs, then by gradient ascent."""
    g = torch.Generator().manual_seed(seed)
    net = net.double()
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    d = torch.randn(n, *shape, generator=g, dtype=torch.float64) * 10 ** (
        -3 * torch.rand(n, *([1] * len(shape)), generator=g, dtype=torch.float64))

    def ratio(x, d):
        num = (net(x + d) - net(x)).flatten(1).norm(dim=1)
        return num / d.flatten(1).norm(dim=1)

    with torch.no_grad():
        best = ratio(x, d).max().item()
    x, d = x.clone().requires_grad_(True), d.clone().requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=0.05)
    for _ in range(steps):
        r = ratio(x, d)
        best = max(best, r.max().item())
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    with torch.no_grad():
        best = max(best, ratio(x, d).max().item())
    net.float()
    return best


@pytest.mark.parametrize("name", list(MODELS))
def test_certified_constant_is_above_sampled_and_ascended_ratios(name):
    net, shape = MODELS[name]
    L = lipschitz_constant(net, shape).lipschitz
    found = empirical_ratio(net, shape)
    assert found <= L
    assert found > 0.05 * L        # the search is not vacuous (the bound is not astronomically off)


def test_chain_constant_is_the_product_of_exact_layer_norms():
    net, shape = MODELS["mlp_relu"]
    norms = [torch.linalg.matrix_norm(m.weight.double(), 2).item()
             for m in net if isinstance(m, nn.Linear)]
    rep = lipschitz_constant(net, shape)
    assert rep.lipschitz == pytest.approx(math.prod(norms), rel=1e-5)
    assert rep.lipschitz >= math.prod(norms)
    assert [l.op for l in rep.layers] == ["linear", "relu", "linear", "relu", "linear"]


def test_residual_constant_sums_the_branches():
    net, shape = MODELS["residual"]
    rep = lipschitz_constant(net, shape)
    by = {l.op: l for l in rep.layers}
    assert by["add"].how == "sum of branches"
    stem = rep.layers[0].cumulative
    add = [l for l in rep.layers if l.op == "add"][0]
    conv2 = [l for l in rep.layers if l.op == "conv"][1].constant
    bn = [l for l in rep.layers if l.op == "affine"][0].constant
    assert add.cumulative == pytest.approx(stem + stem * conv2 * bn, rel=1e-9)


def dense_conv_matrix(conv, in_shape):
    f = lambda x: conv(x.reshape(1, *in_shape)).flatten()
    return torch.autograd.functional.jacobian(f, torch.zeros(math.prod(in_shape), dtype=torch.float64))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 1, 1),
                                                            (1, 2, 2, 1), (2, 1, 1, 2), (1, 1, 1, 4)])
def test_conv_bounds_are_above_the_exact_operator_norm(stride, padding, dilation, groups):
    torch.manual_seed(stride * 7 + padding + 3 * dilation + groups)
    conv = nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=False).double()
    in_shape = (4, 9, 9)
    exact = torch.linalg.svdvals(dense_conv_matrix(conv, in_shape))[0].item()
    out_shape = tuple(conv(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    fft = conv_fft_norm(conv.weight, in_shape[1:], (padding,) * 2, (dilation,) * 2, groups)
    bound, how = conv_norm(conv.weight, in_shape, out_shape, (stride,) * 2, (padding,) * 2,
                           (dilation,) * 2, groups)
    assert exact <= fft
    assert exact <= bound <= fft
    assert bound == pytest.approx(exact, rel=1e-5) and how.startswith("exact")


def test_fft_bound_is_exact_for_circular_padding():
    torch.manual_seed(1)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    n = 3 * 10 * 10
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 3, 10, 10)
    cols = F.conv2d(F.pad(basis, (1, 1, 1, 1), mode="circular"), w).reshape(n, -1)
    exact = torch.linalg.svdvals(cols)[0].item()
    assert conv_fft_norm(w, (10, 10), (0, 0), (1, 1)) == pytest.approx(exact, rel=1e-6)


def test_dense_norm_is_above_svd():
    W = torch.randn(30, 20)
    assert dense_norm(W) >= torch.linalg.matrix_norm(W.double(), 2).item()


def test_unsupported_nodes_are_all_named_in_one_error():
    with pytest.raises(LipschitzError, match="product of two perturbed tensors") as e:
        lipschitz_constant(Square(), (3,))
    assert len(e.value.problems) >= 1


def test_onnx_model_gives_the_same_constant(tmp_path):
    from verifier.api import BoundedModel
    from verifier.train.evaluation import export_onnx
    net, shape = MODELS["cnn_bn_pool"]
    net = nn.Sequential(*[m for m in net if not isinstance(m, nn.BatchNorm2d)]).eval()
    export_onnx(net, shape, tmp_path / "m.onnx")
    a = lipschitz_constant(net, shape).lipschitz
    b = lipschitz_constant(BoundedModel.from_onnx(tmp_path / "m.onnx", dtype=torch.float64)).lipschitz
    assert b == pytest.approx(a, rel=1e-6)


def test_onnx_with_batchnorm_folded_into_the_conv_is_still_an_upper_bound(tmp_path):
    """torch's ONNX export folds eval-mode BatchNorm into the convolution: a different (often
    tighter) product, still above the empirical ratios."""
    from verifier.api import BoundedModel
    from verifier.train.evaluation import export_onnx
    net, shape = MODELS["cnn_bn_pool"]
    export_onnx(net, shape, tmp_path / "m.onnx")
    b = lipschitz_constant(BoundedModel.from_onnx(tmp_path / "m.onnx", dtype=torch.float64)).lipschitz
    assert empirical_ratio(net, shape) <= b
