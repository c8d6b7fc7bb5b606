"""Read an ONNX file (plain or .gz) into a torch fx.GraphModule.

The reader (``verifier.graph.onnx_reader``) writes the graph with plain torch modules and
functions; it needs neither onnx2torch nor torchvision. Only where it lacks an op and onnx2torch
is installed is the model converted through onnx2torch instead (imported then, never at
start-up): old opsets that onnx2torch refuses (e.g. Flatten-1, Dropout-7) are up-converted with
``onnx.version_converter`` first. Every operator that neither knows is reported at once.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

from ..deps import require
from ..errors import ModelLoadError, UnsupportedOpsError
from ..files import sniff_format
from .onnx_proto import model_class
from .onnx_reader import read_model

TARGET_OPSET = 13


@dataclass
class OnnxModel:
    module: object            # torch.fx.GraphModule
    proto: object             # onnx.ModelProto as read (for replay with onnxruntime)
    input_names: list[str]
    input_shapes: list[tuple]  # as declared (0 or -1 for a symbolic dim)
    output_names: list[str]
    path: str
    converted: object = None  # the onnx.ModelProto converted (after a batch dim or up-conversion)
    aliases: dict | None = None   # from the reader: parameter / buffer name -> ONNX initializer
    converter: str = "reader"     # "reader" or "onnx2torch" (the fallback)

    def parameter_names(self) -> dict[str, str]:
        """Map the converted module's parameter and buffer names (``fc1/Gemm.weight``,
        ``initializers.Operation_1_MatMul_W``) to the ONNX initializer names (``fc1.weight``)."""
        if self.aliases is not None:
            return dict(self.aliases)
        return onnx_parameter_names(self.module, self.converted or self.proto)


def read_onnx_proto(path):
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
        model = model_class().FromString(data)
    except Exception as e:
        kind = sniff_format(path)
        if kind == "torch":
            raise ModelLoadError(f"{path} is a PyTorch checkpoint, not an ONNX file: load it with "
                                 "its architecture (verifier.model_io.load_model(path, arch=...); "
                                 "on the command line, add --arch NAME)") from None
        if kind == "vnnlib":
            raise ModelLoadError(f"{path} is a VNN-LIB property, not an ONNX model (MODEL and "
                                 "SPEC swapped? the model comes first)") from None
        raise ModelLoadError(f"{path}: not a readable ONNX file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'decode error'})") from None
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    return model


def _missing_converters(model) -> list[tuple[str, str]]:
    get_converter = require("onnx2torch.node_converters",
                            "converting ONNX ops the reader lacks").get_converter
    opsets = {o.domain: o.version for o in model.opset_import}
    missing = []
    for i, node in enumerate(model.graph.node):
        version = opsets.get(node.domain, opsets.get("", 1))
        try:
            get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            missing.append((node.name or f"node{i}", f"ONNX op {node.op_type} (opset {version})"))
    return missing


def load_onnx(path, converter: str = "auto") -> OnnxModel:
    """``converter``: "auto" (the reader, onnx2torch where the reader lacks an op and onnx2torch
    is installed), "reader" or "onnx2torch"."""
    model = original = read_onnx_proto(path)
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    names = [i.name for i in inputs]
    shapes = [tuple(d.dim_value if d.HasField("dim_value") else 0 for d in i.type.tensor_type.shape.dim)
              for i in inputs]
    if len(inputs) == 1 and len(shapes[0]) == 1:
        # a batchless input [n]: convert a copy whose input is [1, n] (numpy-style broadcasting
        # gives the same values for the MatMul/Add/Relu chains such files hold); the result is
        # checked against onnxruntime on the original file below
        model = _with_batch_dim(model, inputs[0].name)
        shapes = [(1,) + shapes[0]]
    aliases, used = None, "reader"
    if converter == "onnx2torch":
        gm, model = _onnx2torch(model, path)
        used = "onnx2torch"
    else:
        try:
            read = read_model(model, shapes)
            gm, aliases = read.module, read.aliases
        except UnsupportedOpsError as e:
            if converter == "reader" or not _onnx2torch_installed():
                raise
            try:
                gm, model = _onnx2torch(model, path)
                used = "onnx2torch"
            except Exception:      # also an onnx2torch that fails to import (a torchvision
                raise e from None  # built for another torch): the reader's list stands
    if len(shapes[0]) >= 1 and model is not original and len(original.graph.input) and \
            len(shapes[0]) != len(_declared_shape(original, names[0])):
        _check_batchless(gm, original, names[0], shapes[0], path)
    return OnnxModel(gm, original, names, shapes, [o.name for o in model.graph.output], os.fspath(path),
                     model, aliases, used)


def _onnx2torch_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("onnx2torch") is not None


def _onnx2torch(model, path):
    """The fallback: ``model`` through onnx2torch (up-converted to opset 13 where that gives it a
    converter for every op) -> (fx.GraphModule, the ModelProto converted)."""
    from onnx import version_converter
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
    model = _nonnegative_reduce_axes(model)
    try:
        gm = require("onnx2torch", "converting ONNX ops the reader lacks").convert(model)
    except Exception as e:
        raise ModelLoadError(f"{path}: onnx2torch cannot convert the model ({type(e).__name__}: {e})") from None
    return gm, model


def onnx_parameter_names(gm, model) -> dict[str, str]:
    """For every tensor the converted module stores, the ONNX initializer it came from: among
    the initializers that the ONNX node which uses it reads, the one with the same values (as
    is or transposed). Tensors without such an initializer are left out."""
    import numpy as np
    import torch
    from onnx import numpy_helper
    OnnxGraph = require("onnx2torch.onnx_graph", "converting ONNX ops the reader lacks").OnnxGraph
    nodes = OnnxGraph(model.graph).nodes          # keys: the module names onnx2torch gives
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def match(tensor, onnx_node_name):
        node = nodes.get(onnx_node_name)
        if node is None:
            return None
        v = tensor.detach().cpu().numpy()
        for name in node.input_values:
            if name not in inits:
                continue
            if name not in arrays:
                arrays[name] = numpy_helper.to_array(inits[name])
            a = arrays[name]
            if a.shape == v.shape and np.array_equal(a, v):
                return name
            if a.ndim == 2 and a.T.shape == v.shape and np.array_equal(a.T, v):
                return name
        return None

    out: dict[str, str] = {}
    for mod_name, mod in gm.named_modules():
        if mod_name in nodes:
            for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                found = match(t, mod_name)
                if found:
                    out[f"{mod_name}.{pname}"] = found
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        t = gm.get_submodule(n.target.rpartition(".")[0]).get_buffer(n.target.rpartition(".")[2]) \
            if "." in n.target else getattr(gm, n.target)
        if not isinstance(t, torch.Tensor):
            continue
        for user in n.users:
            if user.op == "call_module" and (found := match(t, user.target)):
                out[n.target] = found
                break
    return out


def _nonnegative_reduce_axes(model):
    """``model`` with the negative axes of ReduceMax / ReduceMin written as non-negative where the
    input's rank is known. onnx2torch reduces those one axis at a time over the sorted axes,
    shifting each by the axes already removed: right only for non-negative axes (axes [-2, -1]
    with keepdims=0 would reduce the wrong dim). Where the rank is unknown the node stays as it
    is, and the mapping reports it (it checks the module against the attributes' meaning)."""
    def negative(node):
        return node.op_type in ("ReduceMax", "ReduceMin") and any(
            a.name == "axes" and any(v < 0 for v in a.ints) for a in node.attribute)

    if not any(negative(n) for n in model.graph.node):
        return model
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return model
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
             if v.type.tensor_type.HasField("shape")}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        rank = ranks.get(node.input[0]) if negative(node) else None
        if not rank:
            continue
        for a in node.attribute:
            if a.name == "axes":
                fixed = [v + rank if v < 0 else v for v in a.ints]
                del a.ints[:]
                a.ints.extend(fixed)
    return m


