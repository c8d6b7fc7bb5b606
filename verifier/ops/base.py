"""The bound-rule interface and the registry of rules by op kind.

A rule is the only place that knows its operator. It answers every question a method asks of a
node, or raises ``NotSupported`` naming the op and the question:

1. ``interval(node, inputs)``: IBP, from the intervals of its perturbed inputs; ``point(node,
   inputs)``: the value at a point (differentiable: attacks, replays, training losses);
2. ``backward(node, A_lower, A_upper, inputs, alpha=None, beta=None)``: CROWN, turning linear
   bounds on the node's value (``A: [B, S, *node.shape]``) into linear bounds on each perturbed
   input, plus the bias (``[B, S]``) that the relaxation adds. ``inputs`` are the inputs'
   intervals when the rule ``needs_bounds`` (a nonlinear relaxation), else None. ``alpha``:
   values of the relaxation's free parameters (alpha-CROWN), ``beta``: split multipliers
   (beta-CROWN), for the rules that take them;
3. ``alpha_init(node, x, B, S, dtype)``: the free parameters of the relaxation, their initial
   value (reproducing ``backward``'s lines) and valid range, or None where there is no freedom;
4. ``patch_step(node, g, vl, vu, inputs)``: the CROWN step with A stored as patches (see
   ``verifier.bounds.patches``) where ``patchable(node)``;
5. ``deviation(node, centers, devs)``: a bound on ``||y - y0||_2`` from its inputs' (weight
   perturbation analysis); ``lipschitz(node, Ls)``: a global L2 Lipschitz bound composed from its
   inputs' (``-> (L, own constant, how)``);
6. ``splittable``: branch and bound may split the node's input at 0 (each half is linear),
   ``piece_slopes(node)``: the slopes of those two halves (below 0, above 0);
   ``split_point(node, lower, upper)``: where branch and bound splits an input interval of an
   element-wise nonlinearity (``splits``: the rule gives one; the relaxation tightens on each
   half);
   ``rows``: a dense layer's rows, where CROWN may start one node earlier;
   ``constant_shift`` / ``absorb_shift``: graph simplification (a linear layer absorbs a
   following constant add, ``verifier.graph.simplify``);
   ``weight_op``: the op that the node becomes when its parameters are perturbed (``lifted``
   checks it can), ``live_params``: the node's params read from a module's live parameters
   (certified training).
"""
from __future__ import annotations

import torch

from ..bound_types import Interval
from ..errors import VerifierError

RULES: dict[str, "BoundRule"] = {}

# every question a method may ask of a rule (the coverage test walks them all)
QUESTIONS = ("interval", "point", "backward", "alpha_init", "rows", "patch_step", "deviation",
             "lipschitz", "lifted", "live_params", "constant_shift", "absorb_shift")


class NotSupported(VerifierError):
    """A rule cannot answer one question (``question``) for its op (``op``): the method asking
    falls back to a sound default where it has one (e.g. no deviation bound: inf) or reports it."""

    def __init__(self, op: str, question: str, why: str = ""):
        self.op, self.question, self.why = op, question, why
        msg = f"op {op!r} does not support {question}"
        super().__init__(msg + (f": {why}" if why else ""))


def one_sided(backward):
    """Marks a rule's ``backward`` as accepting ``A_upper=None``: only the lower bound is asked
    for (e.g. the certified-training loss), and it returns ``None`` for every input's upper A and
    for the upper bias. The backward interpreter passes ``A_lower`` twice to any other rule and
    drops the upper half it returns. A subclass that overrides ``backward`` is not marked."""
    backward.one_sided = True
    return backward


def register(op: str):
    """Class decorator: one registry line per rule."""
    def deco(cls):
        RULES[op] = cls()
        cls.op = op
        return cls
    return deco


def live_from_module(node, named: dict) -> dict:
    """The node's params with each parameter it holds (``params["param_names"]``: role ->
    (name, layout)) replaced by the module's live tensor of that name (autograd flows into it);
    -> (params, names used)."""
    params = dict(node.params)
    used = set()
    for role, (pname, layout) in node.params.get("param_names", {}).items():
        if pname not in named:
            continue  # a buffer or a constant: stays as traced
        ref = params[role]
        v = named[pname].to(ref.dtype)
        params[role] = v.t() if layout == "t" else v
        if tuple(params[role].shape) != tuple(ref.shape):
            raise VerifierError(f"node {node.name!r}: parameter {pname!r} has shape "
                                f"{list(params[role].shape)}, the traced graph {list(ref.shape)}: "
                                "trace the model again")
        used.add(pname)
    return params, used


