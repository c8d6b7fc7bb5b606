"""Complete verification over a zonotope ``x = center + z G``, ``z in [-1, 1]^k``, placed on the
input or on an intermediate node: input-split branch and bound over ``z``.

The graph is rewritten so that its only leaf is ``z`` (``verifier.graph.cut``: the part
downstream of the node, then ``x = center + z G`` in front of it), and ``input_split_bab``
splits the box ``[-1, 1]^k``: with k small (a few style parameters) it decides the property
completely, where splitting the input pixels could not. A domain is refuted by CROWN over its
sub-box of z (through the linear prefix, exactly the zonotope's dual-norm concretization); a
candidate ``z`` is replayed before ``sat`` is reported: on the original model (``model(x)``)
for a set on the input, on the model's graph in float64 with the node's value replaced for a
set on an intermediate node.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..bounds.forward import evaluate
from ..devices import as_tensor
from ..errors import PerturbationError, ShapeError
from ..graph.cut import affine_prefix, cut_at
from ..graph.nodes import Graph
from ..perturbation import Zonotope
from .input_bab import input_split_bab


@dataclass
class ZonotopeVerdict:
    """``status``: "unsat" (no point of the set violates the property), "sat" (``z``, ``x`` the
    point of the set at the node, ``y`` the replayed output), "timeout" or "unknown" (a
    candidate that failed its replay); ``reason`` says which; ``domains``: sub-boxes of z
    bounded."""

    status: str
    reason: str
    z: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    disjunct: int | None = None
    domains: int = 0
    time_s: float = 0.0

    def __repr__(self) -> str:
        return (f"ZonotopeVerdict({self.status}, {self.reason!r}, domains={self.domains}, "
                f"time_s={self.time_s:.2f})")


class AffineLeafModel:
    """What ``input_split_bab`` reads of a model, for a graph whose leaf is ``z``."""

    def __init__(self, graph: Graph, dtype: torch.dtype):
        self.graph = graph
        self.dtype = dtype
        self.input = graph.leaves[0]
        self.input_shape = graph[self.input].shape
        self.output_shape = graph[graph.output].shape

    def graph_forward(self, z: torch.Tensor) -> torch.Tensor:
        return evaluate(self.graph, {self.input: z.to(self.dtype)})[0]


def robustness_conjunctions(label: int, n_classes: int, dtype=torch.float32, device="cpu"):
    """The violations of "class ``label`` wins": one conjunction per ``j != label``,
    ``y_label - y_j <= 0`` -> (Cs, ds) as ``input_split_bab`` takes them."""
    if not 0 <= label < n_classes:
        raise ShapeError(f"label {label} outside [0, {n_classes - 1}]")
    Cs, ds = [], []
    for j in range(n_classes):
        if j != label:
            c = torch.zeros(1, n_classes, dtype=dtype, device=device)
            c[0, label], c[0, j] = 1.0, -1.0
            Cs.append(c)
            ds.append(torch.zeros(1, dtype=dtype, device=device))
    return Cs, ds


def zonotope_graph(model, Z: Zonotope, node: str | None = None) -> AffineLeafModel:
    """The model (downstream of ``node``, default the input) with its leaf ``center + z G``."""
    _check_single(Z)
    graph = model.graph if node is None else cut_at(model.graph, node)
    leaf = graph.leaves[0]
    if tuple(Z.center.shape[1:]) != tuple(graph[leaf].shape):
        raise ShapeError(f"the zonotope's per-sample shape {list(Z.center.shape[1:])} does not fit "
                         f"node {leaf!r} of shape {list(graph[leaf].shape)}")
    dt = model.dtype
    if torch.finfo(Z.center.dtype).bits > torch.finfo(dt).bits:
        raise PerturbationError(f"zonotope_bab: the zonotope is {Z.center.dtype}, the model "
                                f"computes in {dt}; rounding it would move the set: build it in "
                                "the model's dtype (or wrap the model with that dtype)")
    return AffineLeafModel(affine_prefix(graph, Z.center[0].to(dt), Z.generators[0].to(dt)), dt)


def _check_single(Z: Zonotope) -> None:
    if not isinstance(Z, Zonotope):
        raise PerturbationError(f"zonotope_bab needs a Zonotope, got {type(Z).__name__}")
    if Z.center.shape[0] != 1:
        raise PerturbationError(f"zonotope_bab decides one set at a time: batch 1, got "
                                f"{Z.center.shape[0]} (use Zonotope.take([i]))")
    if Z.norm != math.inf:
        raise PerturbationError("zonotope_bab splits the box [-1, 1]^k: z in an L2 / L1 ball "
                                "is not supported (its bounding box would give unsound sat)")
    if Z.slack is not None and bool((Z.slack > 0).any()):
        raise PerturbationError("zonotope_bab: the zonotope has a rounding slack (cast from a "
                                "finer dtype); build it in the model's dtype")


def _replay(model, Z: Zonotope, node, z, Cs, ds, k):
    """The point of the set for ``z`` and the output there in float64 (the original module for
    a set on the input; the graph with the node's value replaced otherwise); -> (x, y, holds)."""
    z = z.reshape(1, -1).double().clamp(-1, 1)
    x = Zonotope(Z.center.double(), Z.generators.double()).points(z)
    if node is None:
        with torch.no_grad():
            y = copy.deepcopy(model.module).double()(x)
    else:
        g = cut_at(model.graph, node)
        g64 = Graph([_node64(g[n]) for n in g.order], g.output, g.leaves)
        y = evaluate(g64, {node: x})[0]
    y = y.reshape(-1)
    holds = bool((Cs[k].double() @ y <= ds[k].double()).all())
    return x.to(Z.center.dtype), y, holds


def _node64(n):
    p = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in n.params.items()}
    return type(n)(n.name, n.op, list(n.inputs), n.shape, p, n.source)


def zonotope_bab(model, Z: Zonotope, Cs, ds, node: str | None = None, timeout: float = 30.0,
                 batch: int = 1024) -> ZonotopeVerdict:
    """Decide whether some point of ``Z`` (on ``node``, default the input) gives an output ``y``
    with ``Cs[k] y <= ds[k]`` for some k (a violation; see ``robustness_conjunctions``):
    input-split branch and bound over ``z`` (see the module doc). ``Z``: batch 1, z in a box."""
    t0 = time.perf_counter()
    zm = zonotope_graph(model, Z, node)
    dt = model.dtype
    k = Z.k
    dev = Z.center.device
    lo, hi = -torch.ones(k, dtype=dt, device=dev), torch.ones(k, dtype=dt, device=dev)
    Cs = [as_tensor(c, dt, dev) for c in Cs]
    ds = [as_tensor(d, dt, dev) for d in ds]
    r = input_split_bab(zm, lo, hi, Cs, ds, time.perf_counter() + timeout, batch=batch)
    out = ZonotopeVerdict(r.status, r.reason, domains=r.domains)
    if r.status == "candidate":
        x, y, holds = _replay(model, Z, node, r.x, Cs, ds, r.disjunct)
        if holds:
            out = ZonotopeVerdict("sat", f"{r.reason}, replayed", r.x.reshape(-1), x, y,
                                  r.disjunct, r.domains)
        else:
            out = ZonotopeVerdict("unknown", f"{r.reason}: candidate failed its float64 replay",
                                  r.x.reshape(-1), x, y, r.disjunct, r.domains)
    out.time_s = time.perf_counter() - t0
    return out
