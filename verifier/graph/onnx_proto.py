"""ONNX protobuf messages without ``import onnx``.

``import onnx`` costs about a second of start-up (it imports ml_dtypes, whose extension module
alone takes most of it) though reading a model needs only the generated protobuf module
``onnx/onnx_ml_pb2.py``. ``model_class`` loads that one file by path (under another module
name; with the upb protobuf runtime the message classes are the very ones ``onnx`` gets, so a
model read here is an ``onnx.ModelProto``) and falls back to ``import onnx`` wherever that does
not hold. ``to_tensor`` and ``attribute_value`` decode what ``onnx.numpy_helper`` and
``onnx.helper.get_attribute_value`` would, for the tensors of a network.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import torch

_MODULE = "verifier_onnx_ml_pb2"


def _pb2():
    if "onnx" in sys.modules:
        return sys.modules["onnx"]
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    try:
        from google.protobuf.internal import api_implementation
        if api_implementation.Type() != "upb":   # other runtimes: separate classes
            raise ImportError
        spec = importlib.util.find_spec("onnx")
        if spec is None or spec.origin is None:
            raise ImportError
        path = os.path.join(os.path.dirname(spec.origin), "onnx_ml_pb2.py")
        pb_spec = importlib.util.spec_from_file_location(_MODULE, path)
        mod = importlib.util.module_from_spec(pb_spec)
        pb_spec.loader.exec_module(mod)
        sys.modules[_MODULE] = mod
        return mod
    except Exception:
        import onnx
        return onnx


def model_class():
    """``onnx.ModelProto`` (the class), without importing onnx where that is possible."""
    return _pb2().ModelProto


# TensorProto.DataType -> (numpy dtype, the typed field holding the values when not raw_data)
_TYPES = {
    1: (np.float32, "float_data"), 2: (np.uint8, "int32_data"), 3: (np.int8, "int32_data"),
    4: (np.uint16, "int32_data"), 5: (np.int16, "int32_data"), 6: (np.int32, "int32_data"),
    7: (np.int64, "int64_data"), 9: (np.bool_, "int32_data"), 10: (np.float16, "int32_data"),
    11: (np.float64, "double_data"), 12: (np.uint32, "uint64_data"), 13: (np.uint64, "uint64_data"),
}
_BFLOAT16 = 16


class TensorDecodeError(ValueError):
    pass


def to_array(t) -> np.ndarray:
    """A TensorProto's values as a numpy array (bfloat16 as float32)."""
    dims = tuple(int(d) for d in t.dims)
    if t.data_location == 1:   # EXTERNAL
        raise TensorDecodeError(f"tensor {t.name!r} keeps its data in an external file")
    if t.data_type == _BFLOAT16:
        bits = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else \
            np.asarray(t.int32_data, dtype=np.uint32).astype(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(dims)
    if t.data_type not in _TYPES:
        raise TensorDecodeError(f"tensor {t.name!r} of ONNX data type {t.data_type}")
    dtype, field = _TYPES[t.data_type]
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(dims)
    values = getattr(t, field)
    if t.data_type == 10:   # float16 values are stored as their bits in int32_data
        return np.asarray(values, dtype=np.uint16).view(np.float16).reshape(dims)
    return np.asarray(values, dtype=dtype).reshape(dims)


def to_tensor(t) -> torch.Tensor:
    a = to_array(t)
    if a.dtype in (np.uint16, np.uint32, np.uint64):   # torch lacks most unsigned types
        a = a.astype(np.int64)
    return torch.from_numpy(np.array(a, copy=True))


def attribute_value(a):
    """An AttributeProto's value as Python values (tensors as torch tensors)."""
    kind = a.type
    if kind == 1:
        return a.f
    if kind == 2:
        return a.i
    if kind == 3:
        return a.s.decode()
    if kind == 4:
        return to_tensor(a.t)
    if kind == 6:
        return list(a.floats)
    if kind == 7:
        return list(a.ints)
    if kind == 8:
        return [s.decode() for s in a.strings]
    return a        # graphs, sparse tensors, types: read by no op of the reader