class BoundRule:
    op: str = ""
    needs_bounds = False  # backward uses the inputs' intervals (nonlinear relaxations)
    sign_only = False     # the relaxation depends only on which neurons are unstable (ReLU-like)
    affine = False        # the node is affine in its inputs (IBP with a spec merges into it)
    elementwise = False   # a relaxation per element of its one input (alpha-CROWN tightens
                          # such inputs' bounds first)
    splittable = False    # branch and bound may split its input at 0 (linear on each half)
    data_movement = False  # each output element is a copy of an input element or a constant
    weight_op: str | None = None  # the op of this node with perturbed parameters
    fuses_weight_ball = False     # concretizes the ball of a weight it reads itself
    alpha_lr = 1.0  # alpha-CROWN's learning rate for this rule's parameters, as a factor
    operand_widths = False  # a product of two perturbed tensors, loose in every element in
                            # proportion to both inputs' widths (alpha-CROWN may tighten them)

    def interval(self, node, inputs: list[Interval]) -> Interval:
        raise NotSupported(self.op, "interval")

    def point(self, node, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The node's value at a point (differentiable; attacks and replays of the graph): the
        interval rule on degenerate intervals, unless a rule has a cheaper exact form."""
        return self.interval(node, [Interval(x, x) for x in inputs]).lower

    def inputs_at(self, node, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Points of the inputs that the graph can produce, from points of their boxes: ``xs``
        itself, unless the rule's inputs are related by construction (the normalized product's
        ``r`` is a function of ``c``), where the dependent input is recomputed. A rule's
        bounds hold at such points (tests sample through it)."""
        return xs

    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        """-> ([(A_lower_i, A_upper_i) per input], bias_lower, bias_upper)."""
        raise NotSupported(self.op, "backward")

    @property
    def lower_only(self) -> bool:
        """Whether ``backward`` takes ``A_upper=None`` (see ``one_sided``)."""
        return getattr(type(self).backward, "one_sided", False)

    @property
    def optimizable(self) -> bool:
        """Whether the relaxation may have free parameters (the rule defines ``alpha_init``)."""
        return type(self).alpha_init is not BoundRule.alpha_init

    def has_rows(self, node) -> bool:
        """Whether ``rows`` applies (the node is a cheap map of one vector input)."""
        return False

    def rows(self, node, idx: torch.Tensor):
        """The rows ``idx`` of a one-input affine node ``y = M x + b`` (vectors) as
        ``(M[idx]: [k, n_in], b[idx]: [k] or None)``: CROWN bounds those neurons by starting
        from its input with ``A = M[idx]``."""
        raise NotSupported(self.op, "rows")

    def constant_shift(self, node) -> torch.Tensor | None:
        """``b`` where the node is ``y = x + b`` with a constant ``b`` (graph simplification)."""
        return None

    def absorb_shift(self, node, b: torch.Tensor) -> dict | None:
        """The params of this node followed by ``+ b``, where that is the same op exactly (in
        the graph's dtype); None where it is not."""
        return None

    def channel_scale(self, node, channels: int):
        """``(w, b)``, each a ``[channels]`` vector or None, where the node is
        ``y = x * w + b`` per channel of its input (dim 0 of a sample); None where it is not
        (graph simplification, ``fold_channel_scales``)."""
        return None

    def absorb_channel_scale(self, node, w, b) -> dict | None:
        """The params of this node followed by ``* w + b`` per output channel (``w`` / ``b``
        ``[channels]`` or None), as the same op; None where the op cannot take it. The
        products are rounded: used for training bounds only."""
        return None

    def alpha_init(self, node, inputs: list[Interval], B: int, S: int, dtype):
        """Free parameters of the relaxation over the input intervals for ``S`` spec rows:
        -> (initial ``[B, S, ...]`` reproducing ``backward``'s lines, low, high) with every value
        in ``[low, high]`` sound, or None where the relaxation has no freedom here."""
        return None

    def piece_slopes(self, node) -> tuple[float, float] | None:
        """``(below, above)``: the slopes of a ``splittable`` node's two linear halves (input
        below 0, above 0; a ReLU's are (0, 1)), None for other rules. Branch and bound starts a
        new split's multiplier from them; the triangle LP (``complete/lp_refine.py``) takes
        nodes with (0, 1) only."""
        return None

    def split_point(self, node, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Where branch and bound splits each neuron's input interval ``[lower, upper]``
        (``[n, *shape]`` each) into ``[lower, s]`` and ``[s, upper]``: ``s`` (same shape,
        ``lower <= s <= upper``). Rules of element-wise nonlinearities that allow it override
        this (``splits``)."""
        raise NotSupported(self.op, "split_point")

    @property
    def splits(self) -> bool:
        """Whether branch and bound may split the node's input interval (``split_point``)."""
        return type(self).split_point is not BoundRule.split_point

    def linear_refine(self, node, inputs: list[Interval], bound_linear) -> Interval | None:
        """A sound interval of the node from bounds of linear functions of its inputs (CROWN's
        intermediate bounds ask it after IBP; the two are intersected): ``bound_linear(i, C)``
        -> (lower, upper) ``[B, S]`` of ``C·x_i`` over the leaves' sets (``C: [B, S,
        *shape_i]``). None (the default): nothing beyond the interval rule."""
        return None

    @property
    def refines_linear(self) -> bool:
        """Whether the rule defines ``linear_refine``."""
        return type(self).linear_refine is not BoundRule.linear_refine

    def mirror(self, node) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Flat indices ``(own, partner)`` (``[k]`` each, into the node's per-sample elements)
        with ``y[partner] = -y[own]`` exactly, wherever the inputs are (pairwise differences:
        ``y_ji = -y_ij``): CROWN bounds only ``own`` and ``partner``'s bounds are their
        negation. None (the default): no such pairs."""
        return None

    def patchable(self, node) -> bool:
        """Whether ``patch_step`` applies to this node."""
        return False

    def patch_step(self, node, g, vl, vu, inputs):
        """The CROWN step with A as patches ``v: [B, K, C, ph, pw]`` at windows ``g`` (a
        ``verifier.bounds.patches.Geometry``): -> ([(g_i, vl_i, vu_i) per input], bias_l, bias_u)."""
        raise NotSupported(self.op, "patch_step")

    def deviation(self, node, centers: list[torch.Tensor], devs: list[torch.Tensor]) -> torch.Tensor:
        """``d`` with ``||y - y0||_2 <= d`` per sample (``[B | 1]`` float64) when every input i
        lies within ``devs[i]`` of its value ``centers[i]`` at the sets' centers."""
        raise NotSupported(self.op, "deviation")

    def lipschitz(self, node, Ls: list[float]) -> tuple[float, float, str]:
        """A global L2 Lipschitz bound of the node as a function of the model's input, from its
        inputs' bounds ``Ls``: -> (L, the op's own constant, how it was obtained)."""
        raise NotSupported(self.op, "lipschitz")

    def lipschitz_on(self, node, ctx) -> tuple[float, float, str]:
        """An L2 Lipschitz bound of the node as a function of the model's input, for inputs in a
        domain D only (``verifier.analysis.lipschitz``'s ``domain``): ``ctx.L[name]`` (the
        inputs' constants on D), ``ctx.box[name]`` (an Interval ``[1, *shape]`` holding the node
        on all of D), ``ctx.center[name]`` (its value ``[1, *shape]`` at D's center c),
        ``ctx.radius`` (``sup_{x in D} ||x - c||_2``), ``ctx.graph``. Default: the global
        bound, which holds on every domain."""
        return self.lipschitz(node, [ctx.L[i] for i in node.inputs])

    def norm_on(self, node, ctx) -> float:
        """``N >= sup_{x in D} ||y(x)||_2`` from the inputs' ``ctx.N`` (see ``lipschitz_on``);
        rules without one raise NotSupported (the traversal then uses the interval and the
        center bounds alone)."""
        raise NotSupported(self.op, "norm_on")

    def lifted(self, node, pname: str) -> str:
        """The op this node becomes when its parameter ``pname`` is perturbed (read as an input):
        ``weight_op``, after checking the node's attributes allow it."""
        if self.weight_op is None:
            raise NotSupported(self.op, "a weight perturbation",
                               f"parameter {pname!r} is used by node {node.name!r} ({self.op}), "
                               "which cannot carry a weight perturbation (linear and conv layers can)")
        return self.weight_op

    def live_params(self, node, named: dict, modules: dict, batch_stats: dict | None):
        """-> (the node's params with the module's live parameters, the parameter names used):
        bounds computed on them carry gradients to the module (certified training)."""
        return live_from_module(node, named)


class AffineRule(BoundRule):
    """A rule for y = L(x_1, ..., x_k) + b: the same map acts on the lower and upper A. With one
    input, ``op_norm`` (an upper bound on ``||L||_2``) gives the Lipschitz and deviation bounds."""

    affine = True

    def op_norm(self, node) -> tuple[float, str]:
        """-> (an upper bound on the L2 operator norm of L, how it was obtained)."""
        raise NotSupported(self.op, "lipschitz")

    def lipschitz(self, node, Ls):
        c, how = self.op_norm(node)
        return c * Ls[0], c, how

    def deviation(self, node, centers, devs):
        return devs[0] * self.op_norm(node)[0]

    def norm_on(self, node, ctx):
        """``||L x + b|| <= ||L||_2 N[x] + ||b||`` (``b``: the map at 0)."""
        if len(node.inputs) != 1:
            raise NotSupported(self.op, "norm_on")
        x0 = torch.zeros(1, *ctx.graph[node.inputs[0]].shape, dtype=torch.float64, device="cpu")
        b = float(self.point(node, [x0.to(ctx.center[node.inputs[0]])]).detach().double().norm())
        return self.op_norm(node)[0] * ctx.N[node.inputs[0]] + b

    def transpose(self, node, A: torch.Tensor) -> list[torch.Tensor]:
        """``A·L``: the A of each input. A: [B, S, *node.shape]."""
        raise NotImplementedError

    def bias(self, node, A: torch.Tensor):
        """``A·b``: [B, S], or 0.0 when the map has no constant part."""
        return 0.0

    @one_sided
    def backward(self, node, A_lower, A_upper, inputs, alpha=None, beta=None):
        if A_upper is None:
            b_lo = self.bias(node, A_lower)
            return [(a, None) for a in self.transpose(node, A_lower)], b_lo, None
        if A_upper is A_lower:
            lo = self.transpose(node, A_lower)
            b_lo = self.bias(node, A_lower)
            return [(a, a) for a in lo], b_lo, b_lo
        # one call on both (concatenated along the spec dim): kernels such as the transposed
        # convolution cost about the same for twice the rows
        S = A_lower.shape[1]
        A = stacked(A_lower, A_upper)
        both = self.transpose(node, A)
        b = self.bias(node, A)
        b_lo, b_up = (b[:, :S], b[:, S:]) if isinstance(b, torch.Tensor) else (b, b)
        return [(a[:, :S], a[:, S:]) for a in both], b_lo, b_up


def stacked(A_lower: torch.Tensor, A_upper: torch.Tensor) -> torch.Tensor:
    """``cat([A_lower, A_upper], 1)``: a view, without copying, when the two are the halves of
    one tensor ``[B, 2S, ...]`` (as ``ElementwiseRelaxation.backward`` returns them)."""
    S = A_lower.shape[1]
    # never under autograd: the view is of A_lower alone, so no gradient would reach A_upper
    tracked = torch.is_grad_enabled() and (A_lower.requires_grad or A_upper.requires_grad)
    if (not tracked and A_lower.shape == A_upper.shape and A_lower.stride() == A_upper.stride()
            and A_lower.untyped_storage().data_ptr() == A_upper.untyped_storage().data_ptr()
            and A_upper.data_ptr() - A_lower.data_ptr() == S * A_lower.stride(1) * A_lower.element_size()):
        return A_lower.as_strided((A_lower.shape[0], 2 * S, *A_lower.shape[2:]), A_lower.stride())
    return torch.cat([A_lower, A_upper], 1)


def unbroadcast(A: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Sum ``A: [B, S, *out]`` down to ``[B, S, *shape]`` where ``shape`` broadcast to ``out``."""
    out = A.shape[2:]
    extra = len(out) - len(shape)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, (s, o) in enumerate(zip(shape, A.shape[2:])) if s == 1 and o != 1)
    if dims:
        A = A.sum(dim=dims, keepdim=True)
    return A


def dot(A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_x A[b, s, x] * t[b?, x]`` with ``t`` broadcast to the node shape -> [B, S]."""
    if t.ndim == A.ndim - 1:  # t carries the batch: [B, *shape]
        t = t.unsqueeze(1)
    return (A * t).flatten(2).sum(-1)


def pos_neg(A: torch.Tensor):
    return A.clamp(min=0), A.clamp(max=0)
