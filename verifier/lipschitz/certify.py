"""Certified L2 Lipschitz constants, composed through the traced graph, and the certificates
they give.

``lipschitz_constant(model)`` walks the graph of a ``BoundedModel`` (the same graph the bound
engine uses) in topological order and gives each node ``v`` a number ``L[v]`` with
``||v(x) - v(x')||_2 <= L[v] ||x - x'||_2`` for all inputs x, x':

* input: 1;
* a linear map (linear / Gemm, matmul, convolution, elementwise affine such as BatchNorm in eval
  mode, average pooling, reshapes and index selections): ``||op||_2 · L[in]``, with
  ``||op||_2`` from ``verifier.lipschitz.norms`` (exact SVD, the FFT bound for convolutions,
  closed forms for the rest), always an upper bound;
* ReLU, LeakyReLU (slope in [0, 1]), Tanh: ``1 · L[in]``; Sigmoid: ``1/4 · L[in]``; max pooling:
  ``sqrt(overlap) · L[in]`` (|max a - max b| <= max |a - b|);
* a sum of branches ``a ± b`` (residual connections): ``L[a] + L[b]``;
* concatenation: ``sqrt(sum L[part]^2)``.

A product of two perturbed tensors, or any other operator, has no global constant here: every
such node is named in one ``LipschitzError``. The constant of the output node bounds the whole
model: ``||f(x) - f(x')||_2 <= L ||x - x'||_2``.

Certificates: for label y and margin ``m(x) = f_y(x) - max_{j != y} f_j(x)``, each difference
``f_y - f_j`` is ``sqrt(2) L``-Lipschitz (``||e_y - e_j||_2 = sqrt(2)``), so the prediction cannot
change within the L2 ball of radius r when ``m(x) > sqrt(2) L r``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..errors import VerifierError
from .norms import conv_norm, dense_norm, selection_norm, window_overlap

ACTIVATION_CONSTANTS = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25}
LINEAR_OPS = ("linear", "matmul_left", "conv", "affine", "select", "avgpool")


class LipschitzError(VerifierError):
    """The graph holds operators without a global Lipschitz constant here (all listed)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  - {name}: {what}" for name, what in self.problems]
        super().__init__(f"{len(self.problems)} operation(s) without a certified Lipschitz "
                         "constant:\n" + "\n".join(lines))


@dataclass
class LayerConstant:
    """One node: its own constant (``||op||`` or the activation's slope bound), how it was
    obtained, and the constant of the model up to and including it (``cumulative``)."""

    name: str
    op: str
    constant: float
    cumulative: float
    how: str

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "constant": self.constant,
                "cumulative": self.cumulative, "how": self.how}


@dataclass(repr=False)
class LipschitzReport:
    """``lipschitz``: a certified upper bound on the model's L2 Lipschitz constant;
    ``layers``: per node, in topological order."""

    lipschitz: float
    layers: list[LayerConstant] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"lipschitz": self.lipschitz, "layers": [l.to_dict() for l in self.layers]}

    def __repr__(self) -> str:
        rows = "\n".join(f"  {l.name:<16} {l.op:<11} {l.constant:>12.6g} {l.cumulative:>12.6g}  "
                         f"{l.how}" for l in self.layers)
        return (f"LipschitzReport(lipschitz={self.lipschitz:.6g})\n"
                f"  {'node':<16} {'op':<11} {'constant':>12} {'cumulative':>12}\n{rows}")


def _affine_norm(node) -> tuple[float, str]:
    w = node.params.get("w")
    n_in = math.prod(node.params["in_shape"])
    rep = math.prod(node.shape) / max(1, n_in)      # broadcasting copies each entry rep times
    if w is None:
        return math.sqrt(rep), "shift only"
    return float(w.detach().abs().max()) * math.sqrt(rep), "max |scale| (diagonal)"


def _pool_norm(node) -> tuple[float, str]:
    p = node.params
    nd = len(p["kernel_size"])
    overlap = window_overlap(p["kernel_size"], p["stride"], p.get("dilation", (1,) * nd))
    if node.op == "maxpool":
        return math.sqrt(overlap), "sqrt(window overlap)"
    if p.get("divisor_override"):
        div = float(p["divisor_override"])
    elif p.get("count_include_pad", True) or not any(p["padding"]):
        div = float(math.prod(p["kernel_size"]))
    else:
        div = 1.0   # border windows may average fewer entries: the safe divisor
    # |mean of k values| <= sqrt(k) ||values|| / div; summed over windows: overlap
    return math.sqrt(overlap * math.prod(p["kernel_size"])) / div, "sqrt(overlap k) / divisor"


def node_constant(node, graph) -> tuple[float, str] | None:
    """The constant of one linear node (``||op||_2`` upper bound, how); None if not linear."""
    op, p = node.op, node.params
    if op == "linear":
        return dense_norm(p["weight"]), "exact SVD (float64)"
    if op == "matmul_left":
        return dense_norm(p["M"]), "exact SVD (float64)"
    if op == "conv":
        in_shape = graph[node.inputs[0]].shape
        return conv_norm(p["weight"], in_shape, node.shape, p["stride"], p["padding"],
                         p["dilation"], p["groups"])
    if op == "affine":
        return _affine_norm(node)
    if op == "select":
        if p.get("identity") or p.get("permutation"):
            return 1.0, "reshape / permutation"
        return selection_norm(p["index"], math.prod(p["in_shape"])), "sqrt(max copies)"
    if op in ("avgpool", "maxpool"):
        return _pool_norm(node)
    return None


