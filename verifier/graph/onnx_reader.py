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

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnsupportedOpsError


class ReadProblem(Exception):
    """An ONNX node the reader cannot express (its message says why)."""


@dataclass(eq=False)
class V:
    """A value of the ONNX graph: ``node`` is its fx node (None for a constant); ``v1``, ``v2``
    its values on the example inputs of batch 1 and 2 (``v2`` None where unknown: the model
    does not take batch 2). For a constant that does not depend on the batch, ``v2 is v1``."""
    node: object
    v1: object
    v2: object = None
    init: str | None = None       # the ONNX initializer it is, if any

    @property
    def const(self) -> bool:
        return self.node is None

    @property
    def batch_dependent(self) -> bool:
        return (self.node is None and self.v2 is not None and self.v2 is not self.v1
                and not _same(self.v1, self.v2))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
    return a is b


_CAMEL = re.compile(r"(?<=[a-z])([A-Z])")
_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")


def fx_name(onnx_name: str) -> str:
    """The fx node name of an ONNX node, in fx's style: ``/blocks.0/Add_1`` -> ``blocks_0_add_1``."""
    s = _ILLEGAL.sub("_", _CAMEL.sub(r"_\1", onnx_name.lstrip("/")).lower()).strip("_") or "node"
    return f"_{s}" if s[0].isdigit() else s


def module_name(onnx_name: str) -> str:
    """A submodule name for an ONNX node: its name without the leading ``/``, dots as ``_``."""
    return onnx_name.lstrip("/").replace(".", "_") or "node"


def _subst(a, which: int):
    if isinstance(a, V):
        return a.v1 if which == 1 else a.v2
    if isinstance(a, (list, tuple)):
        return type(a)(_subst(x, which) for x in a)
    if isinstance(a, dict):
        return {k: _subst(v, which) for k, v in a.items()}
    return a


def _values(a) -> list[V]:
    if isinstance(a, V):
        return [a]
    if isinstance(a, (list, tuple)):
        return [v for x in a for v in _values(x)]
    if isinstance(a, dict):
        return [v for x in a.values() for v in _values(x)]
    return []


def _call(kind, target, args, kwargs):
    if kind == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, target)(*rest, **kwargs)
    return target(*args, **kwargs)


