"""Part of the graph mapping: forms that exporters write for one operator, turned back into that
operator's node, so that its own (tighter) rule bounds it.

``fuse_gelu``: the exact GELU as ``torch.onnx.export`` writes it (opset < 20) or as it is often
written by hand, ``x * (1 + erf(x / sqrt(2)))`` times constants, is a ``mul`` of ``p·x`` and
``1 + erf(s·x)`` with ``s = 1/sqrt(2)``; bounding the product by McCormick planes over the two
factors' boxes loses their dependence (on the reference ``gelu_mlp``, CROWN's mean margin bound
is -32.9 that way). It becomes ``(2 p)·gelu(x)``: a ``gelu`` node and a scaling ``affine`` node
that keeps the product's name. ``s`` must be 1/sqrt(2) within 1e-6 (relative): the model then
computes GELU up to that rounding of the constant, which the smooth rule's slack covers.

GELU's tanh form as ``torch.onnx.export`` writes it (opset 17), ``x * (1 + tanh(c (x + k x^3)))``
times constants (``c = sqrt(2 / pi)``, ``k = 0.044715``, the cube as ``x * (x * x)`` or
``pow(x, 3)``), becomes ``(2 p)·gelu(x)`` with ``approximate="tanh"`` in the same way.

``fuse_square``: ``x * x`` (``Mul`` of one tensor with itself) becomes ``pow(x, 2)``.

``fuse_silu``: SiLU as exporters write it, ``x * sigmoid(x)`` (ONNX ``Sigmoid`` then ``Mul``),
becomes one ``silu`` node, for the same reason.

``fuse_layernorm``: LayerNorm as exporters write it before opset 17, ``c = x - mean(x)``,
``(c ^ 2)``'s mean plus ``eps``, ``sqrt``, then ``c / sqrt(...)`` (a ``mul`` by a ``reciprocal``),
becomes the chain that ``nn.LayerNorm`` maps to (``verifier.graph.composite``): the mean of
squares becomes one ``variance`` node of ``x``, ``1 / sqrt`` one ``rsqrt``, and the product a
``normalize`` node (the product that knows ``r``'s definition). Same value; the interval
bounds no longer blow up (IBP on a two-LayerNorm MLP: mean width 1860 -> 16).

``fuse`` applies them all (squares first).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..devices import as_tensor
from .nodes import Graph, Node

_INV_SQRT2 = 1 / math.sqrt(2.0)
_TANH_C, _TANH_K = math.sqrt(2 / math.pi), 0.044715


def _scalar(t) -> float | None:
    """A constant that is one number (any shape of equal entries), else None."""
    if t is None:
        return None
    t = as_tensor(t)
    flat = t.reshape(-1)
    if flat.numel() == 0 or not bool((flat == flat[0]).all()):
        return None
    return float(flat[0])


def _scale_of(node: Node) -> float | None:
    """``w`` of an ``affine`` node ``y = w x`` (a number, no shift, no broadcast), else None."""
    p = node.params
    if node.op != "affine" or p.get("b") is not None or tuple(p["in_shape"]) != tuple(node.shape):
        return None
    return 1.0 if p.get("w") is None else _scalar(p["w"])


def _one_plus_erf_of(graph: Graph, node: Node):
    """-> the node x where ``node = 1 + erf(s x)`` with s = 1/sqrt(2), else None."""
    p = node.params
    if node.op != "affine" or p.get("w") is not None or _scalar(p.get("b")) != 1.0:
        return None
    erf = graph[node.inputs[0]]
    if erf.op != "erf" or len(graph.consumers(erf.name)) != 1:
        return None
    div = graph[erf.inputs[0]]
    s = _scale_of(div)
    if s is None or abs(s / _INV_SQRT2 - 1) > 1e-6 or len(graph.consumers(div.name)) != 1:
        return None
    return div.inputs[0], (div.name, erf.name, node.name)


def _only_consumer(graph: Graph, name: str) -> bool:
    return len(graph.consumers(name)) == 1


def _cube_of(graph: Graph, node: Node):
    """-> (x, chain) where ``node = x^3``: ``pow(x, 3)``, or ``x * x^2`` (either order) with
    ``x^2`` a ``pow(x, 2)`` (``fuse_square`` turns ``x * x`` into one), else None."""
    if node.op == "pow" and node.params.get("exponent") == 3.0:
        return node.inputs[0], ()
    if node.op != "mul" or len(node.inputs) != 2:
        return None
    for a, b in (node.inputs, node.inputs[::-1]):
        sq = graph[b]
        if sq.op == "pow" and sq.params.get("exponent") == 2.0 and sq.inputs == [a] \
                and _only_consumer(graph, b):
            return a, (b,)
    return None


def _one_plus_tanh_of(graph: Graph, node: Node):
    """-> (x, chain) where ``node = 1 + tanh(c (x + k x^3))`` (GELU's tanh form as exporters
    write it: c = sqrt(2 / pi), k = 0.044715, each within 1e-6, relative), else None."""
    p = node.params
    if node.op != "affine" or p.get("w") is not None or _scalar(p.get("b")) != 1.0:
        return None
    th = graph[node.inputs[0]]
    if th.op != "tanh" or not _only_consumer(graph, th.name):
        return None
    scaled = graph[th.inputs[0]]
    c = _scale_of(scaled)
    if c is None or abs(c / _TANH_C - 1) > 1e-6 or not _only_consumer(graph, scaled.name):
        return None
    add = graph[scaled.inputs[0]]
    if add.op != "add" or tuple(add.params["signs"]) != (1, 1) or not _only_consumer(graph, add.name):
        return None
    for x, kc in (add.inputs, add.inputs[::-1]):
        kn = graph[kc]
        k = _scale_of(kn)
        if k is None or abs(k / _TANH_K - 1) > 1e-6 or not _only_consumer(graph, kc):
            continue
        cube = graph[kn.inputs[0]]
        got = _cube_of(graph, cube)
        if got is None or got[0] != x or not _only_consumer(graph, cube.name):
            continue
        return x, (cube.name, *got[1], kc, add.name, scaled.name, th.name)
    return None


def fuse_square(graph: Graph) -> Graph:
    """``graph`` with every ``x * x`` (one perturbed tensor times itself) as ``pow(x, 2)``: the
    same value (one rounding), bounded as a convex function of one input rather than by
    McCormick planes over two independent copies."""
    if not any(n.op == "mul" and len(n.inputs) == 2 and n.inputs[0] == n.inputs[1] for n in graph):
        return graph
    nodes = [replace(n, op="pow", inputs=[n.inputs[0]], params={"exponent": 2.0},
                     source=f"{n.source} (x * x)")
             if n.op == "mul" and len(n.inputs) == 2 and n.inputs[0] == n.inputs[1]
             and tuple(graph[n.inputs[0]].shape) == tuple(n.shape) else n
             for n in graph]
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def fuse_gelu(graph: Graph) -> Graph:
    """``graph`` with every exported GELU (exact or tanh form) as a ``gelu`` node (see the
    module doc); ``graph`` itself when there is none."""
    plan = {}       # mul node -> (x, 2 p, approximate)
    dead = set()
    for node in graph:
        if node.op != "mul" or len(node.inputs) != 2:
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            form = "none"
            got = _one_plus_erf_of(graph, graph[b])
            if got is None:
                form = "tanh"
                got = _one_plus_tanh_of(graph, graph[b])
            if got is None or len(graph.consumers(b)) != 1:
                continue
            x, chain = got
            chain = chain + (b,) if form == "tanh" else chain
            pnode = graph[a]
            if a == x:
                p = 1.0
            elif pnode.op == "affine" and pnode.inputs == [x] and len(graph.consumers(a)) == 1 \
                    and (p := _scale_of(pnode)) is not None:
                chain = chain + (a,)
            else:
                continue
            if tuple(graph[x].shape) != tuple(node.shape):
                continue
            plan[node.name] = (x, 2 * p, form)
            dead.update(chain)
            break
    if not plan:
        return graph
    nodes = []
    for node in graph:
        if node.name in dead:
            continue
        if node.name in plan:
            x, scale, form = plan[node.name]
            params = {} if form == "none" else {"approximate": form}
            g = Node(f"{node.name}/gelu", "gelu", [x], node.shape, params,
                     f"GELU (fused {'erf' if form == 'none' else form} form)")
            nodes.append(g)
            w = torch.tensor(scale, dtype=_dtype(graph), device=_device(graph))
            what = ("x * (1 + erf(x / sqrt(2)))" if form == "none"
                    else "x * (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))")
            nodes.append(replace(node, op="affine", inputs=[g.name],
                                 params={"w": w, "b": None, "in_shape": tuple(node.shape)},
                                 source=f"{node.source} ({what})"))
        else:
            nodes.append(node)
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def fuse_silu(graph: Graph) -> Graph:
    """``graph`` with every ``x * sigmoid(x)`` as a ``silu`` node named after the product."""
    plan, dead = {}, set()
    for node in graph:
        if node.op != "mul" or len(node.inputs) != 2:
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            sig = graph[b]
            if (sig.op == "sigmoid" and sig.inputs == [a] and len(graph.consumers(b)) == 1
                    and tuple(graph[a].shape) == tuple(node.shape)):
                plan[node.name] = a
                dead.add(b)
                break
    if not plan:
        return graph
    nodes = [replace(n, op="silu", inputs=[plan[n.name]], params={},
                     source=f"{n.source} (x * sigmoid(x))") if n.name in plan else n
             for n in graph if n.name not in dead]
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def _mean_over(node: Node):
    p = node.params
    if node.op != "reduce_sum" or p.get("kind") != "mean" or not p.get("keepdim"):
        return None
    return tuple(p["dims"])


def fuse_layernorm(graph: Graph) -> Graph:
    """``graph`` with every exported (decomposed) LayerNorm as the LayerNorm chain (see the
    module doc); ``graph`` itself when there is none."""
    new: dict[str, Node] = {}
    dead: set[str] = set()
    for mul in graph:
        if mul.op != "mul" or len(mul.inputs) != 2:
            continue
        c_name, r_name = mul.inputs
        rec, c = graph[r_name], graph[c_name]
        if rec.op != "reciprocal" or len(graph.consumers(r_name)) != 1:
            continue
        sq = graph[rec.inputs[0]]
        if sq.op != "sqrt" or len(graph.consumers(sq.name)) != 1:
            continue
        ve = graph[sq.inputs[0]]
        eps = _scalar(ve.params.get("b")) if ve.op == "affine" and ve.params.get("w") is None else None
        if eps is None or not eps > 0 or len(graph.consumers(ve.name)) != 1:
            continue
        var = graph[ve.inputs[0]]
        dims = _mean_over(var)
        if dims is None or len(graph.consumers(var.name)) != 1:
            continue
        pw = graph[var.inputs[0]]
        if (pw.op != "pow" or pw.params.get("exponent") != 2.0 or pw.inputs != [c_name]
                or len(graph.consumers(pw.name)) != 1):
            continue
        if c.op != "add" or tuple(c.params.get("signs", ())) != (1, -1):
            continue
        x_name, m_name = c.inputs
        m = graph[m_name]
        if _mean_over(m) != dims or m.inputs != [x_name] or len(graph.consumers(c_name)) != 2:
            continue
        x = graph[x_name]
        if tuple(c.shape) != tuple(x.shape) or tuple(mul.shape) != tuple(x.shape):
            continue
        new[var.name] = Node(var.name, "variance", [x_name], var.shape,
                             {"dims": dims, "keepdim": True, "in_shape": tuple(x.shape)},
                             f"{var.source} (a LayerNorm's variance)")
        new[rec.name] = Node(rec.name, "rsqrt", [ve.name], rec.shape, {},
                             f"{rec.source} (1 / sqrt)")
        new[mul.name] = replace(mul, op="normalize",
                                params={"in_shapes": (tuple(c.shape), tuple(rec.shape)),
                                        "dims": dims, "eps": eps},
                                source=f"{mul.source} (a LayerNorm's normalization)")
        dead.update((pw.name, sq.name))
    if not new:
        return graph
    nodes = [new.get(n.name, n) for n in graph if n.name not in dead]
    return Graph(nodes, output=graph.output, leaves=graph.leaves)


def fuse(graph: Graph) -> Graph:
    """Every fusion of this module."""
    return fuse_layernorm(fuse_silu(fuse_gelu(fuse_square(graph))))


def _device(graph: Graph) -> torch.device:
    """Where the graph's constants are (the CPU for a graph without any)."""
    for node in graph:
        for v in node.params.values():
            if isinstance(v, torch.Tensor):
                return v.device
    return torch.device("cpu")


def _dtype(graph: Graph) -> torch.dtype:
    for node in graph:
        for v in node.params.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.dtype
    return torch.get_default_dtype()
