"""Certified L2 Lipschitz constants, composed through the traced graph, and the certificates
they give.

``lipschitz_constant(model)`` walks the graph of a ``BoundedModel`` (the same graph the bound
engine uses) with the forward interpreter and gives each node ``v``, by its rule's
``lipschitz``, a number ``L[v]`` with
``||v(x) - v(x')||_2 <= L[v] ||x - x'||_2`` for all inputs x, x':

* input: 1;
* a linear map (linear / Gemm, matmul, convolution, elementwise affine such as BatchNorm in eval
  mode, average pooling, reshapes and index selections): ``||op||_2 · L[in]``, with
  ``||op||_2`` from ``verifier.ops.norms`` (exact SVD, the FFT bound for convolutions,
  closed forms for the rest), always an upper bound;
* ReLU, LeakyReLU (slope in [0, 1]), Tanh: ``1 · L[in]``; Sigmoid: ``1/4 · L[in]``; max pooling:
  ``sqrt(overlap) · L[in]`` (|max a - max b| <= max |a - b|);
* a sum of branches ``a ± b`` (residual connections): ``L[a] + L[b]``;
* concatenation: ``sqrt(sum L[part]^2)``.

A product of two perturbed tensors, or any other operator, has no global constant here: every
such node is named in one ``LipschitzError``.

**On a domain** (``domain=(lower, upper)``: the box D of inputs, e.g. pixels in [0, 1]) the
constant holds for x, x' in D only, and products of two perturbed tensors (attention's
``Q K^T`` and ``softmax · V``) get one too. The traversal first bounds every node over all of D
(IBP on the box D: ``box[v]``) and evaluates it at D's center c (``center[v]``), then each rule's
``lipschitz_on`` composes:

* ``Z = X Y`` per slice b (``verifier.ops.bilinear.Einsum``): ``Z - Z' = (X - X') Y + X' (Y -
  Y')``, so ``L[Z] = L[X] N[Y] + N[X] L[Y]`` with ``N[v] >= sup_{x in D} ||v_b(x)||_2``: the
  smaller of ``||v_b(c)||_F + L[v] sup_{x in D} ||x - c||_2`` and the Frobenius norm of
  ``max(|lower|, |upper|)`` of ``box[v]``; softmax weights also ``sqrt(max column sum)``;
* softmax (the graph's ``1 / sum_j exp(a_j - a_i)``): ``1/2 · L[a]`` (its Jacobian
  ``diag(p) - p p^T`` has norm <= 1/2, Gershgorin; this one holds globally);
* ``exp`` and ``1/x`` (outside a softmax): their largest slope on ``box[v]``;
* every other node: its global rule above.

Each step bounds ``||v(x) - v(x')||_2`` for x, x' in D by induction, and ``N`` is sound because
every point of D lies within ``sup ||x - c||`` of c and inside the IBP box. The constant of the output node bounds the whole
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

from ..api import BoundedModel, margin_spec
from ..bounds.forward import evaluate, forward
from ..errors import VerifierError
from ..ops.base import NotSupported
from ..perturbation import Box, LpBall


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


@dataclass
class DomainContext:
    """What ``BoundRule.lipschitz_on`` reads: ``L`` (constants so far, by node), ``box`` (IBP
    intervals ``[1, *shape]`` over the domain), ``center`` (values at its center), ``radius``
    (``sup_{x in D} ||x - c||_2``), ``graph``, and ``N`` (``N[v] >= sup_{x in D} ||v(x)||_2``,
    the least of ``frame_norm`` and the rule's ``norm_on``)."""

    graph: object
    L: dict
    box: dict
    center: dict
    radius: float
    N: dict = field(default_factory=dict)

    def frame_norm(self, name: str, L: float) -> float:
        """``sup_{x in D} ||v(x)||_2`` from the interval and from the center alone."""
        iv, c = self.box[name], self.center[name].double()
        by_box = float(torch.maximum(iv.lower.abs(), iv.upper.abs()).double().norm())
        return min(by_box, float(c.norm()) + (L * self.radius if L else 0.0))


def graph_lipschitz(graph, ctx: DomainContext | None = None) -> LipschitzReport:
    """Compose the per-node constants of a ``verifier.graph.Graph`` (see the module doc): the
    forward interpreter with each rule's ``lipschitz`` (``lipschitz_on`` with a domain ``ctx``)
    as its step; every node whose rule has none is named in one ``LipschitzError``."""
    layers, problems = [], []
    out = {} if ctx is None else ctx.L

    def step(rule, node, Ls):
        try:
            L, c, how = rule.lipschitz(node, Ls) if ctx is None else rule.lipschitz_on(node, ctx)
        except NotSupported as e:
            why = e.why or f"no Lipschitz constant for op {node.op!r}"
            problems.append((node.name, f"{why} (source: {node.source or node.op})"))
            return math.nan
        layers.append(LayerConstant(node.name, node.op, float(c), float(L), how))
        if ctx is not None:
            ctx.L[node.name] = L
            n = ctx.frame_norm(node.name, L)
            try:
                n = min(n, float(rule.norm_on(node, ctx)))
            except NotSupported:
                pass
            ctx.N[node.name] = n
        return L

    def leaf(node):
        if ctx is not None:
            ctx.N[node.name] = ctx.frame_norm(node.name, 1.0)
        return 1.0

    L = forward(graph, leaf, step, out=out)
    if problems:
        raise LipschitzError(problems)
    return LipschitzReport(float(L[graph.output]), layers)


def domain_context(model: BoundedModel, lower, upper) -> DomainContext:
    """IBP bounds of every node over the box ``[lower, upper]`` (floats or tensors of the input's
    per-sample shape) and every node's value at its center."""
    shape = tuple(model.input_shape)
    lo = torch.as_tensor(lower, dtype=model.dtype, device=model.device).expand(1, *shape).clone()
    hi = torch.as_tensor(upper, dtype=model.dtype, device=model.device).expand(1, *shape).clone()
    if not bool((lo <= hi).all()):
        raise LipschitzError([("<domain>", "lower > upper somewhere")])
    with torch.no_grad():
        box = model.bounds(Box(lo, hi), method="ibp").nodes
        c = (lo + hi) / 2
        center = evaluate(model.graph, {model.input: c})[1]
    radius = float(((hi - lo) / 2).double().norm())
    return DomainContext(model.graph, {}, box, center, radius)


def lipschitz_constant(model, input_shape=None, domain=None) -> LipschitzReport:
    """A certified L2 Lipschitz constant of ``model``: a ``BoundedModel``, or an ``nn.Module``
    with its per-sample ``input_shape`` (traced in float64 so the weights are read exactly).
    ``domain=(lower, upper)``: the constant holds for inputs in that box only (e.g. ``(0, 1)``
    for images), and attention's products get one (see the module doc)."""
    if not isinstance(model, BoundedModel):
        if input_shape is None:
            raise LipschitzError([("<model>", "an nn.Module needs input_shape")])
        model = BoundedModel(model, input_shape=input_shape, dtype=torch.float64)
    if domain is None:
        return graph_lipschitz(model.graph)
    return graph_lipschitz(model.graph, domain_context(model, *domain))


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
    where = next((p.device for p in net64.parameters()), x.device)
    with torch.no_grad():
        return torch.cat([net64(x[k:k + batch].to(device=where, dtype=torch.float64))
                          for k in range(0, len(x), batch)])


def lipschitz_certify(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, L: float,
                      radii=(0.5, 1.0)) -> dict:
    """Clean accuracy and L2 certified accuracy at each radius from margins (fractions)."""
    logits = _logits64(net, x)
    m = margins(logits, y.to(logits.device))
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
    shape = input_shape or tuple(x.shape[1:])
    model = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    n_cls = None
    verified, local = [], []
    net64 = copy.deepcopy(net).double().eval()
    for k in range(0, len(x), batch):
        xb = x[k:k + batch].to(device=model.device, dtype=torch.float64)
        yb = y[k:k + batch].to(model.device)
        with torch.no_grad():
            f = net64(xb)
        n_cls = f.shape[1]
        C = margin_spec(yb, n_cls, dtype=torch.float64)
        m = torch.einsum("bsk,bk->bs", C, f)
        res = model.bounds(LpBall(xb, radius, norm=2), method=method, spec=C)
        verified.append((res.lower > 0).all(1))
        local.append(((m - res.lower) / (math.sqrt(2) * radius)).max(1).values)
    return {"verified": torch.cat(verified), "local_constant": torch.cat(local)}
