"""Perturbed weights of linear layers that act on token sequences ``[B, T, in]`` (one W for every
token, as in a transformer): every method's bounds contain sampled and attacked truths.

Truth comes from the source module in float64 run by ``torch.func.functional_call`` with its
parameters (and input) replaced by points of the sets: uniform points, vertices (L-inf), points
on and inside the sphere (L2), and a joint signed-gradient attack on weights and input pushing
every output and every margin up and down. Independent of the verifier's own graph evaluation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from verifier import BoundedModel, Box, LpBall, margin_spec
from verifier.analysis.lora import ADAPTERS, adapters, add_lora
from verifier.bounds.deviation import deviations
from verifier.weights import ParameterSets, WeightPerturbation, WeightSegment

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")


class TokenMLP(nn.Module):
    """Two token-wise layers, the mean over tokens, a head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean(1))


class TinyAttention(nn.Module):
    """One pre-norm-free attention block with a residual, a token-wise ReLU layer, a head."""

    def __init__(self, tokens=4, dim=6):
        super().__init__()
        self.t, self.d = tokens, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.head = nn.Linear(dim, 8), nn.Linear(8, 3)

    def forward(self, x):
        d = self.d
        qkv = self.qkv(x)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        h = x + self.proj(att @ v)
        return self.head(torch.relu(self.fc(h)).mean(1))


def _module(name):
    torch.manual_seed(11)
    if name == "lora":   # adapters on both token layers: chains of two perturbed linear layers
        m = add_lora(TokenMLP(), ["a", "b"], rank=2, alpha=4.0)
        with torch.no_grad():
            for ad in adapters(m).values():
                ad.lora_B.weight.normal_(0.0, 0.3)
        return m.eval(), (5, 6)
    m = TokenMLP() if name == "mlp" else TinyAttention()
    return m.eval(), ((5, 6) if name == "mlp" else (4, 6))


def _sets(module, case):
    """-> (list of WeightPerturbation, {name: (norm, eps)}) for a case."""
    names = [n for n, _ in module.named_parameters()]
    if any(".lora_" in n for n in names):
        lora = [n for n in names if ".lora_" in n]
        if case == "inf":
            return [WeightPerturbation(ADAPTERS, 0.02)], {n: (math.inf, 0.02) for n in lora}
        return ([WeightPerturbation(lora[0], 0.1, norm=2), WeightPerturbation(lora[1:], 0.01)],
                {lora[0]: (2.0, 0.1), **{n: (math.inf, 0.01) for n in lora[1:]}})
    if case == "inf":
        chosen = {n: (math.inf, 0.02) for n in names if not n.startswith("head")
                  and (n.endswith("weight") or n == names[1])}     # every weight, the first bias
        return [WeightPerturbation(list(chosen), 0.02)], chosen
    first, second = names[0], names[2]     # the first two weights: L2 on one, L-inf on the other
    chosen = {first: (2.0, 0.15), second: (math.inf, 0.01)}
    return [WeightPerturbation(first, 0.15, norm=2), WeightPerturbation(second, 0.01)], chosen


def _project(w, c, norm, eps):
    if norm == math.inf:
        return c + (w - c).clamp(-eps, eps)
    d = w - c
    n = torch.linalg.vector_norm(d.flatten(1), dim=1).view(-1, *([1] * (d.ndim - 1)))
    return c + d * torch.clamp(eps / n.clamp(min=1e-30), max=1.0)


