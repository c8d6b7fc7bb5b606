"""Every registered rule answers every question a method may ask (``verifier.ops.base.QUESTIONS``)
soundly, or raises the typed ``NotSupported``; never anything else.

For each op, one small model holding it (``MODELS``: a new operator adds its line here) gives a
node and its inputs' intervals (IBP over a random box). Each question is then checked by
sampling its inputs inside those intervals (corners, uniform points), independently per input
(a superset of what the graph can reach, over which a rule must be sound too):

- interval / point: every sampled output lies inside the interval, ``point`` included;
- backward (CROWN): ``A_lower_i·x_i + bias_lower <= A_lower·y`` and the upper twin, for random A,
  and for random relaxation parameters in ``alpha_init``'s range where the rule has some;
- rows: the rows of a one-input affine map equal ``backward`` of one-hot A;
- constant_shift / absorb_shift: ``y = x + b`` exactly, and the absorbing op computes ``y + b``;
- patch_step: the patches, made dense, equal ``backward`` of the same one-hot rows;
- deviation: ``||y(x) - y(c)||_2 <= d`` for inputs sampled in L2 balls of radii ``devs``;
- lipschitz: ``||y(x + dx) - y(x)||_2 <= L ||dz||`` where each input moves by ``||dz||``;
- lifted / live_params: a known op, or NotSupported; a params dict and the names it read.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from verifier import BoundedModel, Box
from verifier.bound_types import Interval
from verifier.bounds.ibp import ibp_bounds
from verifier.bounds.patches import start_patches
from verifier.ops import RULES
from verifier.ops.base import QUESTIONS, NotSupported
from verifier.weights import ParameterSets, WeightPerturbation, WeightSegment

TOL = 1e-9


class _Mul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 4)

    def forward(self, x):
        return self.a(x) * self.b(x)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x):
        h = self.fc1(x)
        return torch.cat([F.leaky_relu(h, 0.2), h - self.fc2(h), torch.sigmoid(h)], 1)


class _MatLeft(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("M", torch.randn(3, 4))

    def forward(self, x):
        return torch.tanh(self.M @ x.view(-1, 4, 2))


class _Hard(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.erf(self.fc1(x))
        h = torch.exp(h) + h.abs() + torch.clamp(h, -0.2, 0.5)
        return F.hardswish(self.fc2(h)) + F.hardsigmoid(h) + torch.sin(3 * h) + torch.cos(h)


class _Attention(nn.Module):
    """Q K^T and (scores) V of two perturbed tensors: the einsum rule."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):                       # x: [B, 3, 4]
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        return torch.relu(s) @ self.v(x)


class _Domain(nn.Module):
    """pow (2, 3, -1.5), sqrt, rsqrt, reciprocal (through a division) and log."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc1(x)
        p = F.softplus(h) + 0.5
        q = h ** 2 + torch.pow(h, 3) + p ** -1.5 + torch.sqrt(p) + torch.rsqrt(p) + torch.log(p)
        return self.fc2(q) / p


class _Norms(nn.Module):
    """LayerNorm (variance, normalize), RMSNorm, softmax (pairdiff) and log_softmax."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6)
        self.ln, self.rms = nn.LayerNorm(6), nn.RMSNorm(6, eps=1e-5)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.ln(h) + self.rms(h)) + torch.softmax(h, -1) + F.log_softmax(h, -1)
def _prelu_net():
    net = nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 6), nn.GELU(approximate="tanh"))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.5, 3.0]))
    return net
class _Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 12)

    def forward(self, x):
        h = self.fc(x).view(-1, 3, 4)
        return torch.cat([h.amin(dim=1), h.amax(dim=(1, 2), keepdim=True).flatten(1),
                          h.mean(-1), torch.maximum(h[:, 0], h[:, 1])], 1)


def _conv_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3).eval(), nn.ReLU(),
                         nn.MaxPool2d(2), nn.ConvTranspose2d(3, 2, 2, stride=2),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


# (model, per-sample input shape, weight perturbation or None): together they hold every op
MODELS = [
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), (5,), None),
    (_Mul, (5,), None),
    (_Attention, (3, 4), None),
    (_Residual, (5,), None),
    (_MatLeft, (8,), None),
    (_conv_net, (2, 6, 6), None),
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), (5,),
     WeightPerturbation(["0.weight", "2.bias"], 0.05)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)),
     (1, 6, 6), WeightPerturbation(["0.weight", "0.bias"], 0.05)),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU()), (5,),
     WeightSegment({"0.weight": torch.randn(4, 5)}, (-0.5, 1.0))),
    (lambda: nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8),
                           nn.Softplus(beta=2.0), nn.Linear(8, 8), nn.ELU(alpha=1.5)), (5,), None),
    (_Hard, (5,), None),
    (_Domain, (5,), None),
    (_Norms, (5,), None),
    (_prelu_net, (5,), None),
    (_Reduce, (5,), None),
]


