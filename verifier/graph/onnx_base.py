"""The ONNX reader's building blocks: the value a node reads and writes (``V``: its fx node and
its values on example inputs of batch 1 and 2), the ``Reader`` that builds the fx graph and
its modules, and ``ReadProblem`` (a node the reader cannot express). The readers of the ops
(``onnx_ops``, ``onnx_shape_ops``) and the model reader (``onnx_reader``) build on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..devices import as_tensor


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
        t = as_tensor(t)
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


def _onnx_dtypes() -> dict:
    return {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
            7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
            12: torch.uint32 if hasattr(torch, "uint32") else torch.int64,
            13: torch.uint64 if hasattr(torch, "uint64") else torch.int64, 16: torch.bfloat16}


_DTYPES = _onnx_dtypes()
