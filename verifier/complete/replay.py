"""Replay a candidate counterexample on the original model (onnxruntime for ONNX files)."""
from __future__ import annotations

import numpy as np

from ..deps import require


class OnnxRunner:
    """Evaluates the original ONNX file with onnxruntime (1 thread), on float32 inputs."""

    def __init__(self, proto, input_name: str, input_shape):
        ort = require("onnxruntime", "replaying counterexamples on an ONNX model")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            if "IR version" not in str(e):
                raise
            # a newer onnx wrote an IR version this onnxruntime does not know: the graph is
            # the same, only the file's version stamp is lowered
            import onnx
            m = onnx.ModelProto()
            m.CopyFrom(proto)
            m.ir_version = 8
            self.session = ort.InferenceSession(m.SerializeToString(), opts,
                                                providers=["CPUExecutionProvider"])
        self.input_name = input_name
        self.input_shape = [max(1, d) for d in input_shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(self.input_shape)
        (y,) = self.session.run(None, {self.input_name: x})[:1]
        return np.asarray(y, dtype=np.float64).reshape(-1)


def replay_runner(model):
    """The original model's evaluator: onnxruntime for a model read from ONNX (a
    MissingDependencyError when onnxruntime is not installed: a counterexample is never
    replayed on the converted model in its place), else torch."""
    onnx_model = getattr(model, "onnx", None)
    if onnx_model is not None:
        return OnnxRunner(onnx_model.proto, onnx_model.input_names[0], onnx_model.input_shapes[0]), \
            "onnxruntime"
    import torch

    def run(x):
        t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=model.device)
        return model(t.reshape(1, *model.input_shape)).double().cpu().numpy().reshape(-1)
    return run, "torch"
