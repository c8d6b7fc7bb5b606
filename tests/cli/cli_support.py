"""Helpers of the CLI tests: a tiny ONNX MLP and an unsupported-op model built with
onnx.helper, and onnxruntime as an independent forward pass. (A uniquely named module rather
than conftest.py, so that other test folders' conftest files cannot shadow it.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "data"


def make_mlp(path: Path, seed: int = 0) -> Path:
    """x [N, 1, 2, 2] -> Flatten -> Gemm(4 -> 6) -> Relu -> Gemm(6 -> 3): 3 'classes'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (6, 4)), ("b1", (6,)), ("W2", (3, 6)), ("b2", (3,)))]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      ["N", 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def make_unsupported(path: Path) -> Path:
    """MatMul -> Floor -> Selu: two nodes without a bound rule."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    W = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Floor", ["h"], ["e"], name="the_floor"),
             helper.make_node("Selu", ["e"], ["y"], name="the_selu")]
    g = helper.make_graph(nodes, "unsup", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def onnx_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output by onnxruntime: an oracle independent of the verifier."""
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]
