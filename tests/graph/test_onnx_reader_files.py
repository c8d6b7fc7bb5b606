"""Every ONNX file of the repository (examples/, models/, tests/data/, vnncomp/) and of
../shared/benchmarks (classifiers, modern, weights, vnncomp/*/onnx incl. .onnx.gz; skipped
without it) read by the ONNX reader computes what onnxruntime computes on random inputs
(batch 1, and batch 2 where the batch is symbolic); and on the shipped classifiers, the IBP and
CROWN bounds from the reader's graph equal those from the onnx2torch path (while onnx2torch is
installed) within 1e-6 relative."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import onnx2torch_or_skip
import torch

ort = pytest.importorskip("onnxruntime")

from verifier import BoundedModel, LpBall  # noqa: E402
from verifier.graph.onnx_loader import load_onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "benchmarks"


def _files() -> list:
    found, seen = [], set()
    roots = [REPO / d for d in ("examples", "models", "tests/data", "vnncomp")] + [SHARED]
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(list(root.rglob("*.onnx")) + list(root.rglob("*.onnx.gz"))):
            digest = hashlib.sha1(p.read_bytes()).hexdigest()
            if digest in seen:     # the same network at two places (tests/data, shared)
                continue
            seen.add(digest)
            rel = p.relative_to(REPO) if p.is_relative_to(REPO) else Path("shared") / p.relative_to(SHARED)
            found.append(pytest.param(p, id=str(rel)))
    return found


def _session(path: Path):
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("path", _files())
def test_reader_matches_onnxruntime_on_every_onnx_file(path):
    om = load_onnx(path, converter="reader")
    assert om.converter == "reader"
    sess = _session(path)
    inp = sess.get_inputs()[0]
    declared = inp.shape
    per_sample = [max(1, int(d)) for d in om.input_shapes[0][1:]]
    batches = (1, 2) if not isinstance(declared[0], int) and len(declared) > 1 else (1,)
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.uniform(-1, 1, size=(batch, *per_sample)).astype(np.float32)
        feed = x.reshape([d if isinstance(d, int) else batch for d in declared]) if len(declared) > 1 \
            else x.reshape(declared)
        want = sess.run(None, {inp.name: feed})[0]
        with torch.no_grad():
            got = om.module(torch.from_numpy(x))
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.numel() == want.size
        np.testing.assert_allclose(got.numpy().reshape(want.shape), want, rtol=1e-4, atol=1e-5)


def _classifiers() -> list:
    paths = sorted((REPO / "tests/data/classifiers").glob("*.onnx")) + sorted(REPO.glob("models/*.onnx"))
    if (SHARED / "classifiers" / "models").exists():
        paths += sorted((SHARED / "classifiers" / "models").glob("*.onnx"))
    out, seen = [], set()
    for p in paths:
        digest = hashlib.sha1(p.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(pytest.param(p, id=p.name))
    return out


@pytest.mark.parametrize("path", _classifiers())
def test_reader_bounds_equal_onnx2torch_bounds(path):
    onnx2torch_or_skip()
    reader = BoundedModel.from_onnx(path)
    assert reader.onnx.converter == "reader"
    old = load_onnx(path, converter="onnx2torch")
    shape = reader.input_shape
    via_onnx2torch = BoundedModel(old.module, example_input=torch.zeros(1, *shape))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    ball = LpBall(x, 2 / 255, "inf", (0.0, 1.0))
    # the ViT's CROWN takes a minute on 2 cores: IBP only there
    for method in ("ibp",) if "vit" in path.name else ("ibp", "crown"):
        a = reader.bounds(ball, method=method)
        b = via_onnx2torch.bounds(ball, method=method)
        for u, v in ((a.lower, b.lower), (a.upper, b.upper)):
            scale = v.abs().max().clamp_min(1.0)
            assert torch.allclose(u, v, rtol=1e-6, atol=1e-6 * float(scale)), \
                f"{method}: max difference {float((u - v).abs().max())}"
