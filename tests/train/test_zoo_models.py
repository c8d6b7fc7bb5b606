"""The certified models shipped in models/zoo.json: every entry has the documented fields, its
ONNX file computes what its state dict computes in the named architecture (onnxruntime as the
independent forward pass), and the claim it records for the cheapest method (IBP-certified
accuracy on the 1,000 MNIST test images) holds when recomputed, with every IBP-certified image
correctly classified."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo.json"
TEST1K = Path("/work/shared/datasets/mnist_test1k.npz")
FASHION = Path("/usr/share/datasets/fashion-mnist")     # Debian's dataset-fashion-mnist
ENTRIES = json.loads(ZOO.read_text())["models"] if ZOO.exists() else []
FIELDS = {"name", "onnx", "dataset", "mean", "std", "method", "eps", "command", "measured"}


def test_zoo_lists_mnist_models_at_eps_01_and_03():
    assert {e["eps"] for e in ENTRIES if e["dataset"].startswith("MNIST")} >= {0.1, 0.3}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_zoo_entry_onnx_matches_state_dict_and_claim(entry):
    import onnxruntime as ort
    sys.path.insert(0, str(ROOT))
    from models import architectures
    from verifier import BoundedModel, LpBall, margin_spec
    from verifier.train.data import load_npz
    assert FIELDS <= set(entry), FIELDS - set(entry)
    assert 0 <= entry["eps"] <= 1 and (entry["mean"] is None) == (entry["std"] is None)
    net = getattr(architectures, entry["arch"])(**entry["arch_kwargs"]).eval()
    net.load_state_dict(torch.load(ROOT / entry["state_dict"], weights_only=True))
    x = torch.rand(4, *entry["input_shape"], generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(ROOT / entry["onnx"]))
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-4)
    if entry["dataset"].startswith("Fashion-MNIST"):
        if not FASHION.exists():
            pytest.skip("Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
        from verifier.train.data import load_idx_folder
        ds = load_idx_folder(FASHION, "test").subset(1000)
    elif not TEST1K.exists() or not entry["dataset"].startswith("MNIST"):
        pytest.skip("the shared MNIST test images are not here")
    else:
        ds = load_npz(TEST1K)
    bm = BoundedModel.from_onnx(ROOT / entry["onnx"])
    v = bm.bounds(LpBall(ds.x, entry["eps"], clip=(0, 1)), "ibp", spec=margin_spec(ds.y, 10)).verified
    assert float(v.float().mean()) == pytest.approx(entry["measured"]["certified_acc"]["ibp"], abs=1e-3)
    with torch.no_grad():
        assert (net(ds.x[v]).argmax(1) == ds.y[v]).all()


def test_docs_models_table_matches_zoo_json():
    """docs/models.md lists every shipped model with the clean and certified accuracy that
    zoo.json records (so the page cannot drift from the files)."""
    text = (ROOT / "docs" / "models.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
            if line.startswith("| `")}
    assert set(rows) == {e["name"] for e in ENTRIES}
    for e in ENTRIES:
        m, row = e["measured"], rows[e["name"]]
        assert f"| {100 * m['clean_acc']:.1f}% |" in row, (e["name"], row)
        if e["method"] == "lipschitz":
            for r, acc in m["l2_certified_acc"].items():
                if acc > 0:
                    assert f"r={r}: {100 * acc:.1f}%" in row, (e["name"], r, row)
        else:
            best = m["best_verification_method"]
            assert f"IBP {100 * m['certified_acc']['ibp']:.1f}%" in row
            assert f"best {100 * m['certified_acc'][best]:.1f}% ({best})" in row


def test_trained_loads_every_zoo_model_safely():
    sys.path.insert(0, str(ROOT))
    from models import trained
    for e in ENTRIES:
        net, entry = trained(e["name"])
        assert entry is not None and not net.training
        with torch.no_grad():
            out = net(torch.zeros(1, *e["input_shape"]))
        assert out.shape == (1, 10)
    with pytest.raises(KeyError, match="no zoo model"):
        trained("not_a_model")
