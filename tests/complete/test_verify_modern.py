"""verify() on models with modern operators: a SIREN (sin activations, 2-D coordinates in) goes
through attack, bounds and input-split branch and bound; every verdict is checked independently
(unsat: the threshold lies above a dense grid's maximum; sat: the counterexample replays on
onnxruntime)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier.complete import verify

ort = pytest.importorskip("onnxruntime")


class _Sine(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


@pytest.fixture(scope="module")
def siren(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), _Sine(30.0), nn.Linear(32, 32), _Sine(1.0), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].weight.uniform_(-0.5, 0.5)
        net[2].weight.uniform_(-(6 / 32) ** 0.5, (6 / 32) ** 0.5)
    path = tmp_path_factory.mktemp("siren") / "siren.onnx"
    torch.onnx.export(net, torch.zeros(1, 2), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    lo, hi = np.array([0.1, 0.2]), np.array([0.15, 0.25])
    g = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], 301), np.linspace(lo[1], hi[1], 301)), -1)
    sess = ort.InferenceSession(str(path))
    ys = sess.run(None, {"x": g.reshape(-1, 2).astype(np.float32)})[0]
    return path, lo, hi, float(ys.max()), sess


def _prop(tmp_path, lo, hi, thr):
    p = tmp_path / "p.vnnlib"
    p.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                 + "".join(f"(assert (>= X_{i} {lo[i]}))\n(assert (<= X_{i} {hi[i]}))\n" for i in range(2))
                 + f"(assert (>= Y_0 {thr}))\n")
    return p


def test_siren_unsat_above_its_maximum(siren, tmp_path):
    path, lo, hi, mx, _ = siren
    v = verify(str(path), _prop(tmp_path, lo, hi, mx + 0.05), timeout=60)
    assert v.status == "unsat", v


def test_siren_sat_below_its_maximum_with_a_replayed_counterexample(siren, tmp_path):
    path, lo, hi, mx, sess = siren
    v = verify(str(path), _prop(tmp_path, lo, hi, mx - 0.05), timeout=60)
    assert v.status == "sat", v
    x = np.asarray(v.counterexample.x, dtype=np.float32).reshape(1, 2)
    assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
    assert float(sess.run(None, {"x": x})[0][0, 0]) >= mx - 0.05
