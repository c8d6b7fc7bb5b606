"""Property-based soundness (hypothesis, a bounded and derandomized number of examples): random
small architectures mixing dense and conv layers, ReLU / LeakyReLU / Sigmoid / Tanh, residual
adds, concatenations, products, BatchNorm, max and average pooling, under random L-inf / L2 / L1
balls (clipped or not) and boxes, with and without random or margin specs. For every method the
output bounds and every intermediate node's bounds must contain the true values at sampled and
PGD points (``helpers.check_sound``)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import check_sound, flat_margin_spec, random_spec
from verifier import BoundedModel, Box, LpBall

ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class VectorNet(nn.Module):
    """A plan of blocks over a vector: ("dense", act, width), ("residual", act),
    ("concat", act1, act2, w1, w2), ("product",), ("bn",)."""

    def __init__(self, n_in, plan, n_out):
        super().__init__()
        self.plan = plan
        self.layers = nn.ModuleList()
        w = n_in
        for step in plan:
            kind = step[0]
            if kind == "dense":
                self.layers.append(nn.Sequential(nn.Linear(w, step[2]), ACTS[step[1]]()))
                w = step[2]
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Linear(w, w), ACTS[step[1]](), nn.Linear(w, w)))
            elif kind == "concat":
                self.layers.append(nn.ModuleList([nn.Sequential(nn.Linear(w, step[3]), ACTS[step[1]]()),
                                                  nn.Sequential(nn.Linear(w, step[4]), ACTS[step[2]]())]))
                w = step[3] + step[4]
            elif kind == "product":
                self.layers.append(nn.ModuleList([nn.Linear(w, w), nn.Linear(w, w)]))
            elif kind == "bn":
                bn = nn.BatchNorm1d(w).eval()
                with torch.no_grad():
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.3, 3.0)
                    bn.weight.normal_()
                self.layers.append(bn)
        self.out = nn.Linear(w, n_out)

    def forward(self, x):
        h = x
        for step, layer in zip(self.plan, self.layers):
            kind = step[0]
            if kind == "residual":
                h = h + layer(h)
            elif kind == "concat":
                h = torch.cat([layer[0](h), layer[1](h)], 1)
            elif kind == "product":
                h = torch.tanh(layer[0](h)) * layer[1](h)
            else:
                h = layer(h)
        return self.out(h)


class ConvNet(nn.Module):
    """A plan over an image: ("conv", act, channels, kernel, stride, padding), ("residual", act),
    ("maxpool",), ("avgpool",), ("bn",); then flatten and a dense head."""

    def __init__(self, in_shape, plan, n_out):
        super().__init__()
        self.plan = plan
        self.layers = nn.ModuleList()
        c, h, w = in_shape
        for step in plan:
            kind = step[0]
            if kind == "conv":
                _, act, co, k, s, p = step
                self.layers.append(nn.Sequential(nn.Conv2d(c, co, k, stride=s, padding=p), ACTS[act]()))
                c, h, w = co, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), ACTS[step[1]](),
                                                 nn.Conv2d(c, c, 1)))
            elif kind == "maxpool":
                self.layers.append(nn.MaxPool2d(2, stride=1))
                h, w = h - 1, w - 1
            elif kind == "avgpool":
                self.layers.append(nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False))
                h, w = h + 1, w + 1
            elif kind == "bn":
                bn = nn.BatchNorm2d(c).eval()
                with torch.no_grad():
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.3, 3.0)
                self.layers.append(bn)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 5), nn.ReLU(), nn.Linear(5, n_out))

    def forward(self, x):
        h = x
        for step, layer in zip(self.plan, self.layers):
            h = h + layer(h) if step[0] == "residual" else layer(h)
        return self.head(h)


act = st.sampled_from(sorted(ACTS))
width = st.integers(1, 8)
vector_step = st.one_of(
    st.tuples(st.just("dense"), act, width),
    st.tuples(st.just("residual"), act),
    st.tuples(st.just("concat"), act, act, width, width),
    st.tuples(st.just("product")),
    st.tuples(st.just("bn")),
)


@st.composite
def conv_plans(draw, size):
    plan = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "maxpool", "avgpool", "bn"]))
        if kind == "conv":
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            if (size + 2 * p - k) // s + 1 < 2:
                continue
            plan.append(("conv", draw(act), draw(st.integers(1, 3)), k, s, p))
            size = (size + 2 * p - k) // s + 1
        elif kind == "maxpool":
            if size < 3:
                continue
            plan.append(("maxpool",))
            size -= 1
        else:
            plan.append((kind,) if kind != "residual" else ("residual", draw(act)))
            size += kind == "avgpool"
    return plan


@st.composite
def perturbations(draw, shape, B):
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["inf", "2", "1", "box"]))
    scale = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    if kind == "box":
        lo = torch.randn((B, *shape), generator=g)
        return Box(lo, lo + scale * torch.rand((B, *shape), generator=g))
    clip = draw(st.sampled_from([None, (0.0, 1.0)]))
    x = torch.rand((B, *shape), generator=g) if clip else torch.randn((B, *shape), generator=g)
    eps = scale * {"inf": 1.0, "2": 2.0, "1": 4.0}[kind]
    if draw(st.booleans()):
        eps = eps * (0.2 + torch.rand(B, generator=g))          # per-sample radii
    return LpBall(x, eps, kind, clip)


def _spec(kind, B, n_out, seed):
    if kind == "random":
        return random_spec(B, 2, (n_out,), seed)
    if kind == "margin":
        return flat_margin_spec(torch.arange(B) % n_out, (n_out,))
    return None


@settings(max_examples=120)
@given(n_in=st.integers(1, 5), plan=st.lists(vector_step, min_size=1, max_size=4),
       n_out=st.integers(2, 4), B=st.integers(1, 3), data=st.data(),
       spec=st.sampled_from(["none", "random", "margin"]), seed=st.integers(0, 1000))
def test_random_vector_nets_sound(n_in, plan, n_out, B, data, spec, seed):
    torch.manual_seed(seed)
    bm = BoundedModel(VectorNet(n_in, plan, n_out), input_shape=(n_in,), dtype=torch.float64)
    pert = data.draw(perturbations((n_in,), B))
    check_sound(bm, pert, spec=_spec(spec, B, n_out, seed), n_random=48, n_extreme=24,
                pgd_steps=10, restarts=1, node_neurons=4, seed=seed)


@settings(max_examples=60)
@given(size=st.integers(4, 6), c_in=st.integers(1, 2), n_out=st.integers(2, 3),
       B=st.integers(1, 2), data=st.data(), spec=st.sampled_from(["none", "random", "margin"]),
       seed=st.integers(0, 1000))
def test_random_conv_nets_sound(size, c_in, n_out, B, data, spec, seed):
    torch.manual_seed(seed)
    plan = data.draw(conv_plans(size))
    net = ConvNet((c_in, size, size), plan, n_out)
    bm = BoundedModel(net, input_shape=(c_in, size, size), dtype=torch.float64)
    pert = data.draw(perturbations((c_in, size, size), B))
    check_sound(bm, pert, spec=_spec(spec, B, n_out, seed), n_random=48, n_extreme=24,
                pgd_steps=10, restarts=1, node_neurons=4, seed=seed)