def _declared_shape(model, name):
    for i in model.graph.input:
        if i.name == name:
            return [d.dim_value for d in i.type.tensor_type.shape.dim]
    return []


def _with_batch_dim(model, name):
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name == name:
            dims = i.type.tensor_type.shape.dim
            first = onnx.TensorShapeProto.Dimension()
            first.dim_value = 1
            dims.insert(0, first)
    # constant @ vector (nnet2onnx style, W [k, n] @ x [n]) becomes x [1, n] @ W^T [n, k]
    from onnx import numpy_helper
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "MatMul" and node.input[0] in inits and node.input[1] not in inits:
            W = numpy_helper.to_array(inits[node.input[0]])
            if W.ndim != 2:
                continue
            t = numpy_helper.from_array(W.T.copy(), name=node.input[0] + "__T")
            m.graph.initializer.append(t)
            b = node.input[1]
            node.input[0], node.input[1] = b, t.name
    del m.graph.value_info[:]
    for o in m.graph.output:  # let the converter infer output shapes
        o.type.tensor_type.ClearField("shape")
    return m


def _check_batchless(gm, original, name, shape, path):
    """The batch-dim copy must compute what onnxruntime computes on the original file."""
    import numpy as np
    import torch
    try:
        import onnxruntime as ort
    except ImportError:  # nothing to compare with: refuse rather than guess
        raise ModelLoadError(f"{path}: input {name} has no batch dimension and onnxruntime is "
                             "not installed to check the conversion") from None
    sess = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal(shape[1:]).astype(np.float32)
        want = np.asarray(sess.run(None, {name: x})[0]).reshape(-1)
        with torch.no_grad():
            got = gm(torch.from_numpy(x).reshape(shape)).numpy().reshape(-1)
        if want.shape != got.shape or not np.allclose(want, got, rtol=1e-5, atol=1e-6):
            raise ModelLoadError(f"{path}: input {name} has no batch dimension and adding one "
                                 "changes what the model computes; not supported")
