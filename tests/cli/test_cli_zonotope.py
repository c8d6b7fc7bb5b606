"""`verifier bounds --style / --generators / --at`: zonotope sets from the command line. The
bounds hold at style-shifted inputs computed here with numpy and run by onnxruntime; a set on
an intermediate node gives the API's bounds; bad combinations are usage errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_support import REPO, onnx_forward

MODEL = REPO / "models" / "nat_mnist.onnx"
X = REPO / "examples" / "data" / "mnist_sample.npy"
Y = REPO / "examples" / "data" / "mnist_label.npy"


def test_style_on_the_input_holds_at_shifted_images(cli):
    r = cli("bounds", MODEL, "--input", X, "--style", 0.05, 0.1, "--json")
    assert r.code == 0, r.err
    lo, up = np.array(r.json["lower"]), np.array(r.json["upper"])
    x = np.load(X).reshape(1, 1, 28, 28).astype(np.float64)
    mu = x.mean()
    rng = np.random.default_rng(0)
    for s, t in [*rng.uniform(-1, 1, (30, 2)), (1, 1), (-1, -1), (1, -1), (-1, 1)]:
        shifted = mu + (1 + 0.05 * s) * (x - mu) + 0.1 * t
        f = onnx_forward(MODEL, shifted.astype(np.float32))
        assert (f >= lo - 1e-3).all() and (f <= up + 1e-3).all()
    assert (up - lo).max() < 50


def test_generators_file_gives_the_api_bounds_and_holds_at_points(cli, tmp_path):
    from verifier import BoundedModel
    from verifier.perturbation import Zonotope
    rng = np.random.default_rng(1)
    G = (0.02 * rng.standard_normal((3, 1, 28, 28))).astype(np.float32)
    np.save(tmp_path / "G.npy", G)
    r = cli("bounds", MODEL, "--input", X, "--generators", tmp_path / "G.npy", "--label", Y,
            "--json")
    assert r.code == 0, r.err
    lo = np.array(r.json["lower"])
    x = np.load(X).reshape(1, 1, 28, 28).astype(np.float32)
    y = int(np.load(Y).reshape(-1)[0])
    for z in rng.uniform(-1, 1, (20, 3)):
        f = onnx_forward(MODEL, x + np.tensordot(z, G, 1)[None])[0]
        margins = np.delete(f[y] - f, y)
        assert (margins >= lo[0] - 1e-3).all()
    bm = BoundedModel.from_onnx(MODEL)
    from verifier import margin_spec
    api = bm.bounds(Zonotope(torch.from_numpy(x), torch.from_numpy(G)), "crown",
                    spec=margin_spec([y], 10))
    np.testing.assert_allclose(lo, api.lower.numpy(), rtol=1e-5, atol=1e-5)


def test_style_at_a_feature_map_gives_the_api_bounds(cli):
    from verifier import BoundedModel, margin_spec
    from verifier.perturbation import style_shift
    r = cli("bounds", MODEL, "--input", X, "--style", 0.05, 0.05, "--at", "_1_relu", "--label",
            Y, "--json")
    assert r.code == 0, r.err
    bm = BoundedModel.from_onnx(MODEL)
    x = torch.from_numpy(np.load(X).reshape(1, 1, 28, 28).astype(np.float32))
    y = int(np.load(Y).reshape(-1)[0])
    Z = style_shift(bm.node_values(x)["_1_relu"], 0.05, 0.05)
    api = bm.bounds({"_1_relu": Z}, "crown", spec=margin_spec([y], 10))
    np.testing.assert_allclose(np.array(r.json["lower"]), api.lower.numpy(), rtol=1e-5,
                               atol=1e-5)
    text = cli("bounds", MODEL, "--input", X, "--style", 0.05, 0.05, "--at", "_1_relu")
    assert "per-channel mean/std shift sigma=0.05 tau=0.05 of node _1_relu's value" in text.out


@pytest.mark.parametrize("extra, message", [
    (["--style", 0.1, 0.1, "--eps", 0.1], "exclude each other"),
    (["--style", 0.1, 0.1, "--generators", "G.npy"], "exclude each other"),
    (["--at", "_1_relu", "--eps", 0.1], "--at NODE needs"),
    (["--style", 0.1, 0.1, "--at", "nope"], "no such intermediate node"),
    (["--style", 0.0, 0.0], "single point"),
])
def test_bad_combinations_are_usage_errors(cli, extra, message):
    r = cli("bounds", MODEL, "--input", X, *extra)
    assert r.code != 0 and message in r.err, r.err
