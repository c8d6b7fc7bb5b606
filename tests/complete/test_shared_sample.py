"""A sample of the real VNN-COMP benchmarks (../shared; skipped without it): each verdict must
agree with the ground truth whenever it is sat or unsat, a sat must replay on onnxruntime, and
the chosen easy instances must be solved. Also a gzipped model and spec are accepted."""
import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from verifier.complete import verify
from verifier.spec.vnnlib import read_vnnlib

SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "vnncomp"

SAMPLE = [  # (benchmark, onnx, vnnlib): easy instances of both kinds from each benchmark
    ("acasxu", "onnx/ACASXU_run2a_1_7_batch_2000.onnx", "vnnlib/prop_3.vnnlib"),
    ("acasxu", "onnx/ACASXU_run2a_2_4_batch_2000.onnx", "vnnlib/prop_3.vnnlib"),
    ("acasxu", "onnx/ACASXU_run2a_2_7_batch_2000.onnx", "vnnlib/prop_2.vnnlib"),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_0_0.03.vnnlib"),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_12_0.03.vnnlib"),
    ("collins_rul_cnn", "onnx/NN_rul_full_window_20.onnx", "vnnlib/if_then_9levels_w20.vnnlib"),
    ("collins_rul_cnn", "onnx/NN_rul_full_window_20.onnx", "vnnlib/monotonicity_CI_shift10_w20.vnnlib"),
    ("oval21", "onnx/cifar_wide_kw.onnx", "vnnlib/cifar_wide_kw-img1909-eps0.0033986928104575162.vnnlib"),
]


def _truth():
    with open(SHARED / "ground_truth.csv", newline="") as f:
        return {(r["benchmark"], r["onnx"], r["vnnlib"]): r["expected"] for r in csv.DictReader(f)}


def _replays(onnx_path, vnnlib_path, v):
    spec = read_vnnlib(vnnlib_path)
    region = spec.regions[v.counterexample.region]
    assert np.all(v.counterexample.x >= region.lower - 1e-7 * np.maximum(1, abs(region.lower)))
    assert np.all(v.counterexample.x <= region.upper + 1e-7 * np.maximum(1, abs(region.upper)))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    y = sess.run(None, {inp.name: v.counterexample.x.astype(np.float32).reshape(shape)})[0].reshape(-1)
    return region.disjuncts[v.counterexample.disjunct].holds(y)


@pytest.mark.parametrize("bench,onnx_rel,vnnlib_rel", SAMPLE, ids=[f"{b}-{Path(v).stem}" for b, _, v in SAMPLE])
def test_sample_of_shared_benchmarks_has_no_wrong_answer(bench, onnx_rel, vnnlib_rel):
    if not SHARED.exists():
        pytest.skip("../shared/benchmarks/vnncomp is not present")
    expected = _truth()[(bench, onnx_rel, vnnlib_rel)]
    v = verify(SHARED / bench / onnx_rel, SHARED / bench / vnnlib_rel, timeout=60)
    assert v.status == expected, v
    if v.status == "sat":
        assert _replays(SHARED / bench / onnx_rel, SHARED / bench / vnnlib_rel, v)


def test_gzipped_model_and_spec(tmp_path):
    data = Path(__file__).resolve().parents[1] / "data" / "vnncomp_test"
    for src, dst in (("onnx/test_sat.onnx", "m.onnx.gz"), ("vnnlib/test_prop.vnnlib", "p.vnnlib.gz")):
        with open(data / src, "rb") as fi, gzip.open(tmp_path / dst, "wb") as fo:
            shutil.copyfileobj(fi, fo)
    v = verify(tmp_path / "m.onnx.gz", tmp_path / "p.vnnlib.gz", timeout=30)
    assert v.status == "sat"
    assert _replays(data / "onnx/test_sat.onnx", data / "vnnlib/test_prop.vnnlib", v)