def _cases():
    """op -> (graph, node, input intervals, the source module)."""
    out = {}
    for k, (make, shape, weights) in enumerate(MODELS):
        torch.manual_seed(k)
        net = make()
        bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
        x = torch.randn(2, *shape, dtype=torch.float64)
        leaves = {bm.input: Box(x - 0.3, x + 0.3)}
        graph = bm.graph
        if weights is not None:
            sets = ParameterSets(graph, weights, torch.float64)   # no deviation annotation:
            graph, leaves = sets.graph, {**leaves, **sets.leaves}  # inputs are sampled freely
        iv = ibp_bounds(graph, leaves)
        for node in graph:
            if node.op != "input" and node.op not in out:
                out[node.op] = (graph, node, [iv[i] for i in node.inputs], net)
    return out


CASES = _cases()


def test_every_registered_rule_has_a_case():
    """A new rule must add a model holding it to MODELS (its soundness test below)."""
    assert sorted(set(RULES) - set(CASES)) == []


def _sample(iv: Interval, n: int, gen) -> torch.Tensor:
    """``n`` points of the box ``iv``: half corners, half uniform: ``[n, *iv.shape]``."""
    lo, up = iv.lower, iv.upper
    u = torch.rand((n, *lo.shape), generator=gen, dtype=lo.dtype)
    u[: n // 2] = (u[: n // 2] < 0.5).to(lo.dtype)
    return lo + u * (up - lo)


def _points(rule, node, ins, n=64, seed=0):
    """Sampled inputs (per input ``[n, B_i, ...]``) and the node's values ``[n, B, *shape]``."""
    gen = torch.Generator().manual_seed(seed)
    xs = [_sample(i, n, gen) for i in ins]
    xs = [torch.stack(t) for t in zip(*(rule.inputs_at(node, [x[k] for x in xs])
                                        for k in range(n)))]
    # a rule whose inputs are related keeps the points where the recomputed ones stay in their
    # boxes (the others are not points of the graph)
    inside = torch.ones(n, dtype=torch.bool)
    for x, iv in zip(xs, ins):
        tol = 1e-9 * (1 + x.abs())
        ok = (x >= iv.lower - tol) & (x <= iv.upper + tol)
        inside &= ok.reshape(n, -1).all(1)
    assert int(inside.sum()) >= n // 8, f"{node.op}: too few consistent points"
    xs = [x[inside] for x in xs]
    n = int(inside.sum())
    ys = torch.stack([rule.point(node, [x[k] for x in xs]) for k in range(n)])
    return xs, ys


def _ask(question, fn):
    """Run one question: its answer, or None when the rule says NotSupported. Any other
    exception fails the test, naming the question."""
    try:
        return fn()
    except NotSupported as e:
        assert e.question and e.op, "NotSupported must name the op and the question"
        return None
    except Exception as e:  # noqa: BLE001  (the test's point: nothing else may come out)
        pytest.fail(f"{question} raised {type(e).__name__}: {e}")


def _check_linear_bounds(node, xs, ys, parts, b_l, b_u, A_l, A_u):
    """Sampled values against the linear bounds of ``A·y`` (inputs whose A is None were
    concretized by the rule: their part is in the bias)."""
    val_l = (A_l.unsqueeze(0) * ys.unsqueeze(2)).flatten(3).sum(-1)   # [n, B, S]
    val_u = (A_u.unsqueeze(0) * ys.unsqueeze(2)).flatten(3).sum(-1)
    lin_l = torch.as_tensor(b_l, dtype=ys.dtype)
    lin_u = torch.as_tensor(b_u, dtype=ys.dtype)
    for x, (al, au) in zip(xs, parts):
        if al is None:
            continue
        xb = x.unsqueeze(2)                                         # [n, B_i, 1, ...]
        lin_l = lin_l + (al.unsqueeze(0) * xb).flatten(3).sum(-1)
        lin_u = lin_u + (au.unsqueeze(0) * xb).flatten(3).sum(-1)
    scale = 1 + val_l.abs()
    assert bool((lin_l <= val_l + 1e-7 * scale).all()), f"{node.op}: a lower linear bound cut a point"
    assert bool((lin_u >= val_u - 1e-7 * scale).all()), f"{node.op}: an upper linear bound cut a point"


@pytest.mark.parametrize("op", sorted(CASES))
def test_interval_and_point_contain_sampled_values(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    out = _ask("interval", lambda: rule.interval(node, ins))
    pts = _ask("point", lambda: _points(rule, node, ins))
    if out is None or pts is None:
        pytest.skip(f"{op}: interval or point not supported")
    _, ys = pts
    assert bool((ys >= out.lower - TOL).all() and (ys <= out.upper + TOL).all())


@pytest.mark.parametrize("op", sorted(CASES))
def test_backward_is_sound_for_crowns_lines_and_random_alpha(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    xs, ys = _points(rule, node, ins)
    B, S = ys.shape[1], 3
    gen = torch.Generator().manual_seed(1)
    A_l = torch.randn((B, S, *node.shape), generator=gen, dtype=ys.dtype)
    A_u = torch.randn((B, S, *node.shape), generator=gen, dtype=ys.dtype)
    got = _ask("backward", lambda: rule.backward(node, A_l, A_u, ins))
    if got is None:
        pytest.skip(f"{op}: no CROWN rule")
    _check_linear_bounds(node, xs, ys, *got, A_l, A_u)
    init = _ask("alpha_init", lambda: rule.alpha_init(node, ins, B, S, ys.dtype))
    if init is None:
        return
    a0, low, high = init
    for k in range(3):   # CROWN's start, then random values in range (the two ends included)
        if k == 0:
            a = (a0, a0)
        else:
            u = torch.rand((2, *a0.shape), generator=gen, dtype=a0.dtype)
            u = torch.where(u < 0.2, 0.0, torch.where(u > 0.8, 1.0, u))
            a = tuple(low + v * (high - low) for v in u)
        _check_linear_bounds(node, xs, ys, *rule.backward(node, A_l, A_u, ins, alpha=a), A_l, A_u)


@pytest.mark.parametrize("op", sorted(CASES))
def test_rows_and_patches_equal_dense_backward(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    needs = ins if rule.needs_bounds else None
    B = ins[0].lower.shape[0]
    dtype = ins[0].lower.dtype
    n = math.prod(node.shape)
    rows = torch.arange(0, n, max(1, n // 5))
    onehot = torch.zeros(B, rows.numel(), n, dtype=dtype)
    onehot[:, torch.arange(rows.numel()), rows] = 1.0
    onehot = onehot.view(B, rows.numel(), *node.shape)
    if not rule.has_rows(node):
        assert _ask("rows", lambda: rule.rows(node, rows)) is None
    else:
        W, b = rule.rows(node, rows)
        parts, bl, _ = rule.backward(node, onehot, onehot, needs)
        assert torch.allclose(W.expand_as(parts[0][0]), parts[0][0])
        assert torch.allclose(torch.as_tensor(0.0 if b is None else b, dtype=dtype).expand_as(bl), bl)
    patched = len(node.shape) == 3 and rule.patchable(node)
    assert patched or op not in ("conv", "affine"), f"{op}: its case must take the patch step"
    if patched:
        store = start_patches(graph, node.name, rows, dtype, B)
        g, v, _ = store.patches[node.name]
        outs, pl, pu = rule.patch_step(node, g, v, v, needs)
        parts, bl, bu = rule.backward(node, onehot, onehot, needs)
        for i, ((gi, al, au), (dl, du)) in enumerate(zip(outs, parts)):
            shape = graph[node.inputs[i]].shape
            assert torch.allclose(gi.to_dense(al, shape), dl, atol=1e-10)
            assert torch.allclose(gi.to_dense(au, shape), du, atol=1e-10)
        assert torch.allclose(torch.as_tensor(pl, dtype=dtype).expand_as(bl), bl, atol=1e-10)
        assert torch.allclose(torch.as_tensor(pu, dtype=dtype).expand_as(bu), bu, atol=1e-10)
    elif not rule.patchable(node):
        assert _ask("patch_step", lambda: rule.patch_step(node, None, None, None, needs)) is None


def _ball_points(c: torch.Tensor, d: torch.Tensor, n: int, gen) -> torch.Tensor:
    """``n`` points per sample within L2 distance ``d [B_c]`` of ``c``, most on the sphere."""
    g = torch.randn((n, *c.shape), generator=gen, dtype=c.dtype)
    norm = torch.linalg.vector_norm(g.flatten(2), dim=-1).view(n, c.shape[0], *[1] * (c.ndim - 1))
    r = torch.where(torch.rand((n, 1), generator=gen) < 0.7, 1.0,
                    torch.rand((n, 1), generator=gen)).to(c.dtype).view(n, 1, *[1] * (c.ndim - 1))
    return c + g / norm * r * d.to(c.dtype).view(1, -1, *[1] * (c.ndim - 1))


@pytest.mark.parametrize("op", sorted(CASES))
def test_deviation_holds_on_sampled_balls(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    gen = torch.Generator().manual_seed(2)
    centers = [i.center for i in ins]
    devs = [torch.rand(c.shape[0], generator=gen, dtype=torch.float64) * 0.5 for c in centers]
    d = _ask("deviation", lambda: rule.deviation(node, centers, devs))
    if d is None:
        return
    y0 = rule.point(node, centers)
    pts = [_ball_points(c, dv, 64, gen) for c, dv in zip(centers, devs)]
    for k in range(64):
        y = rule.point(node, [p[k] for p in pts])
        dist = torch.linalg.vector_norm((y - y0).flatten(1), dim=1)
        assert bool((dist <= d * (1 + 1e-9) + 1e-9).all()), f"{op}: deviation {d} < {dist}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_lipschitz_bound_holds_on_sampled_moves(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    got = _ask("lipschitz", lambda: rule.lipschitz(node, [1.0] * len(ins)))
    if got is None:
        return
    L, c, how = got
    assert isinstance(how, str) and L >= 0 and c >= 0
    gen = torch.Generator().manual_seed(3)
    xs, ys = _points(rule, node, ins, n=32)
    for k in range(32):
        step = float(torch.rand((), generator=gen)) * 0.2 + 1e-3  # ||dz||: each input moves by it
        moved = []
        for x in xs:
            g = torch.randn(x[k].shape, generator=gen, dtype=x.dtype)
            moved.append(x[k] + step * g / torch.linalg.vector_norm(g.flatten(1), dim=1).view(
                -1, *[1] * (g.ndim - 1)))
        dy = torch.linalg.vector_norm((rule.point(node, moved) - ys[k]).flatten(1), dim=1)
        assert bool((dy <= L * step * (1 + 1e-9) + 1e-12).all()), f"{op}: {dy} > {L} * {step}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_lifted_and_live_params_answer_or_say_not_supported(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    lifted = _ask("lifted", lambda: rule.lifted(node, "p"))
    assert lifted is None or lifted in RULES
    graph, node, ins, net = CASES[op]
    named = dict(net.named_parameters())
    got = _ask("live_params", lambda: rule.live_params(node, named, dict(net.named_modules()), None))
    if got is not None:
        params, used = got
        assert isinstance(params, dict) and used <= set(named)
        for role, (pname, layout) in node.params.get("param_names", {}).items():
            assert pname not in named or pname in used, f"{op}: live params skip {pname}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_constant_shift_and_absorb_shift_are_exact(op):
    graph, node, ins, _ = CASES[op]
    rule = RULES[op]
    xs, ys = _points(rule, node, ins, n=8)
    b = _ask("constant_shift", lambda: rule.constant_shift(node))
    if b is not None:   # y = x + b
        assert all(torch.equal(ys[k], xs[0][k] + b) for k in range(8))
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(node.shape[-1:], generator=gen, dtype=ys.dtype)
    # (a bias that is a named parameter is never absorbed: drop the names to see the fold)
    plain = replace(node, params={k: v for k, v in node.params.items() if k != "param_names"})
    params = _ask("absorb_shift", lambda: rule.absorb_shift(plain, row))
    assert params is not None or op != "linear", "a dense layer must absorb a row bias"
    if params is not None:   # the same op with these params computes y + row
        moved = replace(node, params=params)
        for k in range(8):
            got = rule.point(moved, [x[k] for x in xs])
            assert torch.allclose(got, ys[k] + row, rtol=1e-12, atol=1e-12)


def test_questions_are_the_ones_checked_here():
    """A new question on BoundRule needs a check in this file."""
    assert set(QUESTIONS) == {"interval", "point", "backward", "alpha_init", "rows", "patch_step",
                              "deviation", "lipschitz", "lifted", "live_params",
                              "constant_shift", "absorb_shift"}
