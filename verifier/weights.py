"""Perturbation sets on a model's parameters.

    WeightPerturbation("fc*.weight", eps=0.01)                 # every entry |dW| <= 0.01
    WeightPerturbation(["fc1.weight", "fc1.bias"], eps=0.05, relative=True)   # |dW| <= 0.05 |W|
    WeightPerturbation("fc2.weight", eps=0.1, norm=2)          # ||dW||_F <= 0.1 (one ball per tensor)
    WeightSegment({"fc1.weight": delta1, "fc2.weight": delta2}, t=(0, 1))   # W + t·delta, one t

A set applies to each selected tensor separately; several sets (on disjoint parameters) combine
as a product set. Parameters are named as in the source model (``fc1.weight`` for a PyTorch
module, the initializer names for an ONNX file); ``*``, ``?`` and ``[...]`` globs are allowed.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

import torch

from .bounds.deviation import deviations
from .devices import as_tensor
from .errors import PerturbationError
from .graph.nodes import Graph, Node
from .graph.params import lift, parameter_values
from .ops import RULES
from .perturbation import Box, LpBall, Perturbation, parse_norm

SEGMENT_LEAF = "weight_segment.t"


def _patterns(p) -> list[str]:
    return [p] if isinstance(p, str) else list(p)


def select_parameters(names, patterns) -> list[str]:
    """The parameter names matched by any of the glob patterns, in the model's order; a pattern
    that matches nothing is an error that lists the available names."""
    names = list(names)
    chosen = []
    for pat in _patterns(patterns):
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise PerturbationError(f"no parameter matches {pat!r}; the model's perturbable "
                                    f"parameters are: {', '.join(names)}")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in names if n in chosen]


@dataclass
class WeightPerturbation:
    """Each selected parameter tensor W within ``{W + dW}``: ``norm`` inf: ``|dW| <= eps``
    element-wise (``relative``: ``|dW| <= eps·|W|``); ``norm`` 2: ``||dW||_F <= eps``.

    ``eps`` is one number, or a dict parameter name -> number or (L-inf) tensor of the
    parameter's shape (per-element radii, e.g. a quantization step); then ``params`` may be
    left out (the dict's keys)."""

    params: str | list[str] | None
    eps: float | dict
    norm: float | str = math.inf
    relative: bool = False

    def __post_init__(self):
        self.norm = parse_norm(self.norm)
        if self.norm not in (math.inf, 2.0):
            raise PerturbationError(f"weight perturbations support the L-inf and L2 norms, got {self.norm:g}")
        if isinstance(self.eps, dict):
            if self.params is None:
                self.params = list(self.eps)
            for k, e in self.eps.items():
                t = as_tensor(e, torch.float64)
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                    raise PerturbationError(f"weight eps for {k!r} must be finite and >= 0")
                if t.ndim and self.norm != math.inf:
                    raise PerturbationError("per-element weight eps needs the L-inf norm")
        elif not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise PerturbationError(f"weight eps must be a finite number >= 0, got {self.eps!r}")
        if self.params is None:
            raise PerturbationError("give the parameters to perturb (names or globs)")
        if self.relative and self.norm != math.inf:
            raise PerturbationError("relative weight eps (|dW| <= eps |W|) is element-wise: use norm inf")

    def ball(self, name: str, W: torch.Tensor) -> LpBall:
        eps = self.eps
        if isinstance(eps, dict):
            if name not in eps:
                raise PerturbationError(f"no weight eps given for {name!r}")
            eps = as_tensor(eps[name], torch.float64, W.device)
            if eps.ndim:
                if tuple(eps.shape) != tuple(W.shape):
                    raise PerturbationError(f"weight eps for {name!r} has shape {list(eps.shape)}, "
                                            f"the parameter {list(W.shape)}")
                eps = eps.unsqueeze(0)
        if self.relative:
            eps = eps * W.abs().unsqueeze(0)
        return LpBall(W.unsqueeze(0), eps, self.norm)


@dataclass
class WeightSegment:
    """Every model ``W + t·delta`` for one scalar ``t`` in ``[t0, t1]`` shared by all the given
    parameters (a fine-tuning or merging direction, a task vector): ``delta`` maps parameter
    names to tensors of the parameter's shape."""

    delta: dict
    t: tuple = (0.0, 1.0)

    def __post_init__(self):
        t0, t1 = (float(v) for v in self.t)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 > t1:
            raise PerturbationError(f"t range must be finite with t0 <= t1, got {self.t}")
        self.t = (t0, t1)


class ParameterSets:
    """The parameter sets of one ``bounds`` call resolved against a graph: the lifted graph and
    the perturbations of its new leaves."""

    def __init__(self, graph: Graph, specs, dtype: torch.dtype):
        specs = [specs] if isinstance(specs, (WeightPerturbation, WeightSegment)) else list(specs)
        values = parameter_values(graph)
        self.leaves: dict[str, Perturbation] = {}
        self.balls: dict[str, LpBall] = {}
        sources: dict[str, str] = {}
        extra: list[Node] = []
        for spec in specs:
            if isinstance(spec, WeightPerturbation):
                for name in select_parameters(values, spec.params):
                    self._claim(sources, name)
                    ball = spec.ball(name, values[name].to(torch.float64)).to(dtype)
                    sources[name] = name
                    self.leaves[name] = self.balls[name] = ball
                    extra.append(Node(name, "input", [], tuple(values[name].shape),
                                      {"display_name": name, "parameter": True}, "parameter"))
            elif isinstance(spec, WeightSegment):
                if SEGMENT_LEAF in self.leaves:
                    raise PerturbationError("only one WeightSegment per call")
                t0, t1 = spec.t
                where = next((v.device for v in values.values()), torch.device("cpu"))
                self.leaves[SEGMENT_LEAF] = Box(torch.tensor([[t0]], dtype=dtype, device=where),
                                                torch.tensor([[t1]], dtype=dtype, device=where))
                extra.insert(0, Node(SEGMENT_LEAF, "input", [], (1,), {"display_name": "t"}, "segment"))
                for name, d in spec.delta.items():
                    if name not in values:
                        select_parameters(values, name)  # the error names the parameters
                    d = as_tensor(d, dtype, values[name].device)
                    if tuple(d.shape) != tuple(values[name].shape):
                        raise PerturbationError(f"delta for {name!r} has shape {list(d.shape)}, the "
                                                f"parameter {list(values[name].shape)}")
                    if not bool(torch.isfinite(d).all()):
                        raise PerturbationError(f"delta for {name!r} holds NaN or inf")
                    self._claim(sources, name)
                    sources[name] = name
                    extra.append(Node(name, "param_affine", [SEGMENT_LEAF], tuple(d.shape),
                                      {"base": values[name].to(dtype), "direction": d}, "segment"))
            else:
                raise PerturbationError(f"unknown weight perturbation {type(spec).__name__}")
        self.names = list(sources)
        self.graph = self._with_balls(lift(graph, sources, extra))

    def _with_balls(self, graph: Graph) -> Graph:
        """The lifted graph, each layer whose weight is read straight from a ball given the
        ball (its rule uses the ball, not just its box): ``l2_eps``, an L2 ball's radius, and
        ``weight_ball`` where the rule concretizes the ball itself (``fuses_weight_ball``)
        and is the ball's only reader."""
        nodes = []
        for node in graph:
            roles = dict(zip(node.params.get("roles", ()), node.inputs[1:]))
            leaf = roles.get("weight")
            ball = self.balls.get(leaf)
            if ball is not None:
                params = dict(node.params)
                if ball.norm == 2.0:
                    params["l2_eps"] = ball._eps_t.reshape(-1)[0]
                if RULES[node.op].fuses_weight_ball and len(graph.consumers(leaf)) == 1:
                    params["weight_ball"] = ball
                node = replace(node, params=params)
            nodes.append(node)
        return Graph(nodes, output=graph.output, leaves=graph.leaves)

    def with_deviations(self, leaves: dict) -> Graph:
        """The lifted graph for these leaves, each perturbed layer holding the certified L2
        deviations of its input and output from their values at the sets' centers
        (``verifier.bounds.deviation``) as constants (``dev``): its rule intersects its interval
        with them and uses them in the L2 remainder. A new graph; ``self.graph`` is unchanged."""
        v0, d = deviations(self.graph, leaves)
        nodes = []
        for node in self.graph:
            if node.op != "input" and "roles" in node.params:
                x = node.inputs[0]
                node = replace(node, params={**node.params,
                                             "dev": (v0[x], d[x], v0[node.name], d[node.name])})
            nodes.append(node)
        return Graph(nodes, output=self.graph.output, leaves=self.graph.leaves)

    @staticmethod
    def _claim(sources, name):
        if name in sources:
            raise PerturbationError(f"parameter {name!r} is selected by two weight perturbations")