def graph_lipschitz(graph) -> LipschitzReport:
    """Compose the per-node constants of a ``verifier.graph.Graph`` (see the module doc)."""
    L: dict[str, float] = {}
    layers, problems = [], []
    for node in graph:
        op = node.op
        ins = [L.get(i, math.nan) for i in node.inputs]
        if op == "input":
            L[node.name] = 1.0
            continue
        if op in ACTIVATION_CONSTANTS or op == "leaky_relu":
            c = ACTIVATION_CONSTANTS.get(op) or max(1.0, abs(node.params.get("negative_slope", 1)))
            L[node.name], how = c * ins[0], "activation slope bound"
        elif op == "add":
            c, how = float(len(ins)), "sum of branches"
            L[node.name] = sum(ins)
        elif op == "concat":
            parts = [ins[k] for k in node.params["parts"] if isinstance(k, int)]
            c, how = 1.0, "sqrt(sum of squares)"
            L[node.name] = math.sqrt(sum(v * v for v in parts))
        else:
            got = node_constant(node, graph) if op in LINEAR_OPS or op == "maxpool" else None
            if got is None:
                why = ("a product of two perturbed tensors has no global Lipschitz constant"
                       if op == "mul" else f"no Lipschitz constant for op {op!r}")
                problems.append((node.name, f"{why} (source: {node.source or op})"))
                L[node.name] = math.nan
                continue
            c, how = got
            L[node.name] = c * ins[0]
        layers.append(LayerConstant(node.name, op, float(c), float(L[node.name]), how))
    if problems:
        raise LipschitzError(problems)
    return LipschitzReport(float(L[graph.output]), layers)


def lipschitz_constant(model, input_shape=None) -> LipschitzReport:
    """A certified L2 Lipschitz constant of ``model``: a ``BoundedModel``, or an ``nn.Module``
    with its per-sample ``input_shape`` (traced in float64 so the weights are read exactly)."""
    from ..api import BoundedModel
    if not isinstance(model, BoundedModel):
        if input_shape is None:
            raise LipschitzError([("<model>", "an nn.Module needs input_shape")])
        model = BoundedModel(model, input_shape=input_shape, dtype=torch.float64)
    return graph_lipschitz(model.graph)


# ------------------------------------------------------------------------------------------
# certificates
# ------------------------------------------------------------------------------------------

def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j != y} f_j`` per sample: ``[B]`` (negative when misclassified)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).max(1).values
    return true - other


def certified_radius(logits: torch.Tensor, y: torch.Tensor, L: float) -> torch.Tensor:
    """The certified L2 radius ``m / (sqrt(2) L)`` per sample (0 when misclassified)."""
    return (margins(logits, y) / (math.sqrt(2) * L)).clamp(min=0)


def _logits64(net: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The logits in float64 from a float64 copy of ``net`` (so rounding cannot fake a margin)."""
    net64 = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        return torch.cat([net64(x[k:k + batch].double()) for k in range(0, len(x), batch)])


def lipschitz_certify(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, L: float,
                      radii=(0.5, 1.0)) -> dict:
    """Clean accuracy and L2 certified accuracy at each radius from margins (fractions)."""
    logits = _logits64(net, x)
    m = margins(logits, y)
    out = {"clean_acc": float((m > 0).double().mean()), "lipschitz": L, "certified_acc": {}}
    for r in radii:
        out["certified_acc"][str(r)] = float((m > math.sqrt(2) * L * r).double().mean())
    return out


def crown_l2(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float,
             batch: int = 100, method: str = "crown", input_shape=None) -> dict:
    """CROWN's L2 verification on the same model: per sample, verified or not, and CROWN's
    *effective local constant* ``max_j (m_j(x) - lower_j) / (sqrt(2) r)`` (m_j = f_y - f_j at x,
    lower_j its CROWN lower bound over the L2 ball of radius r): the smallest L for which the
    margin test above would prove what CROWN's bound proves. Unclipped ball, float64."""
    from ..api import BoundedModel, margin_spec
    from ..perturbation import LpBall
    shape = input_shape or tuple(x.shape[1:])
    model = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    n_cls = None
    verified, local = [], []
    net64 = copy.deepcopy(net).double().eval()
    for k in range(0, len(x), batch):
        xb, yb = x[k:k + batch].double(), y[k:k + batch]
        with torch.no_grad():
            f = net64(xb)
        n_cls = f.shape[1]
        C = margin_spec(yb, n_cls, dtype=torch.float64)
        m = torch.einsum("bsk,bk->bs", C, f)
        res = model.bounds(LpBall(xb, radius, norm=2), method=method, spec=C)
        verified.append((res.lower > 0).all(1))
        local.append(((m - res.lower) / (math.sqrt(2) * radius)).max(1).values)
    return {"verified": torch.cat(verified), "local_constant": torch.cat(local)}
