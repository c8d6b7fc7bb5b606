"""The ONNX reader (verifier.graph.onnx_reader), op by op: a small graph written with onnx.helper
for each op and each of its attribute / input / opset forms is read into a torch module whose
outputs equal onnxruntime's (batch 1, and batch 3 where the batch is symbolic), and where the
op has a bound rule, IBP / CROWN bounds of the read graph contain onnxruntime's outputs at
sampled points of the input box (so a graph built wrongly shows up against onnxruntime, not
only against itself)."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from helpers import onnx2torch_or_skip
import torch
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from verifier import BoundedModel, Box, UnsupportedOpsError  # noqa: E402
from verifier.graph.onnx_loader import load_onnx  # noqa: E402

RNG = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def i64(*v):
    return np.array(v, dtype=np.int64)


def model(nodes, in_shape, inits=None, opset=13, out="y", n_out=1):
    """One input ``x`` of ``[N, *in_shape]`` (N symbolic); outputs ``y`` (and ``y1``...)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    outs = [helper.make_tensor_value_info(out if k == 0 else f"{out}{k}", TensorProto.FLOAT, None)
            for k in range(n_out)]
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "g", [x], outs, tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7 if opset < 15 else 8 if opset < 19 else 9
    return m


_COUNT = [0]


def N(op, ins, outs="y", name=None, **attrs):
    outs = [outs] if isinstance(outs, str) else outs
    _COUNT[0] += 1
    return helper.make_node(op, ins, outs, name=name or f"{op.lower()}_{_COUNT[0]}", **attrs)


# (id, model, bounded: whether the op has a bound rule)
CASES = []


def case(name, m, bounded=True):
    CASES.append(pytest.param(m, bounded, id=name))


W = f32(4, 5)
case("gemm_transB1", model([N("Gemm", ["x", "W", "b"], transB=1)], [4],
                           {"W": f32(3, 4), "b": f32(3)}))
case("gemm_transB0_alpha_beta", model([N("Gemm", ["x", "W", "b"], alpha=0.5, beta=2.0)], [4],
                                      {"W": W, "b": f32(5)}))
case("gemm_transB0_no_bias", model([N("Gemm", ["x", "W"])], [4], {"W": W}))
case("gemm_C_row", model([N("Gemm", ["x", "W", "b"], transB=1, alpha=2.0)], [4],
                         {"W": f32(3, 4), "b": f32(1, 3)}))
case("gemm_C_scalar", model([N("Gemm", ["x", "W", "b"], beta=3.0)], [4], {"W": W, "b": f32(1)}))
case("matmul_add", model([N("MatMul", ["x", "W"], "h"), N("Add", ["h", "b"])], [4],
                         {"W": W, "b": f32(5)}))
case("matmul_left", model([N("MatMul", ["M", "x"])], [4, 3], {"M": f32(2, 4)}))
case("matmul_two_perturbed", model([N("Relu", ["x"], "r"), N("Transpose", ["r"], "t", perm=[0, 2, 1]),
                                    N("MatMul", ["x", "t"])], [3, 4]))
case("conv_asym_pads", model([N("Conv", ["x", "W", "b"], pads=[0, 1, 2, 1], strides=[2, 1])], [2, 6, 6],
                             {"W": f32(3, 2, 3, 3), "b": f32(3)}))
case("conv_same_upper", model([N("Conv", ["x", "W"], auto_pad="SAME_UPPER", strides=[2, 2])], [2, 7, 6],
                              {"W": f32(3, 2, 2, 2)}))
case("conv_same_lower", model([N("Conv", ["x", "W"], auto_pad="SAME_LOWER")], [2, 5, 5],
                              {"W": f32(3, 2, 2, 2)}))
case("conv_group_dilation", model([N("Conv", ["x", "W", "b"], group=2, dilations=[2, 1], pads=[1, 1, 1, 1])],
                                  [4, 6, 6], {"W": f32(6, 2, 3, 3), "b": f32(6)}))
