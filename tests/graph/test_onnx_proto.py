"""verifier.graph.onnx_proto decodes initializers and attributes as onnx does (numpy_helper,
helper.get_attribute_value), for raw and typed storage of every dtype a network holds, and
reads a model without importing onnx."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from verifier.graph.onnx_proto import TensorDecodeError, attribute_value, model_class, to_array

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8,
          np.uint16, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_tensors_decode_as_numpy_helper_does(dtype, raw):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((2, 3)) * 50).astype(dtype)
    if raw:
        t = numpy_helper.from_array(a, "t")
    else:
        t = helper.make_tensor("t", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), a.shape,
                               a.reshape(-1).tolist(), raw=False)
        assert not t.raw_data
    got = to_array(t)
    want = numpy_helper.to_array(t)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_scalar_and_empty_tensors():
    for a in (np.array(3.5, dtype=np.float32), np.zeros((0, 4), dtype=np.int64)):
        t = numpy_helper.from_array(a, "t")
        got = to_array(t)
        assert got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_external_data_is_a_clear_error():
    t = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    with pytest.raises(TensorDecodeError, match="external"):
        to_array(t)


def test_attributes_decode_as_onnx_helper_does():
    node = helper.make_node("X", [], [], f=0.25, i=3, s="abc", ints=[1, -2], floats=[0.5, 1.5],
                            strings=["a", "b"], t=numpy_helper.from_array(np.arange(3, dtype=np.int64)))
    for a in node.attribute:
        want = helper.get_attribute_value(a)
        got = attribute_value(a)
        if a.name == "t":
            np.testing.assert_array_equal(got.numpy(), numpy_helper.to_array(want))
        elif a.name in ("s", "strings"):
            assert got == (want.decode() if a.name == "s" else [w.decode() for w in want])
        else:
            assert got == pytest.approx(want)


def test_model_class_is_onnx_model_proto():
    assert model_class() is onnx.ModelProto


def test_reading_a_model_does_not_import_onnx(tmp_path):
    """onnx's import (ml_dtypes) costs about a second: reading and bounding skip it."""
    path = tmp_path / "m.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
                           helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code = ("import sys, torch\nfrom verifier import BoundedModel, Box\n"
            f"bm = BoundedModel.from_onnx({str(path)!r})\n"
            "r = bm.bounds(Box(torch.zeros(1, 3), torch.ones(1, 3)), method='crown')\n"
            "assert float(r.upper.max()) == 3.0, r.upper\n"
            "print(sorted(m for m in ('onnx', 'ml_dtypes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
