"""Read an ONNX file (plain or .gz) into a torch fx.GraphModule through onnx2torch.

Old opsets that onnx2torch refuses (e.g. Flatten-1, Dropout-7 in VNN-COMP files) are up-converted
with ``onnx.version_converter`` first. Every operator without a converter is reported at once.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

from ..errors import ModelLoadError, UnsupportedOpsError

TARGET_OPSET = 13


@dataclass
class OnnxModel:
    module: object            # torch.fx.GraphModule
    proto: object             # onnx.ModelProto (after any up-conversion)
    input_names: list[str]
    input_shapes: list[tuple]  # as declared (0 or -1 for a symbolic dim)
    output_names: list[str]
    path: str


def read_onnx_proto(path):
    import onnx
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable ONNX file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'decode error'})") from None
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    return model


def _missing_converters(model) -> list[tuple[str, str]]:
    from onnx2torch.node_converters import get_converter
    opsets = {o.domain: o.version for o in model.opset_import}
    missing = []
    for i, node in enumerate(model.graph.node):
        version = opsets.get(node.domain, opsets.get("", 1))
        try:
            get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            missing.append((node.name or f"node{i}", f"ONNX op {node.op_type} (opset {version})"))
    return missing


def load_onnx(path) -> OnnxModel:
    import onnx
    from onnx import version_converter
    model = read_onnx_proto(path)
    missing = _missing_converters(model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    if missing and opset < TARGET_OPSET:
        try:
            upgraded = version_converter.convert_version(model, TARGET_OPSET)
            if not _missing_converters(upgraded):
                model, missing = upgraded, []
        except Exception:
            pass
    if missing:
        raise UnsupportedOpsError(missing)
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    names = [i.name for i in inputs]
    shapes = [tuple(d.dim_value if d.HasField("dim_value") else 0 for d in i.type.tensor_type.shape.dim)
              for i in inputs]
    try:
        import onnx2torch
        gm = onnx2torch.convert(model)
    except Exception as e:
        raise ModelLoadError(f"{path}: onnx2torch cannot convert the model ({type(e).__name__}: {e})") from None
    return OnnxModel(gm, model, names, shapes, [o.name for o in model.graph.output], os.fspath(path))