case("conv1d", model([N("Conv", ["x", "W", "b"], pads=[1, 1], strides=[2])], [2, 9],
                     {"W": f32(3, 2, 3), "b": f32(3)}))
case("conv_transpose", model([N("ConvTranspose", ["x", "W", "b"], strides=[2, 2], pads=[1, 1, 1, 1],
                                output_padding=[1, 0])], [3, 4, 4], {"W": f32(3, 2, 3, 3), "b": f32(2)}))
case("conv_transpose_asym", model([N("ConvTranspose", ["x", "W"], strides=[2, 2], pads=[0, 1, 2, 0])],
                                  [3, 4, 4], {"W": f32(3, 2, 3, 3)}))
case("conv_transpose_output_shape", model([N("ConvTranspose", ["x", "W", "b"], strides=[2, 2],
                                            output_shape=[8, 7])], [3, 4, 4], {"W": f32(3, 2, 3, 3), "b": f32(2)}))
case("conv_transpose_same_upper", model([N("ConvTranspose", ["x", "W"], strides=[2, 2], auto_pad="SAME_UPPER")],
                                        [3, 4, 4], {"W": f32(3, 2, 4, 4)}))
case("conv_transpose_same_lower", model([N("ConvTranspose", ["x", "W"], strides=[2, 3], auto_pad="SAME_LOWER")],
                                        [3, 4, 4], {"W": f32(3, 2, 3, 4)}))
case("conv_transpose_shape_same_lower", model([N("ConvTranspose", ["x", "W"], strides=[2, 2], auto_pad="SAME_LOWER",
                                                 output_shape=[7, 8])], [3, 4, 4], {"W": f32(3, 2, 3, 3)}))
bn = {"s": f32(3), "bb": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5}
case("batchnorm_9", model([N("BatchNormalization", ["x", "s", "bb", "m", "v"], epsilon=1e-3)], [3, 4, 4],
                          bn, opset=9))
