"""Agreement with auto_LiRPA's reference margin bounds (tests/data/classifiers: 3 small ONNX
classifiers, 5 input boxes each, and the IBP / CROWN-IBP / CROWN runs of reference.json).

- IBP is deterministic: our margin lower and upper bounds equal the reference within 1e-4
  relative (``|ours - ref| <= 1e-4 max(1, |ref|)``).
- CROWN and CROWN-IBP: our margin lower bounds are at least as tight as the reference on every
  sample and row (``ours >= ref - 1e-3 max(1, |ref|)``). The reference ran one sample at a time;
  so do we here (see ``test_bounds_do_not_depend_on_the_rest_of_the_batch``).
- On lirpa_mnist_cnn_small (IBP-trained) IBP verifies 5/5.
Spec: C rows e_y - e_j for j != y ascending, ``verifier.margin_spec(labels, 10)``.

The same checks run on all 10 models of /work/shared/benchmarks/classifiers when it exists
(IBP and CROWN-IBP on all of them and CROWN on 9 in the default suite; CROWN on resnet4b, the
slow one, under ``-m slow``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import check_sound
from verifier import BoundedModel, Box, margin_spec

DATA = Path(__file__).resolve().parents[1] / "data" / "classifiers"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "classifiers"
LOCAL_MODELS = ["lirpa_mnist_fc_3layer", "rand_cnn_small", "lirpa_mnist_cnn_small"]
REF_METHOD = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}


@lru_cache(maxsize=None)
def _reference(root: Path) -> dict:
    return json.loads((root / "reference.json").read_text())["models"]


@lru_cache(maxsize=None)
def _load(root: Path, name: str):
    """-> (BoundedModel, xl, xu, labels); files flat in root, or under root/models."""
    d = root / "models" if (root / "models").is_dir() else root
    bm = BoundedModel.from_onnx(d / f"{name}.onnx")
    xl = torch.from_numpy(np.load(d / f"{name}_xl.npy")).float()
    xu = torch.from_numpy(np.load(d / f"{name}_xu.npy")).float()
    y = torch.from_numpy(np.load(d / f"{name}_y.npy")).long()
    return bm, xl, xu, y


def _runs(root, name, method):
    return [r for r in _reference(root)[name]["runs"] if r["method"] == REF_METHOD[method]]


def _ours(bm, xl, xu, y, method, per_sample):
    """Margin bounds [5, 9]; per_sample: one call per sample (the reference's protocol)."""
    if not per_sample:
        r = bm.bounds(Box(xl, xu), method=method, spec=margin_spec(y, 10))
        return r.lower, r.upper
    lo, up = [], []
    for i in range(xl.shape[0]):
        r = bm.bounds(Box(xl[i:i + 1], xu[i:i + 1]), method=method, spec=margin_spec(y[i:i + 1], 10))
        lo.append(r.lower)
        up.append(r.upper)
    return torch.cat(lo), torch.cat(up)


def check_ibp_equal(root, name):
    bm, xl, xu, y = _load(root, name)
    lo, up = _ours(bm, xl, xu, y, "ibp", per_sample=False)
    runs = _runs(root, name, "ibp")
    assert len(runs) == xl.shape[0]
    for run in runs:
        i = run["idx"]
        assert run["label"] == int(y[i]) and run["margin"]["j"] == [j for j in range(10) if j != y[i]]
        for ours, key in ((lo[i], "lower"), (up[i], "upper")):
            ref = torch.tensor(run["margin"][key], dtype=torch.float64)
            err = (ours.double() - ref).abs() / ref.abs().clamp(min=1)
            assert err.max().item() <= 1e-4, f"{name} sample {i} IBP {key}: rel. error {err.max().item():.3g}"
    return lo, up


def check_at_least_as_tight(root, name, method, per_sample=True):
    bm, xl, xu, y = _load(root, name)
    lo, _ = _ours(bm, xl, xu, y, method, per_sample)
    runs = _runs(root, name, method)
    assert len(runs) == xl.shape[0]
    for run in runs:
        i = run["idx"]
        ref = torch.tensor(run["margin"]["lower"], dtype=torch.float64)
        slack = lo[i].double() - (ref - 1e-3 * ref.abs().clamp(min=1))
        assert slack.min().item() >= 0, (
            f"{name} sample {i} {method}: looser than the reference by "
            f"{(ref - lo[i].double()).max().item():.4g} (row {int(slack.argmin())})")
    return lo


@pytest.mark.parametrize("name", LOCAL_MODELS)
def test_ibp_margins_equal_reference(name):
    check_ibp_equal(DATA, name)


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
@pytest.mark.parametrize("name", LOCAL_MODELS)
def test_crown_margins_at_least_as_tight_as_reference(name, method):
    check_at_least_as_tight(DATA, name, method)


def test_ibp_verifies_all_five_on_ibp_trained_cnn():
    bm, xl, xu, y = _load(DATA, "lirpa_mnist_cnn_small")
    r = bm.bounds(Box(xl, xu), method="ibp", spec=margin_spec(y, 10))
    assert r.verified.tolist() == [True] * 5
    ref = [run["verified"] for run in _runs(DATA, "lirpa_mnist_cnn_small", "ibp")]
    assert ref == [True] * 5


@pytest.mark.parametrize("name", LOCAL_MODELS)
def test_reference_models_sound(name):
    """Bounds on the real models (float32) contain sampled and PGD values (one sample)."""
    bm, xl, xu, y = _load(DATA, name)
    check_sound(bm, Box(xl[:1], xu[:1]), spec=margin_spec(y[:1], 10), n_random=32, n_extreme=32,
                pgd_steps=10, restarts=1, node_neurons=2)


def _batch_cases():
    for name in LOCAL_MODELS:
        for method in ("ibp", "crown-ibp", "crown"):
            yield pytest.param(name, method, id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_batch_cases()))
def test_bounds_do_not_depend_on_the_rest_of_the_batch(name, method):
    """Up to float32 reordering noise (1e-4 relative), a sample's bounds are the same alone and
    in a batch."""
    bm, xl, xu, y = _load(DATA, name)
    lo_b, up_b = _ours(bm, xl, xu, y, method, per_sample=False)
    lo_s, up_s = _ours(bm, xl, xu, y, method, per_sample=True)
    for b, s in ((lo_b, lo_s), (up_b, up_s)):
        err = ((b - s).abs() / s.abs().clamp(min=1)).max().item()
        assert err <= 1e-4, f"batched and per-sample bounds differ by {err:.3g} (relative)"


# --- all 10 models of the shared benchmark ------------------------------------------------------
def _shared_models():
    if not (SHARED / "reference.json").exists():
        return []
    return sorted(_reference(SHARED))


needs_shared = pytest.mark.skipif(not (SHARED / "reference.json").exists(),
                                  reason=f"{SHARED} is absent")


@needs_shared
@pytest.mark.parametrize("name", _shared_models() or ["none"])
def test_shared_benchmark_ibp_and_crown_ibp(name):
    check_ibp_equal(SHARED, name)
    check_at_least_as_tight(SHARED, name, "crown-ibp")


SLOW_CROWN = {"resnet4b"}    # ~13 s of CROWN for its 5 samples on one CPU thread (60 s before)


@needs_shared
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CROWN else [])
                                  for n in _shared_models()] or ["none"])
def test_shared_benchmark_crown(name):
    check_at_least_as_tight(SHARED, name, "crown")
    if name == "lirpa_mnist_cnn_small":
        bm, xl, xu, y = _load(SHARED, name)
        assert bm.bounds(Box(xl, xu), method="ibp", spec=margin_spec(y, 10)).verified.all()