def _truth(module, x, chosen, input_eps, n=300, steps=20):
    """All float64 outputs ``[M, B, out]`` reached by samples and attacks."""
    net = module.double()
    base = {k: v.detach() for k, v in net.named_parameters()}
    x0 = x.double()
    gen = torch.Generator().manual_seed(0)

    def run(params, xs):  # [n, ...] params and inputs -> [n, B, out]
        full = {k: params.get(k, v.expand(xs.shape[0], *v.shape)) for k, v in base.items()}
        return torch.vmap(lambda p, xi: functional_call(net, p, (xi,)))(full, xs)

    outs = []
    for kind in range(3):     # uniform, vertices, on the sphere (L2) / vertices
        ps = {}
        for k, (norm, eps) in chosen.items():
            c = base[k]
            if norm == math.inf:
                u = torch.rand((n, *c.shape), generator=gen, dtype=torch.float64) * 2 - 1
                ps[k] = c + eps * (u if kind == 0 else u.sign())
            else:
                g = torch.randn((n, *c.shape), generator=gen, dtype=torch.float64)
                g = g / torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *([1] * c.ndim))
                r = torch.rand((n, *([1] * c.ndim)), generator=gen, dtype=torch.float64) if kind == 0 else 1.0
                ps[k] = c + eps * (1 - 1e-9) * r * g
        u = torch.rand((n, *x0.shape), generator=gen, dtype=torch.float64) * 2 - 1
        xs = x0 + input_eps * (u if kind == 0 else u.sign())
        outs.append(run(ps, xs))
    n_out = outs[0].shape[-1]
    with torch.enable_grad():
        objectives = [(j, None, s) for j in range(n_out) for s in (1.0, -1.0)]
        objectives += [(j, k, 1.0) for j in range(n_out) for k in range(n_out) if j != k]
        for j, k, sgn in objectives:
            ws = {k2: base[k2].clone().unsqueeze(0) for k2 in chosen}
            xi = x0.clone().unsqueeze(0)
            for it in range(steps):
                for t in list(ws.values()) + [xi]:
                    t.requires_grad_(True)
                out = run(ws, xi)[0]
                obj = out[:, j] - (out[:, k] if k is not None else 0.0)
                g = torch.autograd.grad((sgn * obj).sum(), list(ws.values()) + [xi])
                frac = 0.25 * (1 - it / steps) + 0.02
                with torch.no_grad():
                    new = {}
                    for (name, w), gw in zip(ws.items(), g):
                        norm, eps = chosen[name]
                        if norm == math.inf:
                            step = frac * eps * gw.sign()
                        else:
                            step = frac * eps * gw / torch.linalg.vector_norm(gw).clamp(min=1e-30)
                        new[name] = _project(w + step, base[name].unsqueeze(0), norm, eps)
                    ws = new
                    xi = x0 + (xi + frac * input_eps * g[-1].sign() - x0).clamp(-input_eps, input_eps)
            with torch.no_grad():
                outs.append(run(ws, xi))
    return torch.cat(outs)