class Reader:
    """State of one ONNX -> fx conversion, handed to the op readers (``onnx_ops``)."""

    def __init__(self, opset: int):
        self.opset = opset
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.root.add_module("initializers", nn.Module())
        self.aliases: dict[str, str] = {}       # parameter / buffer path -> ONNX initializer
        self._attr_nodes: dict[int, tuple[V, fx.Node]] = {}   # id(V) -> (V kept alive, node)
        self.onnx_node = None                    # the ONNX node being read
        self._index = 0

    # -- naming ----------------------------------------------------------------------------
    def _node_name(self, tag: str | None) -> str:
        """The ONNX node's name in fx's style (its op type where it has none; fx adds ``_1``,
        ``_2``... to names taken), plus ``_tag`` for an inner node."""
        base = fx_name(self.onnx_node.name or self.onnx_node.op_type)
        return base if tag is None else f"{base}_{tag}"

    def _unique(self, name: str, taken) -> str:
        out, k = name, 1
        while out in taken:
            out, k = f"{name}_{k}", k + 1
        return out

    # -- constants -------------------------------------------------------------------------
    def const(self, t, init: str | None = None) -> V:
        t = torch.as_tensor(t)
        return V(None, t, t, init)

    def attr(self, v: V) -> fx.Node:
        """The fx get_attr node of constant ``v`` (a buffer of ``initializers``)."""
        if v.batch_dependent:
            raise ReadProblem("a value computed from the input's shape that depends on the batch "
                              "size is used as a tensor (only as a target shape is it supported)")
        key = id(v)
        if key not in self._attr_nodes:
            holder = self.root.initializers
            base = _ILLEGAL.sub("_", v.init or f"{self.onnx_node.output[0] or 'const'}").strip("_") or "c"
            if base[0].isdigit():
                base = f"_{base}"
            name = self._unique(base, set(holder._buffers) | set(holder._modules))
            holder.register_buffer(name, v.v1)
            if v.init:
                self.aliases[f"initializers.{name}"] = v.init
            # the V is kept with its node: a freed V's id could be another V's
            self._attr_nodes[key] = (v, self.graph.get_attr(f"initializers.{name}"))
        return self._attr_nodes[key][1]

    # -- emitting --------------------------------------------------------------------------
    def call(self, target, *args, tag: str | None = None, kind: str = "call_function",
             **kwargs) -> V:
        """``target(*args, **kwargs)`` (a method name with ``kind="call_method"``): folded when
        no argument depends on the input, else one fx node (named after the ONNX node, plus
        ``_tag`` for the inner nodes of an op written as several)."""
        vals = _values((args, kwargs))
        if all(v.const for v in vals):
            r1 = _call(kind, target, _subst(args, 1), _subst(kwargs, 1))
            if all(v.v2 is v.v1 for v in vals):
                return V(None, r1, r1)
            r2 = None
            if all(v.v2 is not None for v in vals):
                try:
                    r2 = _call(kind, target, _subst(args, 2), _subst(kwargs, 2))
                except Exception:
                    r2 = None
            return V(None, r1, r2)
        return self._emit(kind, target, args, kwargs, tag)

    def module(self, mod: nn.Module, *args, tag: str | None = None, aliases: dict | None = None) -> V:
        """A call of ``mod`` (registered under the ONNX node's name); ``aliases``: its
        parameter name -> the ONNX initializer it holds."""
        base = module_name(self.onnx_node.name or f"{self.onnx_node.op_type}_{self._index}")
        if tag is not None:
            base = f"{base}_{tag}"
        name = self._unique(base, set(self.root._modules))
        self.root.add_module(name, mod)
        for p, init in (aliases or {}).items():
            self.aliases[f"{name}.{p}"] = init
        return self._emit("call_module", name, args, {}, tag, fn=mod)

    def _emit(self, kind, target, args, kwargs, tag, fn=None) -> V:
        def node_args(a):
            if isinstance(a, V):
                return a.node if a.node is not None else self.attr(a)
            if isinstance(a, (list, tuple)):
                return type(a)(node_args(x) for x in a)
            if isinstance(a, dict):
                return {k: node_args(v) for k, v in a.items()}
            return a
        fa, fk = node_args(args), node_args(kwargs)
        call = (lambda a, k: fn(*a, **k)) if fn is not None else \
            (lambda a, k: _call(kind, target, a, k))
        try:
            with torch.no_grad():
                r1 = call(_subst(args, 1), _subst(kwargs, 1))
        except Exception as e:
            raise ReadProblem(f"fails on the example input ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        r2 = None
        if all(v.v2 is not None for v in _values((args, kwargs))):
            try:
                with torch.no_grad():
                    r2 = call(_subst(args, 2), _subst(kwargs, 2))
            except Exception:
                r2 = None
        # fx adds a suffix to names taken and to the names of Python builtins
        node = self.graph.create_node(kind, target, fa, fk, name=self._node_name(tag))
        return V(node, r1, r2)


@dataclass
class ReadModel:
    module: fx.GraphModule
    aliases: dict[str, str] = field(default_factory=dict)


def _unknown(node, opsets) -> str | None:
    """Why the reader cannot read ``node``'s op (None where it can)."""
    from .onnx_ops import OPS
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
    from .onnx_ops import OPS
    from .onnx_proto import TensorDecodeError, to_tensor
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
        x1 = torch.zeros((1, *shape[1:]) if shape else (), dtype=dtype)
        x2 = torch.zeros((2, *shape[1:]), dtype=dtype) if shape else None
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
            attrs = {a.name: _attr_value(a) for a in node.attribute}
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


def _attr_value(a):
    from .onnx_proto import attribute_value
    return attribute_value(a)


def _onnx_dtypes() -> dict:
    return {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
            7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
            12: torch.uint32 if hasattr(torch, "uint32") else torch.int64,
            13: torch.uint64 if hasattr(torch, "uint64") else torch.int64, 16: torch.bfloat16}


_DTYPES = _onnx_dtypes()
