"""Read an ``onnx.ModelProto`` into a torch ``fx.GraphModule`` of plain torch modules and
functions (``nn.Linear``, ``nn.Conv2d``, ``torch.relu``, ``torch.reshape``...), the ones the
mapping (``verifier.graph.mapping``) already maps for traced PyTorch models. No onnx2torch.

Every value is read on two example inputs, of batch 1 and of batch 2 (``V.v1``, ``V.v2``):
a value that depends on no input is a constant and is folded at read time (initializers,
``Constant``, and shape chains such as ``Shape -> Gather -> Unsqueeze -> Concat``); the two
batch sizes tell which folded numbers are the batch size, so that a ``Reshape`` to
``[Shape(x)[0], -1]`` becomes ``torch.reshape(x, (-1, 60))`` and the module still takes any
batch. A folded value that depends on the batch and is used other than as a target shape is
reported. Weights become ``nn.Parameter`` of modules named after the ONNX nodes; constants that
functions read are buffers of the ``initializers`` submodule; ``aliases`` maps both back to
the ONNX initializer names. fx node names are the ONNX node names in fx's style
(``/fc1/Gemm`` -> ``fc1_gemm``).

Every node whose op has no reader (``verifier.graph.onnx_ops.OPS``), or whose attributes the
reader cannot express, is reported at once in one ``UnsupportedOpsError`` with its node name:
reading goes on past it (the known ops that read its outputs are skipped, not reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedOpsError
from . import onnx_shape_ops  # noqa: F401  (registers the shape and data-movement ops)
from .onnx_base import _DTYPES, V, Reader, ReadProblem, fx_name, module_name  # noqa: F401
from .onnx_ops import OPS
from .onnx_proto import TensorDecodeError, attribute_value, to_tensor


@dataclass
class ReadModel:
    module: fx.GraphModule
    aliases: dict[str, str] = field(default_factory=dict)


def _unknown(node, opsets) -> str | None:
    """Why the reader cannot read ``node``'s op (None where it can)."""
    domain = node.domain or ""
    version = opsets.get(domain, opsets.get("ai.onnx", opsets.get("", 1)))
    if domain not in ("", "ai.onnx"):
        return f"ONNX op {node.op_type} (domain {domain}, opset {version}): unknown op"
    if node.op_type not in OPS:
        return f"ONNX op {node.op_type} (opset {version}): unknown op"
    return None


def read_model(model, input_shapes: list[tuple]) -> ReadModel:
    """``model`` (an onnx.ModelProto) as an fx.GraphModule; ``input_shapes``: each input's shape
    with its batch dim (a symbolic dim given as 0 is read as 1). Raises UnsupportedOpsError
    listing every node it cannot read."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    r = Reader(opsets.get("", opsets.get("ai.onnx", 1)))
    env: dict[str, V | None] = {}
    for t in model.graph.initializer:
        try:
            env[t.name] = r.const(to_tensor(t), init=t.name)
        except TensorDecodeError as e:
            raise UnsupportedOpsError([(t.name, f"initializer: {e}")]) from None
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != len(input_shapes):
        raise UnsupportedOpsError([("input", f"{len(inputs)} inputs, {len(input_shapes)} shapes")])
    for i, shape in zip(inputs, input_shapes):
        dtype = _DTYPES.get(i.type.tensor_type.elem_type, torch.float32)
        shape = tuple(max(1, int(d)) for d in shape)
        node = r.graph.placeholder(fx_name(i.name) if i.name else "input")
        x1 = torch.zeros((1, *shape[1:]) if shape else (), dtype=dtype, device="cpu")
        x2 = torch.zeros((2, *shape[1:]), dtype=dtype, device="cpu") if shape else None
        env[i.name] = V(node, x1, x2)

    problems: list[tuple[str, str]] = []
    poisoned = object()
    for idx, node in enumerate(model.graph.node):
        r.onnx_node, r._index = node, idx
        ins = [env.get(n) if n else None for n in node.input]
        unknown = _unknown(node, opsets)
        if unknown:   # listed even after another problem: every unknown op at once
            problems.append((node.name or f"node{idx}", unknown))
        if unknown or any(v is poisoned for v in ins):
            for o in node.output:
                env[o] = poisoned
            continue
        missing_in = [n for n, v in zip(node.input, ins) if n and v is None]
        try:
            if missing_in:
                raise ReadProblem(f"reads {missing_in}, which no node computes")
            attrs = {a.name: attribute_value(a) for a in node.attribute}
            outs = OPS[node.op_type](r, node, ins, attrs)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            used = [k for k, o in enumerate(node.output) if o]
            if any(k >= len(outs) for k in used):
                raise ReadProblem(f"output {max(used)} is used; only the first {len(outs)} are read")
            for k in used:
                env[node.output[k]] = outs[k]
        except ReadProblem as e:
            problems.append((node.name or f"node{idx}", f"ONNX op {node.op_type} (opset {r.opset}): {e}"))
            for o in node.output:
                env[o] = poisoned
    if problems:
        raise UnsupportedOpsError(problems)
    outs = []
    for o in model.graph.output:
        v = env.get(o.name)
        if v is None:
            raise UnsupportedOpsError([(o.name, "a graph output that no node computes")])
        r.onnx_node = type("N", (), {"name": o.name, "output": [o.name], "op_type": "Output"})()
        outs.append(v.node if v.node is not None else r.attr(v))
    r.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = fx.GraphModule(r.root, r.graph, class_name="OnnxModule")
    gm.eval()
    return ReadModel(gm, r.aliases)