case("batchnorm_15_rank2", model([N("BatchNormalization", ["x", "s", "bb", "m", "v"])], [3], bn, opset=15))
case("maxpool", model([N("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                      [2, 7, 7]))
case("maxpool_ceil", model([N("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
                           [2, 5, 5]), bounded=False)   # a partial window: no rule (the mapping says)
case("maxpool_default_strides", model([N("MaxPool", ["x"], kernel_shape=[2, 2])], [1, 4, 4]))
case("avgpool_exclude_pad", model([N("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1])], [2, 6, 6]))
case("avgpool_include_pad", model([N("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                     count_include_pad=1)], [2, 5, 5]))
case("avgpool_asym_include", model([N("AveragePool", ["x"], kernel_shape=[2, 2], pads=[0, 1, 1, 0],
                                      count_include_pad=1)], [2, 4, 4]))
case("global_avgpool", model([N("GlobalAveragePool", ["x"])], [3, 4, 5]))
case("global_maxpool", model([N("GlobalMaxPool", ["x"], "h"), N("Flatten", ["h"])], [3, 2, 2]))
case("flatten_1_opset8", model([N("Flatten", ["x"])], [2, 3, 2], opset=8))
case("flatten_axis_neg", model([N("Flatten", ["x"], axis=-2), N("Relu", ["y"], "z")], [1, 3, 2],
                               opset=13, out="z"))
case("reshape_zero_minus1", model([N("Reshape", ["x", "s"])], [2, 3, 4], {"s": i64(0, -1, 4)}))
shape_chain = [N("Shape", ["x"], "sh", name="shape"), N("Gather", ["sh", "i0"], "b", name="g", axis=0),
               N("Unsqueeze", ["b", "ax"], "bu", name="u"), N("Concat", ["bu", "rest"], "t", name="c", axis=0),
               N("Reshape", ["x", "t"], name="reshape")]
case("reshape_shape_chain", model(shape_chain, [2, 3, 4], {"i0": np.array(0, dtype=np.int64),
                                                           "ax": i64(0), "rest": i64(-1)}))
cast_chain = [N("Shape", ["x"], "sh", name="shape", start=1), N("Cast", ["sh"], "shf", to=TensorProto.FLOAT),
              N("ReduceProd", ["shf"], "p", keepdims=1), N("Cast", ["p"], "pi", to=TensorProto.INT64),
              N("Concat", ["m1", "pi"], "t", axis=0), N("Reshape", ["x", "t"])]
case("reshape_cast_reduceprod_chain", model(cast_chain, [2, 3], {"m1": i64(-1)}, opset=15))
case("transpose", model([N("Transpose", ["x"], perm=[0, 3, 1, 2])], [2, 3, 4]))
case("concat_const", model([N("Concat", ["x", "c"], axis=-1)], [2, 3], {"c": f32(1, 2, 2)}))
case("slice_1_attrs", model([N("Slice", ["x"], starts=[1, -3], ends=[3, 100], axes=[1, 2])], [4, 5],
                            opset=9))
case("slice_10_steps_negative_axes", model([N("Slice", ["x", "s", "e", "a", "st"])], [6, 7],
                                           {"s": i64(1, 0), "e": i64(6, -1), "a": i64(-1, -2),
                                            "st": i64(2, 3)}))
case("slice_negative_step", model([N("Slice", ["x", "s", "e", "a", "st"])], [6, 4],
                                  {"s": i64(-1), "e": i64(-100), "a": i64(1), "st": i64(-2)}))
case("gather_scalar", model([N("Gather", ["x", "i"], axis=1)], [4, 3], {"i": np.array(-1, dtype=np.int64)}))
case("gather_2d_indices", model([N("Gather", ["x", "i"], axis=2)], [2, 5],
                                {"i": np.array([[0, 4], [-1, 2]], dtype=np.int64)}))
case("gather_elements", model([N("GatherElements", ["x", "i"], axis=1)], [3, 2],
                              {"i": np.array([[[2, 0], [1, -1]]], dtype=np.int64)}))
case("squeeze_11_attr", model([N("Squeeze", ["x"], axes=[-1, 2])], [3, 1, 1], opset=11))
case("squeeze_13_input", model([N("Squeeze", ["x", "a"])], [3, 1, 4], {"a": i64(-2)}))
case("unsqueeze_11_attr", model([N("Unsqueeze", ["x"], axes=[1, -1])], [3, 4], opset=11))
case("unsqueeze_13_input", model([N("Unsqueeze", ["x", "a"])], [3, 4], {"a": i64(-1, 1)}))
case("pad_2_attrs", model([N("Pad", ["x"], pads=[0, 0, 1, 2, 0, 0, 0, 1], value=0.5)], [2, 3, 3], opset=9))
case("pad_11_inputs", model([N("Pad", ["x", "p", "v"])], [2, 3, 3],
                            {"p": i64(0, 1, 0, 2, 0, 0, 1, 0), "v": np.array(-0.25, dtype=np.float32)}))
case("pad_11_reflect", model([N("Pad", ["x", "p"], mode="reflect")], [2, 4, 4],
                             {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}))
case("pad_11_edge", model([N("Pad", ["x", "p"], mode="edge")], [2, 4, 4], {"p": i64(0, 0, 1, 0, 0, 0, 0, 2)}))
case("pad_18_axes", model([N("Pad", ["x", "p", "", "a"])], [2, 3, 3], {"p": i64(1, 0, 2, 1), "a": i64(-1, 1)},
                          opset=18))
case("pad_negative_crop", model([N("Pad", ["x", "p"])], [2, 5, 5], {"p": i64(0, 0, -1, 1, 0, 0, 1, -2)}))
case("softmax_11_flattens", model([N("Softmax", ["x"], axis=1)], [3, 2], opset=11))
case("softmax_11_last", model([N("Softmax", ["x"], axis=2)], [3, 4], opset=11))
case("softmax_13_axis", model([N("Softmax", ["x"], axis=-2)], [3, 4]))
case("logsoftmax_13", model([N("LogSoftmax", ["x"])], [5]))
case("layernorm", model([N("LayerNormalization", ["x", "g", "b"], epsilon=1e-3)], [3, 4],
                        {"g": f32(4), "b": f32(4)}, opset=17))
case("layernorm_axis_neg2_no_bias", model([N("LayerNormalization", ["x", "g"], axis=-2)], [3, 4],
                                          {"g": f32(3, 4)}, opset=17))
case("reducemean_13_keepdims0_negative", model([N("ReduceMean", ["x"], axes=[-1, -2], keepdims=0)],
                                               [2, 3, 4]))
case("reducemax_13_negative", model([N("ReduceMax", ["x"], axes=[-1, 1], keepdims=0)], [2, 3, 4]))
case("reducemin_13", model([N("ReduceMin", ["x"], axes=[2])], [2, 3]))
case("reducesum_13_input", model([N("ReduceSum", ["x", "a"], keepdims=0)], [2, 3, 4], {"a": i64(-1, 1)}))
case("reducesum_13_noop", model([N("ReduceSum", ["x"], noop_with_empty_axes=1)], [2, 3]))
case("reducesum_11_attr", model([N("ReduceSum", ["x"], axes=[1])], [2, 3], opset=11))
for _op in ("ReduceMean", "ReduceMax", "ReduceMin"):
    case(f"{_op.lower()}_18_axes_input", model([N(_op, ["x", "a"], keepdims=0)], [2, 3, 4],
                                               {"a": i64(-1)}, opset=18))
case("reducel2_13", model([N("ReduceL2", ["x"], axes=[1], keepdims=0)], [3], opset=13), bounded=False)
case("max_variadic_const", model([N("Relu", ["x"], "r", name="r"), N("Max", ["x", "c", "r"])], [3],
                                 {"c": f32(3)}))
case("min_two", model([N("Min", ["x", "c"])], [3], {"c": f32(1)}))
case("sum_mean_variadic", model([N("Relu", ["x"], "r"), N("Sum", ["x", "r", "c"], "s"),
                                 N("Mean", ["s", "x"])], [3], {"c": f32(3)}))
case("identity_dropout_7", model([N("Identity", ["x"], "i"), N("Dropout", ["i"], "d", ratio=0.3),
                                  N("Relu", ["d"])], [3], opset=7))
case("dropout_12_inputs", model([N("Dropout", ["x", "r"])], [3], {"r": np.array(0.5, dtype=np.float32)},
                                opset=12))
case("clip_6_attrs", model([N("Clip", ["x"], min=-0.5, max=0.7)], [4], opset=6))
case("clip_11_inputs", model([N("Clip", ["x", "lo", "hi"])], [4], {"lo": np.array(-0.3, dtype=np.float32),
                                                                   "hi": np.array(0.4, dtype=np.float32)}))
case("clip_11_max_only", model([N("Clip", ["x", "", "hi"])], [4], {"hi": np.array(0.2, dtype=np.float32)}))
case("hardsigmoid_default", model([N("HardSigmoid", ["x"])], [4]))
case("hardsigmoid_alpha", model([N("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], [4]))
case("hardswish", model([N("HardSwish", ["x"])], [4], opset=14))
case("leakyrelu", model([N("LeakyRelu", ["x"], alpha=0.1)], [4]))
case("prelu_channel", model([N("PRelu", ["x", "s"])], [3, 2, 2], {"s": np.array([[[0.1]], [[0.3]], [[0.2]]],
                                                                                  dtype=np.float32)}))
case("prelu_scalar", model([N("PRelu", ["x", "s"])], [3], {"s": np.array([0.25], dtype=np.float32)}))
case("prelu_general", model([N("PRelu", ["x", "s"])], [2, 3], {"s": np.abs(f32(2, 3)) * 0.5}))
case("elu", model([N("Elu", ["x"], alpha=0.7)], [4]))
for _op in ("Relu", "Sigmoid", "Tanh", "Softplus", "Sin", "Cos", "Exp", "Erf", "Abs", "Neg"):
    case(_op.lower(), model([N(_op, ["x"])], [4]))
case("log_sqrt_reciprocal", model([N("Exp", ["x"], "e"), N("Log", ["e"], "l"), N("Sqrt", ["e"], "s"),
                                   N("Reciprocal", ["e"], "r"), N("Add", ["l", "s"], "ls"),
                                   N("Add", ["ls", "r"])], [3]))
case("pow_const", model([N("Pow", ["x", "p"])], [3], {"p": np.array(3.0, dtype=np.float32)}))
case("const_minus_div", model([N("Sub", ["c", "x"], "s"), N("Exp", ["s"], "e"), N("Div", ["c", "e"])], [3],
                              {"c": f32(3)}))
case("gelu_20", model([N("Gelu", ["x"])], [4], opset=20))
case("cast_float", model([N("Cast", ["x"], "c", to=TensorProto.FLOAT), N("Relu", ["c"])], [3]))
case("split_11_attr", model([N("Split", ["x"], ["y", "y1"], axis=1, split=[1, 3])], [4], opset=11, n_out=2))
case("split_13_input", model([N("Split", ["x", "s"], ["a", "b"], axis=-1), N("Mul", ["a", "b"])], [4],
                             {"s": i64(2, 2)}))
case("split_18_num_outputs", model([N("Split", ["x"], ["y", "y1"], axis=1, num_outputs=2)], [5, 2],
                                   opset=18, n_out=2))
case("einsum", model([N("Relu", ["x"], "r"), N("Einsum", ["x", "r"], equation="bij,bkj->bik")], [3, 2],
                     opset=12))
case("expand", model([N("Expand", ["x", "s"])], [1, 4], {"s": i64(1, 3, 1)}))
case("tile", model([N("Tile", ["x", "r"])], [2, 3], {"r": i64(1, 2, 1)}))
case("depth_to_space_dcr", model([N("DepthToSpace", ["x"], blocksize=2)], [8, 2, 3]))
case("depth_to_space_crd", model([N("DepthToSpace", ["x"], blocksize=2, mode="CRD")], [8, 2, 3]))
case("space_to_depth", model([N("SpaceToDepth", ["x"], blocksize=2)], [2, 4, 6]))
folded = [N("Shape", ["x"], "sh", name="shape"), N("ConstantOfShape", ["k"], "z", name="cos",
                                                    value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
          N("Range", ["r0", "r1", "r2"], "rg", name="range"), N("Equal", ["rg", "z2"], "eq", name="eq"),
          N("Where", ["eq", "sh4", "m1"], "t", name="where"), N("Gather", ["sh", "g"], "sh4", name="g4"),
          N("Reshape", ["x", "t"])]
case("folded_constant_of_shape_range_where", model(
    [folded[0], folded[5], folded[1], folded[2], folded[3], folded[4], folded[6]], [2, 3],
    {"k": i64(2), "r0": np.array(0, dtype=np.int64), "r1": np.array(2, dtype=np.int64),
     "r2": np.array(1, dtype=np.int64), "z2": i64(0, 9), "m1": i64(-1, -1), "g": i64(0, 0)}))


def _ort(m, x):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _in_shape(m):
    return [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]


@pytest.mark.parametrize("m,bounded", CASES)
def test_reader_matches_onnxruntime(m, bounded, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    om = load_onnx(path, converter="reader")
    assert om.converter == "reader"
    shape = _in_shape(m)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        try:
            want = _ort(m, x)
        except Exception:   # e.g. a Concat with a constant of batch 1: batch 1 only
            assert batch > 1
            continue
        with torch.no_grad():
            got = om.module(torch.from_numpy(x))
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert tuple(g.shape) == w.shape
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,bounded", [c for c in CASES if c.values[1]])
def test_reader_bounds_contain_onnxruntime_outputs(m, bounded, tmp_path):
    """IBP and CROWN bounds of the read graph over a box hold every onnxruntime output at 64
    random points and the box's corners along each input (float32 bounds, 1e-5 slack)."""
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    if len(m.graph.output) > 1:
        del m.graph.output[1:]
        onnx.save(m, str(path))
    bm = BoundedModel.from_onnx(path)
    assert bm.onnx.converter == "reader"
    shape = _in_shape(m)
    g = np.random.default_rng(7)
    lo = g.standard_normal((1, *shape)).astype(np.float32) - 0.2
    hi = lo + 0.4
    pts = g.uniform(size=(64, *shape)).astype(np.float32) * (hi - lo) + lo
    corners = np.where(g.uniform(size=(16, *shape)) < 0.5, lo, hi).astype(np.float32)
    pts = np.concatenate([pts, corners, lo, hi])
    want = np.concatenate([_ort(m, p[None])[0].reshape(1, -1) for p in pts])
    for method in ("ibp", "crown"):
        res = bm.bounds(Box(torch.from_numpy(lo), torch.from_numpy(hi)), method=method)
        L = res.lower.reshape(1, -1).numpy()
        U = res.upper.reshape(1, -1).numpy()
        tol = 1e-5 * (1 + np.abs(want))
        assert (want >= L - tol).all() and (want <= U + tol).all(), \
            f"{method}: onnxruntime output outside the bounds"


def test_unknown_and_unreadable_nodes_are_all_listed(tmp_path):
    """Unknown ops (any domain) and nodes whose attributes the reader cannot express are
    reported together, by node name; known ops that read a reported node's output are not,
    unknown ones are."""
    nodes = [N("FancyA", ["x"], "a", name="fancy_a", domain="my.domain"),
             N("Relu", ["a"], "ra0", name="after_fancy"), N("FancyB", ["ra0"], "ra", name="fancy_b"),
             N("MaxPool", ["x"], "p", name="asym_pool", kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             N("Hardmax", ["x"], "h", name="hard"),
             N("Add", ["ra", "p"], "s", name="sum1"), N("Add", ["s", "h"], "y", name="sum2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("my.domain", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UnsupportedOpsError) as info:
        load_onnx(path, converter="reader")
    names = [n for n, _ in info.value.problems]
    assert names == ["fancy_a", "fancy_b", "asym_pool", "hard"]
    msg = str(info.value)
    assert "FancyA" in msg and "my.domain" in msg and "asymmetric pads" in msg and "Hardmax" in msg


def test_batch_dependent_shape_used_as_a_tensor_is_reported(tmp_path):
    """x + Cast(Shape(x)[0]) adds the batch size: folding it at batch 1 would be wrong for
    other batches, so it is reported, not folded."""
    nodes = [N("Shape", ["x"], "sh", name="shape"), N("Gather", ["sh", "i"], "b", name="g"),
             N("Cast", ["b"], "bf", name="cast", to=TensorProto.FLOAT), N("Add", ["x", "bf"], name="add")]
    m = model(nodes, [3], {"i": np.array(0, dtype=np.int64)})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UnsupportedOpsError) as info:
        load_onnx(path, converter="reader")
    assert [n for n, _ in info.value.problems] == ["add"]
    assert "batch size" in str(info.value)


def test_parameters_keep_their_onnx_initializer_names(tmp_path):
    """Weights are parameters named by their ONNX initializers: Gemm (transB=1) and Conv as
    stored, MatMul's and Gemm-transB=0's weight transposed (the layer holds W^T)."""
    nodes = [N("Conv", ["x", "cw", "cb"], "c", name="/conv/Conv"), N("Flatten", ["c"], "f", name="flat"),
             N("Gemm", ["f", "gw", "gb"], "g", name="/fc/Gemm", transB=1), N("Relu", ["g"], "r", name="relu"),
             N("MatMul", ["r", "mw"], "mm", name="mm"), N("Add", ["mm", "mb"], "a", name="mm_add"),
             N("Gemm", ["a", "tw"], name="gemm_t")]
    inits = {"cw": f32(2, 1, 2, 2), "cb": f32(2), "gw": f32(4, 18), "gb": f32(4), "mw": f32(4, 3),
             "mb": f32(3), "tw": f32(3, 2)}
    m = model(nodes, [1, 4, 4], inits)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    bm = BoundedModel.from_onnx(path)
    params = bm.parameters()
    # MatMul's Add is folded into the layer's bias (verifier.graph.simplify): not a parameter
    assert sorted(params) == sorted(set(inits) - {"mb"})
    for k, v in inits.items():
        if k == "mb":
            continue
        np.testing.assert_array_equal(params[k].numpy(), v)
    assert [bm.graph[n].op for n in bm.graph.order] == \
        ["input", "conv", "select", "linear", "relu", "linear", "linear"]
    assert bm.graph["mm_add"].params["param_names"] == {"weight": ("mw", "t")}
    assert bm.graph["gemm_t"].params["param_names"] == {"weight": ("tw", "t")}
    assert bm.graph.order[1:4] == ["conv_conv", "flat", "fc_gemm"]


def test_reading_imports_neither_onnx2torch_nor_torchvision(tmp_path):
    """Loading and bounding an ONNX model through the reader imports no onnx2torch (which
    imports torchvision and costs seconds at start-up)."""
    import subprocess
    m = model([N("Gemm", ["x", "W", "b"], transB=1), ], [4], {"W": f32(3, 4), "b": f32(3)})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    code = ("import sys, torch\nfrom verifier import BoundedModel, Box\n"
            f"bm = BoundedModel.from_onnx({str(path)!r})\n"
            "bm.bounds(Box(torch.zeros(1, 4), torch.ones(1, 4)), method='crown')\n"
            "import verifier.cli.main\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx2torch', 'torchvision')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_each_constant_gets_its_own_buffer():
    """Constants made while reading one op and then dropped (e.g. normalized indices) each get
    their own buffer: a cache keyed by a freed object's id would hand out another's."""
    from types import SimpleNamespace

    from verifier.graph.onnx_reader import Reader
    r = Reader(13)
    r.onnx_node = SimpleNamespace(name="n", op_type="Gather", output=["out"])
    nodes = [r.attr(r.const(torch.tensor([float(k)]))) for k in range(4)]
    assert len({n.target for n in nodes}) == 4
    for k, n in enumerate(nodes):
        assert float(r.root.get_submodule("initializers").get_buffer(n.target.split(".")[1])) == k


def test_onnx2torch_is_the_fallback_for_ops_the_reader_lacks(tmp_path):
    """GatherND has no reader: with onnx2torch installed the model is converted by it (and
    still computes what onnxruntime computes); the reader alone lists the op."""
    m = model([N("Relu", ["x"], "r"), N("GatherND", ["r", "i"], name="gnd")], [3, 2],
              {"i": np.array([[[0, 2], [0, 0]]], dtype=np.int64)})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UnsupportedOpsError, match="GatherND"):
        load_onnx(path, converter="reader")
    onnx2torch_or_skip()
    om = load_onnx(path)
    assert om.converter == "onnx2torch"
    x = np.random.default_rng(0).standard_normal((1, 3, 2)).astype(np.float32)
    with torch.no_grad():
        got = om.module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(m, x)[0], rtol=1e-6)
