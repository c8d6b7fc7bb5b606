"""Source ops mapped to chains of rules (``verifier.graph.composite``): LayerNorm, RMSNorm,
GroupNorm, softmax and log_softmax. Each: the graph computes the source op (point values equal
torch's), and every method's bounds contain sampled and PGD points (``check_sound``), from torch
modules, functions and ONNX exports."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_sound, linf
from verifier import BoundedModel
from verifier.bounds.forward import evaluate


def _value(bm: BoundedModel, x: torch.Tensor) -> torch.Tensor:
    out, _ = evaluate(bm.graph, {bm.input: x.to(bm.dtype)})
    return out


class _Fn(nn.Module):
    def __init__(self, fn, d_in, d_mid, d_out=3, shape=None):
        super().__init__()
        self.fn, self.shape = fn, shape
        self.a = nn.Linear(d_in, d_mid)
        self.b = nn.Linear(d_mid if shape is None else shape[-1], d_out)

    def forward(self, x):
        h = self.a(x)
        if self.shape is not None:
            h = h.reshape(-1, *self.shape)
        h = self.fn(h)
        return self.b(h).flatten(1)


def _ln():
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(8) + 0.5)
        ln.bias.copy_(torch.randn(8) * 0.1)
    return ln


MODELS = {  # name -> a fresh model
    "layer_norm_module": lambda: _Fn(nn.Sequential(_ln(), nn.ReLU()), 6, 8),
    "layer_norm_two_dims": lambda: _Fn(lambda h: F.layer_norm(h, (2, 4), eps=1e-3), 6, 8,
                                       shape=(2, 4)),
    "layer_norm_no_affine": lambda: _Fn(nn.LayerNorm(8, elementwise_affine=False), 6, 8),
    "rms_norm": lambda: _Fn(nn.RMSNorm(8, eps=1e-5), 6, 8),
    "group_norm": lambda: _Fn(nn.GroupNorm(2, 4), 6, 8, shape=(4, 2)),
    "softmax_last": lambda: _Fn(nn.Softmax(dim=-1), 6, 8),
    "softmax_dim1": lambda: _Fn(lambda h: torch.softmax(h, dim=1), 6, 8, shape=(2, 4)),
    "log_softmax": lambda: _Fn(lambda h: F.log_softmax(h, dim=-1), 6, 8),
    "softmax_method": lambda: _Fn(lambda h: h.softmax(-1), 6, 8, shape=(2, 4)),
}


def _make(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_computes_the_source_op(name):
    net = _make(name)
    bm = BoundedModel(net, input_shape=(6,), dtype=torch.float64)
    x = torch.randn(16, 6, dtype=torch.float64) * 3
    want = copy.deepcopy(net).double()(x)
    assert torch.allclose(_value(bm, x), want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("eps", [0.02, 0.5])
def test_bounds_contain_sampled_and_pgd_points(name, eps):
    bm = BoundedModel(_make(name), input_shape=(6,))
    x = torch.randn(2, 6)
    check_sound(bm, linf(x, eps), methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


def test_variance_lower_bound_stays_away_from_zero_for_small_boxes():
    """CROWN bounds the variance below through the centring (a convex function of the input),
    so for a small box its lower bound is near the true variance, where intervals alone give 0
    for every element that can change sign."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
    bm = BoundedModel(net, input_shape=(6,), dtype=torch.float64)
    x = torch.randn(1, 6, dtype=torch.float64)
    h = copy.deepcopy(net[0]).double()(x)
    true_var = h.var(-1, unbiased=False)
    res = bm.bounds(linf(x, 0.01), method="crown")
    var = res.nodes["_1/var"]
    assert float(var.lower) > 0.9 * float(true_var)
    assert float(var.lower) <= float(true_var) + 1e-12
    ibp = bm.bounds(linf(x, 0.01), method="ibp").nodes["_1/var"]
    assert float(var.lower) >= float(ibp.lower)


def test_softmax_bounds_are_probabilities_and_tight_for_small_boxes():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 5), nn.Softmax(-1))
    bm = BoundedModel(net, input_shape=(6,), dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    res = bm.bounds(linf(x, 1e-3), method="crown")
    p = copy.deepcopy(net).double()(x)
    assert bool((res.lower >= 0).all()) and bool((res.upper <= 1 + 1e-9).all())
    assert bool((res.lower <= p).all()) and bool((res.upper >= p).all())
    assert float((res.upper - res.lower).max()) < 0.05


def _onnx(net, shape, opset=17):
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, *shape), buf, input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    return buf.getvalue()


@pytest.mark.parametrize("name,opset", [("layer_norm_module", 17), ("layer_norm_module", 13),
                                        ("softmax_last", 17), ("softmax_last", 11),
                                        ("log_softmax", 17)])
def test_onnx_exports_load_and_match_onnxruntime(tmp_path, name, opset):
    ort = pytest.importorskip("onnxruntime")
    net = _make(name)
    path = tmp_path / "m.onnx"
    path.write_bytes(_onnx(net, (6,), opset))
    bm = BoundedModel.from_onnx(path)
    x = torch.randn(8, 6)
    sess = ort.InferenceSession(str(path))
    want = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(_value(bm, x).detach().numpy(), want, rtol=1e-4, atol=1e-5)
    check_sound(bm, linf(x[:2], 0.05), methods=("ibp", "crown"))


@pytest.mark.parametrize("fn", [lambda h, g: h + g, lambda h, g: h - g, lambda h, g: h * g,
                                lambda h, g: h / (g * g + 1)])
def test_two_perturbed_operands_of_different_ranks_are_reported(fn):
    """[B, 2, 4] with [B, 4]: the batch dim of one would line up with a sample dim of the other."""
    from verifier import UnsupportedOpsError

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)

        def forward(self, x):
            h = self.a(x)
            return fn(h.reshape(-1, 2, 4), h[:, :4]).flatten(1)

    with pytest.raises(UnsupportedOpsError, match="different ranks"):
        BoundedModel(M(), input_shape=(6,))
