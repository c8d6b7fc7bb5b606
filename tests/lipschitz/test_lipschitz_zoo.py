"""The Lipschitz-constrained models shipped in models/zoo.json: the certified constant and the
L2 certified accuracy they record reproduce from the ONNX file, every layer meets the entry's
w_max, and every margin-certified image is classified correctly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TEST1K = Path("/work/shared/datasets/mnist_test1k.npz")
ENTRIES = [e for e in json.loads((ROOT / "models" / "zoo.json").read_text())["models"]
           if e.get("method") == "lipschitz"]


def test_zoo_ships_lipschitz_models():
    assert len(ENTRIES) >= 1
    for e in ENTRIES:
        assert (ROOT / e["onnx"]).stat().st_size < 1.5e6


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_lipschitz_zoo_claims_reproduce(entry):
    from verifier import BoundedModel
    from verifier.lipschitz import lipschitz_constant, margins
    from verifier.train.data import load_npz
    bm = BoundedModel.from_onnx(ROOT / entry["onnx"], dtype=torch.float64)
    domain = entry.get("lipschitz_domain")    # attention: the constant on that input box
    rep = lipschitz_constant(bm, domain=None if domain is None else tuple(domain))
    m = entry["measured"]
    assert rep.lipschitz == pytest.approx(m["lipschitz"], rel=1e-6)
    w = entry["lipschitz_training"]["w_max"]
    if entry["lipschitz_training"]["constraint"] != "weight_decay":
        assert all(l.constant <= w * (1 + 1e-5) for l in rep.layers if l.op == "linear")
    if not TEST1K.exists():
        pytest.skip("the shared MNIST test images are not here")
    ds = load_npz(TEST1K)
    with torch.no_grad():
        mg = margins(bm.module.double()(ds.x.double()), ds.y)
    for r, acc in m["l2_certified_acc"].items():
        cert = mg > math.sqrt(2) * rep.lipschitz * float(r)
        assert float(cert.double().mean()) == pytest.approx(acc, abs=1e-3)
