"""The exact GELU written out (``x * 0.5 * (1 + erf(x / sqrt(2)))``, as torch.onnx.export writes
it before opset 20) becomes one ``gelu`` node (``verifier.graph.fuse``): the same function, bounded
soundly (sampling + PGD), and on the reference ``gelu_mlp`` (ONNX) at least as tight as
auto_LiRPA's CROWN, which bounds that model through its own GELU module."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import check_sound, linf
from verifier import BoundedModel, Box, margin_spec

MODERN = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "modern"


class HandGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))          # by hand
        h = self.fc2(h)
        h = 0.5 * h * (1 + torch.erf(h * (1 / math.sqrt(2.0))))       # another order
        return self.fc3(h)


def test_written_out_gelu_is_one_node_and_sound():
    torch.manual_seed(0)
    bm = BoundedModel(HandGelu(), input_shape=(5,), dtype=torch.float64)
    ops = [n.op for n in bm.graph]
    assert ops.count("gelu") == 2 and "erf" not in ops and "mul" not in ops, ops
    x = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(bm.graph_forward(x), bm.module.double()(x), atol=1e-12)
    bm.module.float()
    # (the fused ``<mul>/gelu`` node has no fx twin: the output and, below, the product node are
    # checked instead of every node)
    rep = check_sound(bm, linf(torch.randn(3, 5), 0.4), check_nodes=False,
                      methods=("ibp", "crown", "crown-ibp", "alpha-crown"))
    mul = [n.name for n in bm.graph if n.name.endswith("/gelu")][0].split("/")[0]
    ball = linf(torch.randn(3, 5), 0.4)
    pts = ball.sample(3000).double()
    vals = {}
    hook = bm.module.fc1.register_forward_hook(lambda m, i, o: vals.setdefault("h", o))
    with torch.no_grad():
        bm.module.double()(pts.reshape(-1, 5))
    hook.remove()
    h = vals["h"].reshape(3000, 3, 16)
    g = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))             # the product node (mul_1)
    for m in ("ibp", "crown"):
        iv = bm.bounds(ball, m)[mul]
        assert bool((g >= iv.lower - 1e-9).all() and (g <= iv.upper + 1e-9).all()), m
    assert rep.results["crown"] is not None


def test_a_different_constant_is_not_fused():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x)
            return h * (1 + torch.erf(h / 1.5))

    ops = [n.op for n in BoundedModel(Other(), input_shape=(3,)).graph]
    assert "gelu" not in ops and "erf" in ops and "mul" in ops


@pytest.mark.skipif(not (MODERN / "reference.json").exists(), reason="needs ../shared")
def test_gelu_mlp_from_onnx_is_at_least_as_tight_as_the_reference():
    ref = json.loads((MODERN / "reference.json").read_text())["models"]["gelu_mlp"]
    bm = BoundedModel.from_onnx(MODERN / "gelu_mlp.onnx")
    assert [n.op for n in bm.graph].count("gelu") == 2
    xl, xu = np.load(MODERN / "gelu_mlp_xl.npy"), np.load(MODERN / "gelu_mlp_xu.npy")
    y = np.load(MODERN / "gelu_mlp_y.npy")
    for i, s in enumerate(ref["samples"]):
        box = Box(torch.tensor(xl[i:i + 1]), torch.tensor(xu[i:i + 1]))
        res = bm.bounds(box, "crown", spec=margin_spec([int(y[i])], 10))
        low = res.lower[0].double().numpy()
        assert (low <= np.array(s["empirical"]["min"]) + 1e-5).all()          # sound
        assert (low >= np.array(s["CROWN"]["lower"]) - 1e-4).all()            # as tight


def test_written_out_silu_is_one_node_and_sound():
    class HandSilu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(12, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h * torch.sigmoid(h))

    torch.manual_seed(1)
    bm = BoundedModel(HandSilu(), input_shape=(4,), dtype=torch.float64)
    ops = [n.op for n in bm.graph]
    assert "silu" in ops and "sigmoid" not in ops and "mul" not in ops, ops
    check_sound(bm, linf(torch.randn(3, 4), 0.5), methods=("ibp", "crown", "crown-ibp", "alpha-crown"))


def test_silu_exported_to_onnx_is_fused(tmp_path):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2)).eval()
    path = tmp_path / "silu.onnx"
    torch.onnx.export(net, torch.zeros(1, 4), str(path), opset_version=13, dynamo=False)
    bm = BoundedModel.from_onnx(path)
    assert "silu" in [n.op for n in bm.graph]
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(bm.graph_forward(x).float(), net(x), atol=1e-5)
