"""Build a ``Graph`` from a PyTorch module through torch.fx.

The module runs once on an example input (batch 1) under an fx Interpreter that records every
value. A value is *perturbed* when it is a floating tensor that depends on an input; everything
else (weights, shapes, constant subgraphs such as ONNX Shape/Gather/Concat chains) is folded into
constants. Each perturbed fx node is then mapped to a bound rule by the tables in
``verifier.graph.mapping``; every node without a mapping is collected, and one
``UnsupportedOpsError`` lists them all before any bounding starts.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import ModelLoadError, ShapeError, UnsupportedOpsError
from .mapping import map_node, map_values, reads_values, values_only
from .nodes import Graph, Node, Ref

class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, object] = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n.name] = v
        return v


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        fn = getattr(mod, "function", None) or getattr(mod, "math_op_function", None)
        extra = f" ({getattr(fn, '__name__', fn)})" if fn is not None else ""
        return f"module {type(mod).__name__}{extra}"
    if n.op == "call_function":
        return f"function {getattr(n.target, '__name__', n.target)}"
    return f"method .{n.target}()"


class Builder:
    """State of one fx -> Graph conversion, handed to the mapping functions."""

    def __init__(self, gm: fx.GraphModule, values: dict, perturbed: set[str]):
        self.gm = gm
        self.values = values
        self.perturbed = perturbed
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.problems: list[tuple[str, str]] = []
        self.by_name: dict[str, Node] = {}

    # -- helpers for mapping functions -------------------------------------------------------
    def resolve(self, a):
        """fx args -> Ref for perturbed values, the recorded constant otherwise (recursively)."""
        if isinstance(a, fx.Node):
            if a.name in self.perturbed:
                name = self.alias.get(a.name, a.name)
                return Ref(name, tuple(self.values[a.name].shape[1:]))
            return self.values[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.resolve(x) for x in a)
        if isinstance(a, dict):
            return {k: self.resolve(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.resolve(a.start), self.resolve(a.stop), self.resolve(a.step))
        return a

    def out_shape(self, n: fx.Node) -> tuple:
        return tuple(self.values[n.name].shape[1:])

    def add(self, n: fx.Node, op: str, inputs: list[Ref], **params) -> Node:
        names = [r.name for r in inputs]  # duplicates kept: x + x has two inputs
        node = Node(name=n.name, op=op, inputs=names, shape=self.out_shape(n), params=params,
                    source=_describe(self.gm, n))
        self.nodes.append(node)
        self.by_name[node.name] = node
        return node

    def add_inner(self, n: fx.Node, suffix: str, op: str, inputs: list[Ref], shape: tuple,
                  **params) -> Ref:
        """An inner node of a source op that the mapping writes as several rules (e.g. LayerNorm:
        a mean, a variance, ...), named ``<fx node>/<suffix>``, of per-sample ``shape``; -> its
        Ref (the last node of the chain is added with ``add``, under the fx node's own name)."""
        node = Node(name=f"{n.name}/{suffix}", op=op, inputs=[r.name for r in inputs],
                    shape=tuple(shape), params=params, source=_describe(self.gm, n))
        self.nodes.append(node)
        self.by_name[node.name] = node
        return Ref(node.name, node.shape)

    def make_alias(self, n: fx.Node, ref: Ref) -> None:
        self.alias[n.name] = ref.name

    def problem(self, n: fx.Node, what: str) -> None:
        v = self.values.get(n.name)
        shape = list(v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim else "?"
        self.problems.append((n.name, f"{_describe(self.gm, n)}: {what} (output shape per sample {shape})"))

    def rerun(self, n: fx.Node, substitute: dict[str, torch.Tensor]):
        """Run the fx node's op again with some perturbed args replaced by given tensors."""
        def sub(a):
            if isinstance(a, fx.Node):
                if a.name in substitute:
                    return substitute[a.name]
                return self.values[a.name]
            if isinstance(a, (list, tuple)):
                return type(a)(sub(x) for x in a)
            if isinstance(a, dict):
                return {k: sub(v) for k, v in a.items()}
            if isinstance(a, slice):  # x[..., a:b] with traced sizes as bounds
                return slice(sub(a.start), sub(a.stop), sub(a.step))
            return a
        args, kwargs = sub(n.args), sub(n.kwargs)
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        self_obj, *rest = args
        return getattr(self_obj, n.target)(*rest, **kwargs)


def _is_float_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _holds_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_holds_tensor(x) for x in v)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _varies_with_input(b: "Builder", n: fx.Node, deps: list, value) -> bool:
    """Whether a non-float result of perturbed (float) arguments depends on their values, not
    only on their shapes (as an ONNX Shape op does): rerun on random values of the same shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for scale in (3.0, -7.0):
        sub = {a.name: torch.randn(b.values[a.name].shape, generator=g,
                                   dtype=b.values[a.name].dtype, device="cpu") * scale for a in deps}
        try:
            with torch.no_grad():
                if not _same(b.rerun(n, sub), value):
                    return True
        except Exception:
            return True
    return False


def build_graph(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                input_names: list[str] | None = None) -> Graph:
    """Trace ``module`` (or take it as is when it is already an fx.GraphModule) and normalize it.

    ``example_inputs`` carry a batch dimension of 1.
    """
    module = module.eval()
    if isinstance(module, fx.GraphModule):
        gm = module
    else:
        try:
            try:
                gm = fx.symbolic_trace(module)
            except Exception:
                if not fx.Tracer().is_leaf_module(module, ""):
                    raise
                # a bare torch.nn layer whose forward branches on its arguments (e.g.
                # ConvTranspose2d): trace it as one call, the way it is traced inside a model
                gm = fx.symbolic_trace(torch.nn.Sequential(module))
        except Exception as e:  # fx cannot trace data-dependent control flow
            raise ModelLoadError(
                f"cannot trace {type(module).__name__} with torch.fx: {type(e).__name__}: {e}") from None
    rec = _Recorder(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise ShapeError(f"the model takes {len(placeholders)} input(s), got {len(example_inputs)}")
    try:
        with torch.no_grad():
            rec.run(*example_inputs)
    except Exception as e:
        shapes = [tuple(x.shape) for x in example_inputs]
        raise ShapeError(f"the model fails on an input of shape {shapes}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    values = rec.values

    perturbed: set[str] = set()
    # tensors (or tuples of tensors) that vary with the input but are not one float tensor:
    # comparisons, argmax, sort, chunk... Folding them into constants would be unsound.
    nonfloat: set[str] = set()
    probe = Builder(gm, values, perturbed)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            perturbed.add(n.name)
        elif n.op in ("call_module", "call_function", "call_method"):
            deps = [a for a in n.all_input_nodes if a.name in perturbed]
            if not deps:
                continue
            v = values[n.name]
            if _is_float_tensor(v):
                perturbed.add(n.name)
            elif _holds_tensor(v) and (any(a.name in nonfloat for a in deps)
                                       or _varies_with_input(probe, n, deps, v)):
                perturbed.add(n.name)
                nonfloat.add(n.name)

    b = Builder(gm, values, perturbed)
    values_read: set[str] = set()   # (values, indices) results whose uses read the values only
    leaves = []
    output_ref = None
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "placeholder":
            v = values[n.name]
            if not _is_float_tensor(v) or v.ndim == 0 or v.shape[0] != 1:
                raise ShapeError(f"input {n.name}: expected a floating tensor with batch dim 1, "
                                 f"got {getattr(v, 'shape', type(v))}")
            name = input_names[len(leaves)] if input_names else n.name
            node = Node(name=n.name, op="input", inputs=[], shape=tuple(v.shape[1:]),
                        params={"display_name": name}, source="input")
            b.nodes.append(node)
            b.by_name[n.name] = node
            leaves.append(n.name)
        elif n.op == "output":
            out = n.args[0]
            if isinstance(out, (list, tuple)):
                if len(out) != 1:
                    raise UnsupportedOpsError([(n.name, f"the model returns {len(out)} outputs; "
                                                        "bound one output at a time")])
                out = out[0]
            if not isinstance(out, fx.Node) or out.name not in perturbed:
                raise UnsupportedOpsError([(n.name, "the model's output does not depend on its input")])
            output_ref = b.alias.get(out.name, out.name)
        elif n.name in perturbed:
            v = values[n.name]
            src = next((a for a in n.all_input_nodes if a.name in values_read), None)
            if src is not None:
                # a use of torch.max(x, dim)'s (values, indices): reading the values is the
                # reduction; the other uses are dead reads of the indices (see values_only)
                if reads_values(n):
                    try:
                        map_values(b, n, src)
                    except Exception as e:  # as map_node below
                        b.problem(n, f"cannot be converted ({type(e).__name__}: {e})")
                continue
            if any(a.name in nonfloat for a in n.all_input_nodes):
                nonfloat.add(n.name)  # downstream of a reported node: reported there
                continue
            if n.name in nonfloat and values_only(n):
                values_read.add(n.name)   # mapped at its uses
                continue
            if n.name in nonfloat:
                what = (f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else "several tensors")
                b.problem(n, f"returns {what} computed from the perturbed input (e.g. a "
                             "comparison, argmax, sort, chunk): no bound rule")
                continue
            if v.ndim == 0 or v.shape[0] != 1:
                b.problem(n, "the op removes or changes the batch dimension")
                continue
            try:
                map_node(b, n)
            except Exception as e:  # a mapping that cannot read the node's attributes
                b.problem(n, f"cannot be converted ({type(e).__name__}: {e})")
    if b.problems:
        raise UnsupportedOpsError(b.problems)
    used = {output_ref}
    for node in reversed(b.nodes):
        if node.name in used:
            used.update(node.inputs)
    nodes = [nd for nd in b.nodes if nd.name in used or nd.op == "input"]
    return Graph(nodes, output=output_ref, leaves=leaves)
