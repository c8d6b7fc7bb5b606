"""The ONNX path (BoundedModel.from_onnx through the ONNX reader): our forward equals onnxruntime's
within 1e-5, and IBP / CROWN / CROWN-IBP bounds are sound (outputs and every intermediate node),
for (1) a torch model exported with torch.onnx.export (Sub/Div normalization, Conv, Relu, Pad,
Slice, Transpose, Gather, Concat, Reshape through a Shape chain, Gemm) and (2) a graph written
with onnx.helper (Gemm with alpha, beta and transB = 0, strided Conv with pads, Pad with a
non-zero constant, Slice with steps, Gather, Transpose, Reshape, MatMul + Add, Concat)."""
from __future__ import annotations

import gzip
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from helpers import check_all_specs, check_sound, linf
from verifier import BoundedModel, Box, LpBall, ModelLoadError


class Exportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.45]).view(1, 1, 1))
        self.register_buffer("std", torch.tensor([0.22]).view(1, 1, 1))
        self.register_buffer("idx", torch.tensor([2, 0]))
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(5 * 3 * 4, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):                                    # [N, 1, 6, 6]
        h = (x - self.mean) / self.std
        h = torch.relu(self.conv(h))                         # [N, 3, 4, 4]
        h = F.pad(h, (1, 1, 1, 1), value=0.5)                # [N, 3, 6, 6]
        h = h[:, :, 1:5, ::2]                                # [N, 3, 4, 3]
        h = h.transpose(2, 3)                                # [N, 3, 3, 4]
        g = torch.index_select(h, 1, self.idx)               # Gather [N, 2, 3, 4]
        h = torch.cat([h, g], 1)                             # [N, 5, 3, 4]
        h = h.reshape(h.shape[0], -1)                        # Shape/Gather/Concat/Reshape
        return self.fc2(torch.relu(self.fc1(h)))


def _export(tmp_path, model, shape, name="m.onnx"):
    path = tmp_path / name
    torch.onnx.export(model, torch.zeros(1, *shape), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    return path


def _ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    path = _export(tmp_path_factory.mktemp("onnx"), Exportable().eval(), (1, 6, 6))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Sub", "Div", "Conv", "Relu", "Pad", "Slice", "Transpose", "Gather", "Concat",
            "Reshape", "Gemm"} <= ops, ops
    return path


def test_exported_forward_matches_onnxruntime(exported):
    bm = BoundedModel.from_onnx(exported)
    x = torch.rand(7, 1, 6, 6)
    np.testing.assert_allclose(bm(x).numpy(), _ort(exported, x.numpy()), rtol=1e-5, atol=1e-5)


def test_exported_bounds_sound(exported):
    bm = BoundedModel.from_onnx(exported, dtype=torch.float64)
    x = torch.rand(2, 1, 6, 6)
    check_all_specs(bm, LpBall(x, 0.05, "inf", (0.0, 1.0)), pgd_steps=12)
    check_sound(bm, LpBall(x, 0.5, 2), pgd_steps=12)


def test_exported_float32_bounds_sound(exported):
    bm = BoundedModel.from_onnx(exported)
    check_all_specs(bm, linf(torch.rand(2, 1, 6, 6), 0.03), pgd_steps=8)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32 if np.asarray(arr).dtype.kind == "f"
                                              else np.int64), name)


def _handmade_model(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)   # noqa: E731
    inits = [
        _init("mean", np.array([0.4, 0.6], dtype=np.float32).reshape(1, 2, 1, 1)),
        _init("std", np.array([0.3, 0.2], dtype=np.float32).reshape(1, 2, 1, 1)),
        _init("W1", f(3, 2, 3, 3) * 0.5), _init("b1", f(3)),
        _init("pads", np.array([0, 0, 1, 0, 0, 0, 0, 2], dtype=np.int64)),
        _init("padval", np.array(0.25, dtype=np.float32)),
        _init("starts", np.array([0, 0], dtype=np.int64)), _init("ends", np.array([3, 4], dtype=np.int64)),
        _init("axes", np.array([2, 3], dtype=np.int64)), _init("steps", np.array([1, 2], dtype=np.int64)),
        _init("gidx", np.array([2, 0, 2], dtype=np.int64)),
        _init("shape", np.array([-1, 18], dtype=np.int64)),
        _init("G", f(18, 6)), _init("c", f(6)),
        _init("M", f(18, 5)), _init("m", f(5)),
        _init("W3", f(4, 11)), _init("b3", f(4)),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["s"], name="sub"),
        helper.make_node("Div", ["s", "std"], ["n"], name="div"),
        helper.make_node("Conv", ["n", "W1", "b1"], ["c1"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),                       # [N, 3, 2, 2]
        helper.make_node("Pad", ["r1", "pads", "padval"], ["p"], name="pad", mode="constant"),  # [N,3,3,4]
        helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["sl"], name="slice"),  # [N,3,3,2]
        helper.make_node("Gather", ["sl", "gidx"], ["ga"], name="gather", axis=1),       # [N, 3, 3, 2]
        helper.make_node("Transpose", ["ga"], ["t"], name="transpose", perm=[0, 3, 2, 1]),  # [N,2,3,3]
        helper.make_node("Reshape", ["t", "shape"], ["flat"], name="reshape"),           # [N, 18]
        helper.make_node("Gemm", ["flat", "G", "c"], ["g1"], name="gemm", alpha=0.5, beta=2.0, transB=0),
        helper.make_node("Sigmoid", ["g1"], ["a1"], name="sigmoid"),
        helper.make_node("MatMul", ["flat", "M"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "m"], ["mma"], name="add"),
        helper.make_node("Relu", ["mma"], ["a2"], name="relu2"),
        helper.make_node("Concat", ["a1", "a2"], ["cat"], name="concat", axis=1),          # [N, 11]
        helper.make_node("Gemm", ["cat", "W3", "b3"], ["out"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    d = tmp_path_factory.mktemp("hand")
    path = d / "hand.onnx"
    onnx.save(_handmade_model(), str(path))
    gz = d / "hand.onnx.gz"
    with gzip.open(gz, "wb") as f:
        f.write(path.read_bytes())
    return path, gz


def test_handmade_forward_matches_onnxruntime(handmade):
    path, gz = handmade
    x = torch.rand(5, 2, 4, 4)
    want = _ort(path, x.numpy())
    for p in (path, gz):
        bm = BoundedModel.from_onnx(p)
        np.testing.assert_allclose(bm(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_handmade_bounds_sound(handmade):
    bm = BoundedModel.from_onnx(handmade[0], dtype=torch.float64)
    x = torch.rand(2, 2, 4, 4)
    check_all_specs(bm, LpBall(x, 0.1, "inf", (0.0, 1.0)), pgd_steps=12)
    check_sound(bm, LpBall(x, 0.6, 1), pgd_steps=12)
    lo = torch.rand(2, 2, 4, 4)
    check_sound(bm, Box(lo, lo + 0.2), pgd_steps=12)


def test_unreadable_onnx_is_a_model_load_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError):
        BoundedModel.from_onnx(bad)
    with pytest.raises(ModelLoadError):
        BoundedModel.from_onnx(tmp_path / "missing.onnx")
