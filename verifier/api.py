"""The public API: wrap a model once, then ask for bounds under a perturbation.

    model = BoundedModel(torch_module, input_shape=(1, 28, 28))    # or BoundedModel.from_onnx(path)
    res = model.bounds(LpBall(x, eps=0.1, clip=(0, 1)), method="crown", spec=margin_spec(y, 10))
    res.lower, res.upper            # [batch, spec] (or [batch, *out_shape] without a spec)
    res["fc1"]                      # Interval of an intermediate node, by the model's node name
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .bound_types import Interval
from .bounds.alpha import alpha_crown
from .bounds.crown import crown, ibp_spec_bounds
from .bounds.forward import evaluate
from .bounds.ibp import ibp_bounds
from .devices import as_tensor, resolve_device
from .errors import ShapeError, VerifierError
from .graph.fuse import fuse
from .graph.live import live_graph
from .graph.nodes import Graph
from .graph.onnx_loader import load_onnx
from .graph.params import parameter_values
from .graph.simplify import fold_bias_adds, fold_channel_scales
from .graph.trace import build_graph
from .graph.cut import cut_at
from .perturbation import Box, LpBall, Perturbation, Zonotope
from .weights import ParameterSets, WeightPerturbation

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")


@dataclass(repr=False)
class BoundResult:
    """Bounds of ``spec·f(x)`` (or of ``f(x)``) over the perturbation set.

    ``lower, upper: [batch, spec]`` (``[batch, *out_shape]`` without a spec); ``nodes`` maps node
    names to the intervals the method computed on the way. ``parts`` (with a spec, methods other
    than "ibp"): the sound lower bounds ``[batch, spec]`` whose elementwise max is ``lower``, by
    what computed them: the method's own backward bound, and "ibp", the interval bound of the
    spec over the method's intermediate bounds (never below the IBP method's).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    method: str
    spec: torch.Tensor | None
    nodes: dict[str, Interval] = field(default_factory=dict)
    time_s: float = 0.0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Interval:
        if name not in self.nodes:
            raise KeyError(f"no bounds for node {name!r}; nodes with bounds: {sorted(self.nodes)}")
        return self.nodes[name]

    @property
    def verified(self) -> torch.Tensor | None:
        """Per sample: every spec row's lower bound > 0 (None without a spec)."""
        if self.spec is None:
            return None
        return (self.lower > 0).all(dim=1)

    @property
    def proved_by(self) -> list[str | None] | None:
        """Per sample, what proved it (None: not verified; None for all without a spec): the
        method's name when its own bound proves every spec row, else "ibp" when the interval
        bound alone does, else (a zonotope) "<method> over the bounding box" when that bound
        does, else "<method>+ibp" (each row by one of them)."""
        v = self.verified
        if v is None:
            return None
        own = self.parts.get(self.method)
        ibp = self.parts.get("ibp")
        box = self.parts.get("box")
        out = []
        for i, ok in enumerate(v.tolist()):
            if not ok:
                out.append(None)
            elif own is None or bool((own[i] > 0).all()):
                out.append(self.method)
            elif ibp is not None and bool((ibp[i] > 0).all()):
                out.append("ibp")
            elif box is not None and bool((box[i] > 0).all()):
                out.append(f"{self.method} over the bounding box")
            else:
                out.append(f"{self.method}+ibp")
        return out

    def __repr__(self) -> str:
        v = self.verified
        vs = "" if v is None else f", verified={v.tolist()}"
        return (f"BoundResult(method={self.method}, shape={list(self.lower.shape)}, "
                f"lower.min={self.lower.min().item():.5g}, upper.max={self.upper.max().item():.5g}"
                f"{vs}, nodes={len(self.nodes)}, time_s={self.time_s:.4f})")