@pytest.mark.parametrize("model", ["mlp", "attention", "lora"])
@pytest.mark.parametrize("case", ["inf", "mixed"])
@pytest.mark.parametrize("input_eps", [0.0, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_token_weight_bounds_are_sound(model, case, input_eps, dtype):
    module, shape = _module(model)
    bm = BoundedModel(module, input_shape=shape, dtype=dtype)
    sets, chosen = _sets(module, case)
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(1)) - 0.5
    outs = _truth(module, x, chosen, input_eps)          # [M, B, out] float64
    n_out = outs.shape[-1]
    labels = torch.tensor([0, 1])
    C = margin_spec(labels, n_out, dtype)
    margins = torch.einsum("bso,mbo->mbs", C.double(), outs)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    pert = LpBall(x.to(dtype), input_eps) if input_eps > 0 else x.to(dtype)
    for method in METHODS:
        r = bm.bounds(pert, method, weights=sets)
        lo, up = r.lower.double(), r.upper.double()
        assert (outs >= lo - tol * (1 + lo.abs())).all(), (method, (outs - lo).min())
        assert (outs <= up + tol * (1 + up.abs())).all(), (method, (up - outs).min())
        rc = bm.bounds(pert, method, C, weights=sets)
        lo = rc.lower.double()
        assert (margins >= lo - tol * (1 + lo.abs())).all(), (method, "margin", (margins - lo).min())


def test_token_layer_with_fixed_input_is_exact():
    """One token-wise layer, fixed input, one weight ball: every output entry ``y_to`` moves by
    exactly ``eps·||x_t||_1`` (L-inf) or ``eps·||x_t||_2`` (L2), the worst row put on it."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(5, 3)).eval()
    bm = BoundedModel(module, input_shape=(4, 5))
    x = torch.rand(2, 4, 5) - 0.5
    y = module(x).detach()
    for norm, dual in ((math.inf, 1), (2, 2)):
        rad = 0.1 * torch.linalg.vector_norm(x, ord=dual, dim=-1, keepdim=True)
        for method in METHODS:
            r = bm.bounds(x, method, weights=WeightPerturbation("0.weight", 0.1, norm=norm))
            assert torch.allclose(r.lower, y - rad, atol=1e-5), (norm, method)
            assert torch.allclose(r.upper, y + rad, atol=1e-5), (norm, method)


def test_token_sum_through_a_shared_weight_is_exact():
    """``sum_t y_t`` of one token-wise layer with a fixed input is linear in W with coefficient
    ``s = sum_t x_t``: each output's exact range is ``± eps·||s||_1`` (L-inf) or ``± eps·||s||_2``
    (L2, the whole radius on its row), tighter than the per-token sum that the triangle
    inequality gives; CROWN must attain it."""
    torch.manual_seed(5)

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x).sum(1)

    module = Sum().eval()
    bm = BoundedModel(module, input_shape=(4, 5), dtype=torch.float64)
    x = torch.rand(1, 4, 5, dtype=torch.float64) - 0.5
    y = module.double()(x).detach()
    s = x.sum(1)
    C = torch.eye(3, dtype=torch.float64)[None]
    for norm, rad in ((math.inf, 0.1 * s.abs().sum()),
                      (2, 0.1 * torch.linalg.vector_norm(s))):
        r = bm.bounds(x, "crown", C, weights=WeightPerturbation("fc.weight", 0.1, norm=norm))
        assert torch.allclose(r.upper, y + rad, atol=1e-9), norm
        assert torch.allclose(r.lower, y - rad, atol=1e-9), norm
        # the triangle bound per token would be strictly larger here
        assert rad < 0.1 * torch.linalg.vector_norm(x, ord=1 if norm == math.inf else 2, dim=-1).sum()


def test_token_layer_deviation_covers_a_moved_bias():
    """The certified L2 deviation of a token-wise layer whose bias moves counts the bias once per
    token: with ``y = mean_t(x_t W^T + b)`` the output moves by exactly ``db``, ``||db||_2 =
    eps·sqrt(out)`` at a vertex of the L-inf box."""

    class MeanLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x).mean(1)

    torch.manual_seed(2)
    module = MeanLayer().eval()
    bm = BoundedModel(module, input_shape=(4, 5), dtype=torch.float64)
    x = torch.rand(1, 4, 5, dtype=torch.float64)
    sets = ParameterSets(bm.graph, WeightPerturbation("fc.bias", 0.1), torch.float64)
    leaves = {bm.graph.leaves[0]: Box(x, x), **sets.leaves}
    _, d = deviations(sets.graph, leaves)
    moved = 0.1 * math.sqrt(3)
    assert float(d[sets.graph.output].max()) >= moved * (1 - 1e-9)


def test_zero_segment_after_a_layernorm_equals_the_model():
    """A segment with t0 = t1 = 0 behind a LayerNorm (whose variance has no deviation bound):
    a weight that does not move adds no deviation (no 0·inf), the bounds are the model's value."""

    class LnNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.head = nn.LayerNorm(6), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.ln(x))).mean(1))

    torch.manual_seed(4)
    module = LnNet().eval()
    bm = BoundedModel(module, input_shape=(5, 6))
    x = torch.rand(2, 5, 6)
    seg = WeightSegment({"fc.weight": torch.randn(8, 6)}, t=(0.0, 0.0))
    for method in ("ibp", "crown"):
        r = bm.bounds(x, method, weights=seg)
        assert torch.isfinite(r.lower).all() and torch.isfinite(r.upper).all(), method
        assert torch.allclose(r.lower, module(x), atol=1e-4) and torch.allclose(r.upper, module(x), atol=1e-4)


def test_onnx_token_layers_match_the_pytorch_graph(tmp_path):
    """The ONNX export stores a token layer's weight transposed (MatMul): its bounds under the
    same sets equal those of the PyTorch graph (whose soundness the tests above check)."""
    torch.manual_seed(0)
    module = TokenMLP().eval()
    x = torch.rand(2, 5, 6) - 0.5
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(module, x[:1], str(path), dynamo=False)
    onnx_model = BoundedModel.from_onnx(str(path))
    torch_model = BoundedModel(module, input_shape=(5, 6))
    first = next(n for n, v in onnx_model.parameters().items() if tuple(v.shape) == (6, 10))
    for norm, eps in ((math.inf, 0.02), (2, 0.1)):
        for pert in (x, LpBall(x, 0.02)):
            a = onnx_model.bounds(pert, "crown", weights=WeightPerturbation(first, eps, norm=norm))
            b = torch_model.bounds(pert, "crown", weights=WeightPerturbation("a.weight", eps, norm=norm))
            assert torch.allclose(a.lower, b.lower, atol=1e-5) and torch.allclose(a.upper, b.upper, atol=1e-5)