def margin_spec(labels, n_classes: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j != y`` in ascending j: ``[batch, n_classes - 1, n_classes]``,
    on ``device`` (default: the labels' device; the CPU for labels that are not a tensor)."""
    labels = as_tensor(labels, device=device).reshape(-1).long()
    if ((labels < 0) | (labels >= n_classes)).any():
        raise ShapeError(f"labels must lie in [0, {n_classes - 1}], got {labels.tolist()}")
    B = labels.shape[0]
    eye = torch.eye(n_classes, dtype=dtype, device=labels.device)
    C = eye[labels].unsqueeze(1) - eye.unsqueeze(0)           # [B, n, n]: row j = e_y - e_j
    keep = torch.ones(B, n_classes, dtype=torch.bool, device=labels.device)
    keep[torch.arange(B, device=labels.device), labels] = False
    return C[keep].view(B, n_classes - 1, n_classes)


def _bounding_box(p: Perturbation) -> Perturbation:
    """A zonotope's bounding box; any other set as it is."""
    if isinstance(p, Zonotope):
        iv = p.interval()
        return Box(iv.lower, iv.upper)
    return p


class BoundedModel:
    """A model traced once into a bound-propagation graph.

    ``model``: an ``nn.Module`` (traced with torch.fx) or an fx.GraphModule; ``input_shape``: the
    per-sample input shape (no batch dim), or ``example_input`` with a batch dim. ``device``:
    where the model and every bound live ("cpu", "cuda", "cuda:N", "auto" or a torch.device;
    default: where the module's parameters are, the CPU for a module without any); the module
    is moved there (``module.to(device)``, in place), inputs, perturbation sets and specs given
    to ``bounds`` are moved there, and results come back on it.
    """

    def __init__(self, model: torch.nn.Module, input_shape=None, example_input=None,
                 dtype: torch.dtype = torch.float32, input_name: str | None = None, device=None):
        if device is None:
            device = next((p.device for p in model.parameters()), None)
        self.device = resolve_device(device)
        if example_input is None:
            if input_shape is None:
                raise ShapeError("give input_shape (per sample) or example_input")
            example_input = torch.zeros(1, *input_shape, device="cpu")
        # traced on the CPU (the graph is a snapshot of the weights), then moved to the device
        example_input = as_tensor(example_input, device="cpu")[:1].to(torch.float32)
        self.module = model.eval().to("cpu")
        self.dtype = dtype
        traced = build_graph(self.module, (example_input,), [input_name] if input_name else None)
        self.graph: Graph = fuse(fold_bias_adds(traced.to(dtype))).to(dtype, self.device)
        self.module.to(self.device)
        if len(self.graph.leaves) != 1:
            raise ShapeError(f"the model takes {len(self.graph.leaves)} inputs; one is supported")
        self.input = self.graph.leaves[0]
        self.input_shape = self.graph[self.input].shape
        self.output_shape = self.graph[self.graph.output].shape
        self.source_path: str | None = None

    @classmethod
    def from_onnx(cls, path, dtype: torch.dtype = torch.float32, device=None) -> "BoundedModel":
        """Load an ONNX file (``.onnx`` or ``.onnx.gz``); a symbolic batch dim is taken as 1.
        ``device``: where the model and its bounds live (default: the CPU)."""
        with torch.device("cpu"):  # the converted modules are built on the CPU, then moved
            m = load_onnx(path)
        if len(m.input_names) != 1:
            raise ShapeError(f"{path}: the model has {len(m.input_names)} inputs; one is supported")
        shape = tuple(max(1, d) for d in m.input_shapes[0]) or (1,)
        if len(shape) == 1 and shape[0] != 1:
            raise ShapeError(f"{path}: input {m.input_names[0]} has shape {list(shape)} without a "
                             "batch dimension")
        self = cls(m.module, example_input=torch.zeros(1, *shape[1:], device="cpu"), dtype=dtype,
                   device=resolve_device(device))
        aliases = m.parameter_names()
        for node in self.graph:  # parameters go by their ONNX initializer names
            if "param_names" in node.params:
                node.params["param_names"] = {r: (aliases.get(n, n), lay)
                                              for r, (n, lay) in node.params["param_names"].items()}
        self.source_path = str(path)
        self.onnx = m
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The original model's output on ``x: [batch, *input_shape]`` (on the model's device)."""
        with torch.no_grad():
            return self.module(x.to(device=self.device, dtype=torch.float32))

    def graph_forward(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """The traced graph evaluated on ``x`` (differentiable; for attacks): every node's
        rule maps the degenerate interval [x, x]. ``params``: parameter name -> a value to use
        instead of the model's (same shape), e.g. a point of a weight perturbation set."""
        graph = self.graph
        vals = {self.input: x.to(device=self.device, dtype=self.dtype)}
        if params:
            graph = ParameterSets(self.graph, WeightPerturbation(list(params), 0.0), self.dtype).graph
            vals.update({k: as_tensor(v, self.dtype, self.device).unsqueeze(0) for k, v in params.items()})
        return evaluate(graph, vals)[0]

    def parameters(self) -> dict[str, torch.Tensor]:
        """The parameters a weight perturbation can select (those of linear and conv layers), by
        the source model's names: parameter name -> value."""
        return parameter_values(self.graph)

    def check_input(self, x: torch.Tensor, what: str = "input") -> torch.Tensor:
        """Accept ``[*input_shape]``, ``[1, *input_shape]`` or ``[N, *input_shape]``, or anything with
        the right number of elements per sample; -> [N, *input_shape] on the model's device."""
        x = as_tensor(x)
        n = math.prod(self.input_shape)
        if tuple(x.shape) == tuple(self.input_shape):
            x = x.unsqueeze(0)
        elif tuple(x.shape[1:]) != tuple(self.input_shape):
            if x.numel() == n:
                x = x.reshape(1, *self.input_shape)
            elif x.ndim >= 1 and x.numel() % n == 0 and math.prod(x.shape[1:]) == n:
                x = x.reshape(x.shape[0], *self.input_shape)
            else:
                raise ShapeError(f"{what} of shape {list(x.shape)} does not fit the model's input "
                                 f"shape {list(self.input_shape)} (per sample)")
        return x.to(device=self.device, dtype=self.dtype)

    def node_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's value at the fixed input ``x`` (``[batch, *input_shape]``), by node name:
        e.g. the feature map a set placed on an intermediate node starts from."""
        with torch.no_grad():
            return evaluate(self.graph, {self.input: self.check_input(x)})[1]

    def _placed(self, leaves: dict) -> tuple[Graph, dict]:
        """The graph to bound for ``leaves`` keyed by node name: the model's own graph when they
        are its leaves, else the part downstream of the one intermediate node they name
        (``cut_at``: the set replaces that node's value)."""
        inner = [k for k in leaves if k not in self.graph.leaves]
        if not inner:
            return self.graph, leaves
        if len(leaves) != 1:
            raise VerifierError(f"a set on an intermediate node ({inner[0]!r}) must be the only "
                                f"set, got sets on {sorted(leaves)}")
        name = inner[0]
        graph = cut_at(self.graph, name)
        p = leaves[name]
        shape = tuple(p.interval().lower.shape[1:])
        if shape != tuple(graph[name].shape):
            raise ShapeError(f"the set on node {name!r} has per-sample shape {list(shape)}, the "
                             f"node has {list(graph[name].shape)}")
        return graph, {name: p.to(self.dtype)}

    def _leaves(self, perturbation) -> dict[str, Perturbation]:
        if isinstance(perturbation, dict):
            return perturbation
        if isinstance(perturbation, Zonotope):
            c = perturbation.center
            if tuple(c.shape[1:]) != tuple(self.input_shape):
                raise ShapeError(f"the zonotope's center of shape {list(c.shape)} does not fit the "
                                 f"model's input shape {list(self.input_shape)} (per sample, after "
                                 "a batch dimension)")
            return {self.input: perturbation.to(self.dtype)}
        if isinstance(perturbation, torch.Tensor):  # a fixed input (weights perturbed only)
            x = self.check_input(perturbation)
            return {self.input: Box(x, x).to(self.dtype, self.device)}
        if isinstance(perturbation, LpBall):
            c = self.check_input(perturbation.center, "the ball's center")
            eps = perturbation.eps
            if isinstance(eps, torch.Tensor) and eps.ndim > 1 and perturbation.norm == math.inf:
                eps = eps.to(device=self.device, dtype=self.dtype)
            clip = perturbation.clip
            p = LpBall(c, eps, perturbation.norm, clip)
        elif isinstance(perturbation, Box):
            p = Box(self.check_input(perturbation.lower, "box lower"),
                    self.check_input(perturbation.upper, "box upper"))
        else:
            raise VerifierError(f"unknown perturbation {type(perturbation).__name__}")
        return {self.input: p.to(self.dtype, self.device)}

    def bounds(self, perturbation: Perturbation | torch.Tensor, method: str = "crown",
               spec: torch.Tensor | None = None, weights=None, live: bool = False,
               batch_stats: dict | None = None, enclosing_box: bool = True,
               intervals: dict | None = None, upper: bool = True) -> BoundResult:
        """Bounds of ``spec·f(x)`` for every ``x`` in the perturbation set (and every parameter
        value in the ``weights`` sets).

        ``perturbation``: an input set, or a tensor for a fixed input; ``method``: "ibp",
        "crown", "crown-ibp" or "alpha-crown"; ``spec``: ``[batch, S, *out_shape]`` (or
        ``[S, *out_shape]`` shared by the batch), merged into the last affine layer;
        ``weights``: a ``WeightPerturbation`` or ``WeightSegment`` (or a list of them) on
        parameters, each sample's bounds holding for every parameter value in the sets.
        With a spec, the bounds of "crown", "crown-ibp" and "alpha-crown" are intersected with
        the interval bound of the spec rows (``parts``, ``proved_by``), so none is looser than
        "ibp"; ``live`` (differentiable, for the training loss) "crown-ibp" bounds are not, so
        that the loss's CROWN-IBP term keeps its own gradient (and may be looser than IBP).

        A set may sit on an intermediate node instead of the input: ``{node_name: set}`` bounds
        the model with that node's value replaced by any point of the set (e.g. a
        ``Zonotope`` of style shifts of the feature map ``node_values(x)[node_name]``). With a
        ``Zonotope``, ``enclosing_box`` also bounds over its bounding box with the same method
        and keeps the tighter bounds (``parts["box"]``): never looser than the box (about twice
        the time; the zonotope's own bound is ``parts[method]``).

        "crown-ibp" only: ``intervals``, the ``nodes`` of an "ibp" result for the same sets
        (and, live, the same parameters), reused instead of computed again; ``upper=False``,
        only lower bounds by the backward pass (the upper ones are the interval bounds; the
        training loss reads only lower bounds of the spec rows).
        """
        method = method.lower()
        if method not in METHODS:
            raise VerifierError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if (intervals is not None or not upper) and method != "crown-ibp":
            raise VerifierError(f"intervals= and upper=False apply to the method crown-ibp, not "
                                f"{method!r}")
        graph, leaves = self._placed(self._leaves(perturbation))
        B = leaves[self.input].interval().lower.shape[0] if self.input in leaves else \
            next(iter(leaves.values())).interval().lower.shape[0]
        if live:
            if method not in ("ibp", "crown-ibp"):
                raise VerifierError(f"live (differentiable) bounds support the methods ibp and "
                                    f"crown-ibp, not {method!r}")
            graph = live_graph(self.graph, self.module, batch_stats)
        if weights is not None:
            # live: the parameter sets are centered at the module's current parameters
            sets = ParameterSets(graph, weights, self.dtype)
            leaves = {**leaves, **sets.leaves}
            graph = sets.with_deviations(leaves)
        if live and method == "crown-ibp":
            # the loss's backward pass maps A through conv + BatchNorm as one layer (the products
            # W * w are rounded: training bounds, not a verdict)
            graph = fold_channel_scales(graph)
        C = None
        if spec is not None:
            C = as_tensor(spec, self.dtype, self.device)
            if C.ndim == 1 + len(self.output_shape):
                C = C.unsqueeze(0).expand(B, *C.shape)
            if C.shape[0] != B or tuple(C.shape[2:]) != tuple(self.output_shape):
                raise ShapeError(f"spec of shape {list(C.shape)} does not fit batch {B} and output "
                                 f"shape {list(self.output_shape)}")
        t0 = time.perf_counter()
        parts = {}
        with (torch.enable_grad() if live else torch.no_grad()):
            if method == "ibp":
                nodes = ibp_bounds(graph, leaves)
                if C is None:
                    out = nodes[graph.output]
                    lo, up = out.lower, out.upper
                else:
                    lo, up = ibp_spec_bounds(graph, nodes, C)
            else:
                # every method's bounds of C·f are intersected with the interval bound
                # (ibp_spec_bounds) over its own intermediate bounds, which lie inside IBP's:
                # never looser than method "ibp" (except the training loss, see crown())
                res = (alpha_crown(graph, leaves, C) if method == "alpha-crown" else
                       crown(graph, leaves, C, method=method, ibp_spec=not live,
                             intervals=intervals, upper=upper))
                lo, up, nodes = res.lower, res.upper, res.nodes
                if C is not None:
                    parts = {method: res.own_lower, "ibp": res.ibp_lower}
                if (enclosing_box and not live
                        and any(isinstance(p, Zonotope) for p in leaves.values())):
                    # the same method over the sets' bounding boxes: sound too, and (with
                    # adaptive relaxations, tighter intermediate bounds can tilt a later line)
                    # not always looser, so the bounds are never looser than the box's
                    boxes = {k: _bounding_box(p) for k, p in leaves.items()}
                    rb = (alpha_crown(graph, boxes, C) if method == "alpha-crown" else
                          crown(graph, boxes, C, method=method))
                    lo, up = torch.maximum(lo, rb.lower), torch.minimum(up, rb.upper)
                    if C is not None:
                        parts["box"] = rb.lower
                    nodes = {k: v.intersect(rb.nodes[k]) if k in rb.nodes else v
                             for k, v in nodes.items()}
            # NaN (inf - inf after a float overflow) carries no information: widen it
            sane = Interval(lo, up).sanitized()
            lo, up = sane.lower, sane.upper
            nodes = {k: v.sanitized() for k, v in nodes.items()}
        dt = time.perf_counter() - t0
        return BoundResult(lo, up, method, C, nodes, dt, parts)
