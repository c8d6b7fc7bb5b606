"""Branch and bound chooses by the inputs that vary: a generator in front of a ReLU classifier,
800 inputs of which 8 vary, is split over those 8 (in their subspace); the subspace model
agrees with the full one; unsat where ReLU splits get stuck, sat with a replayed
counterexample."""
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from verifier import BoundedModel
from verifier.complete import verify
from verifier.complete.input_bab import input_split_bab
from verifier.complete.relu_bab import relu_split_bab
from verifier.complete.subspace import SubspaceModel, foldable
from verifier.ops.activation import SShaped
from verifier.ops.base import BoundRule
from verifier.complete.verify import INPUT_SPLITS, NEURON_SPLITS, RELU_SPLITS, _split_strategy, varying_inputs
from verifier.perturbation import Box
from verifier.spec.vnnlib import parse_vnnlib

N_IN, N_VARY = 800, 8


def _generator_classifier(seed=0, w0=8.0, w1=3.0):
    """A tanh/sigmoid generator of 800 inputs (the first 8 steep) and a small ReLU classifier
    with one output; the fixed inputs: a random point; the box: [-1, 1] on the first 8."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(N_IN, 32), nn.Tanh(), nn.Linear(32, 48), nn.Sigmoid(),
                        nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        net[0].weight[:, :N_VARY] *= w0
        net[2].weight *= w1
    g = torch.Generator().manual_seed(1)
    base = torch.rand(N_IN, generator=g) * 2 - 1
    lo, hi = base.clone(), base.clone()
    lo[:N_VARY], hi[:N_VARY] = -1, 1
    return net, lo, hi


def _pgd_min(net, lo, hi, n=1000, steps=60):
    """The least output found by sampling and signed-gradient descent (plain torch)."""
    g = torch.Generator().manual_seed(2)
    x = (lo + torch.rand(n, N_IN, generator=g) * (hi - lo)).requires_grad_(True)
    for _ in range(steps):
        gr, = torch.autograd.grad(net(x).sum(), x)
        with torch.no_grad():
            x -= 0.02 * gr.sign()
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    with torch.no_grad():
        y = net(x)[:, 0]
    return float(y.min()), x[y.argmin()].detach()


def _spec_text(lo, hi, d):
    lines = [f"(declare-const X_{i} Real)" for i in range(N_IN)] + ["(declare-const Y_0 Real)"]
    for i in range(N_IN):
        lines += [f"(assert (>= X_{i} {float(lo[i])!r}))", f"(assert (<= X_{i} {float(hi[i])!r}))"]
    lines.append(f"(assert (<= Y_0 {d!r}))")
    return "\n".join(lines) + "\n"


def _onnx(net, path):
    """The Sequential as an ONNX file (Gemm and activations), input [1, 800]."""
    acts = {nn.ReLU: "Relu", nn.Tanh: "Tanh", nn.Sigmoid: "Sigmoid"}
    nodes, inits, cur = [], [], "x"
    for i, m in enumerate(net):
        out = f"v{i}"
        if isinstance(m, nn.Linear):
            inits += [numpy_helper.from_array(m.weight.detach().numpy(), f"W{i}"),
                      numpy_helper.from_array(m.bias.detach().numpy(), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [out], transB=1))
        else:
            nodes.append(helper.make_node(acts[type(m)], [cur], [out]))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    g = helper.make_graph(nodes, "gen", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_varying_inputs_are_counted_in_float64_over_all_regions():
    # 0.1 is no float32: its rounded box has one ulp of width, yet the input is fixed
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const X_2 Real)\n"
            "(declare-const Y_0 Real)\n"
            "(assert (or (and (>= X_0 0.1) (<= X_0 0.1) (>= X_1 0) (<= X_1 1) (>= X_2 2) (<= X_2 2))"
            "            (and (>= X_0 0.1) (<= X_0 0.1) (>= X_1 0) (<= X_1 0) (>= X_2 1) (<= X_2 3))))\n"
            "(assert (<= Y_0 0))\n")
    spec = parse_vnnlib(text)
    assert varying_inputs(spec).tolist() == [False, True, True]


def test_the_strategy_follows_the_varying_inputs_not_the_input_size():
    net, lo, hi = _generator_classifier()
    bm = BoundedModel(net, input_shape=(N_IN,))
    spec = parse_vnnlib(_spec_text(lo, hi, 0.0))
    assert _split_strategy(bm, spec, True, 16) is INPUT_SPLITS
    assert _split_strategy(bm, spec, True, 7) is NEURON_SPLITS   # its generator has sigmoids
    assert _split_strategy(bm, spec, False, 16) is None


def test_subspace_model_matches_the_full_model_and_its_bounds_hold():
    net, lo, hi = _generator_classifier()
    bm = BoundedModel(net, input_shape=(N_IN,))
    assert foldable(bm.graph, bm.input)
    vary = torch.arange(N_VARY)
    sub = SubspaceModel(bm, vary, lo.double())
    assert sub.input_shape == (N_VARY,) and bm.input_shape == (N_IN,)   # the model is untouched
    g = torch.Generator().manual_seed(3)
    v = -1 + 2 * torch.rand(256, N_VARY, generator=g)
    x = sub.lift(v)
    assert torch.equal(sub.restrict(x), v) and torch.equal(x[:, N_VARY:], lo[N_VARY:].expand(256, -1))
    with torch.no_grad():
        np.testing.assert_allclose(sub.graph_forward(v).numpy(), net(x).numpy(), atol=2e-5)
    # CROWN over sub-boxes of the subspace bounds the full model at the lifted points
    blo = -1 + torch.rand(4, N_VARY, generator=g)
    bhi = blo + 0.5 * torch.rand(4, N_VARY, generator=g)
    from verifier.bounds.crown import crown
    with torch.no_grad():
        res = crown(sub.graph, {sub.input: Box(blo, bhi)}, None)
        pts = blo.unsqueeze(1) + torch.rand(4, 500, N_VARY, generator=g) * (bhi - blo).unsqueeze(1)
        y = net(sub.lift(pts.reshape(-1, N_VARY))).reshape(4, 500)
    assert bool((y >= res.lower - 1e-5).all()) and bool((y <= res.upper + 1e-5).all())


FRONTS = {
    # net, input shape
    "flatten_then_dense": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 10), nn.Tanh(),
                                                 nn.Linear(10, 3)), (1, 6, 6)),
    "flat_input_into_relu": (lambda: nn.Sequential(nn.ReLU(), nn.Linear(36, 3)), (36,)),
    "dense_skip_sum": (lambda: _DenseSkip(), (36,)),
    "all_affine": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Linear(5, 3)), (1, 6, 6)),
}


class _DenseSkip(nn.Module):
    """Two dense layers and a sum of both (all affine), a slice, then ReLUs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(36, 12), nn.Linear(12, 12)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        h = self.a(x)
        return self.head(h + self.b(h)) + self.b(h)[:, :3]


@pytest.mark.parametrize("name", sorted(FRONTS))
def test_fixed_inputs_fold_through_any_affine_front(name):
    """Whatever reads the input (a reshape, a ReLU directly, a skip sum, an all-affine net),
    the folded model equals the full one at lifted points, has ``n_vary`` inputs and no node
    of the front left, and its CROWN bounds over sub-boxes hold on the full model."""
    from verifier.bounds.crown import crown
    from verifier.complete.subspace import affine_front
    torch.manual_seed(7)
    build, shape = FRONTS[name]
    net = build().eval()
    bm = BoundedModel(net, input_shape=shape)
    n_in = int(np.prod(shape))
    g = torch.Generator().manual_seed(5)
    base = torch.rand(n_in, generator=g) * 2 - 1
    vary = torch.tensor([0, 7, 13, n_in - 1])
    assert foldable(bm.graph, bm.input, len(vary))
    sub = SubspaceModel(bm, vary, base.double())
    assert sub.input_shape == (4,) and sub.graph[sub.input].shape == (4,)
    front, frontier = affine_front(bm.graph, bm.input)
    gone = set(front) - set(frontier) - {bm.input}
    assert not gone & {n.name for n in sub.graph}
    assert all(sub.graph[f if f != bm.input else f"{f}__lift"].inputs == [sub.input] for f in frontier)
    v = torch.rand(64, 4, generator=g) * 2 - 1
    x = sub.lift(v)
    assert x.shape == (64, *shape) and torch.equal(sub.restrict(x), v)
    with torch.no_grad():
        np.testing.assert_allclose(sub.graph_forward(v).numpy(), net(x).numpy(), atol=2e-5)
        blo = -1 + torch.rand(3, 4, generator=g)
        bhi = blo + 0.6 * torch.rand(3, 4, generator=g)
        res = crown(sub.graph, {sub.input: Box(blo, bhi)}, None)
        pts = blo.unsqueeze(1) + torch.rand(3, 400, 4, generator=g) * (bhi - blo).unsqueeze(1)
        y = net(sub.lift(pts.reshape(-1, 4))).reshape(3, 400, -1)
    assert bool((y >= res.lower.unsqueeze(1) - 1e-5).all())
    assert bool((y <= res.upper.unsqueeze(1) + 1e-5).all())


def test_a_front_that_ends_in_a_feature_map_is_not_folded():
    """A convolution's output folded into a dense layer would make the patch-form passes after
    it dense: such fronts (a conv on the image, an image read by a ReLU) are left alone."""
    for net, shape in ((nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(64, 3)), (1, 6, 6)),
                       (nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)), (1, 6, 6))):
        bm = BoundedModel(net.eval(), input_shape=shape)
        assert not foldable(bm.graph, bm.input, 4)
        with pytest.raises(ValueError, match="feature map"):
            SubspaceModel(bm, torch.arange(4), torch.zeros(36, dtype=torch.float64))


def test_folding_refuses_oversized_fronts(monkeypatch):
    from verifier.complete import subspace
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 10), nn.ReLU(), nn.Linear(10, 3))
    bm = BoundedModel(net, input_shape=(1, 6, 6))
    assert foldable(bm.graph, bm.input, 4)
    monkeypatch.setattr(subspace, "MAX_FOLD_ENTRIES", 39)     # 10 outputs x 4 inputs = 40
    assert not foldable(bm.graph, bm.input, 4)
    with pytest.raises(ValueError, match="cannot be folded"):
        SubspaceModel(bm, torch.arange(4), torch.zeros(36, dtype=torch.float64))


@pytest.fixture(scope="module")
def instance():
    net, lo, hi = _generator_classifier()
    m, x_star = _pgd_min(net, lo, hi)
    return net, lo, hi, m, x_star


@pytest.fixture
def relu_only(monkeypatch):
    """Branch and bound splits ReLUs only, as for a generator whose nonlinearities have no
    split rule: tanh and sigmoid lose theirs (``BoundRule.splits`` is then false)."""
    monkeypatch.setattr(SShaped, "split_point", BoundRule.split_point)


@pytest.mark.slow
def test_relu_splits_alone_run_out_of_neurons(instance, relu_only):
    """The class of instances the input splits are for (about 10 s)."""
    net, lo, hi, m, _ = instance
    bm = BoundedModel(net, input_shape=(N_IN,))
    d = m - 0.005
    # ReLU splits alone run out of neurons: the tanh / sigmoid relaxations stay loose
    r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                       deadline=time.perf_counter() + 30)
    assert r.status == "unknown" and "no unstable neuron left" in r.reason, r


def test_input_splits_prove_what_relu_splits_cannot(instance):
    net, lo, hi, m, _ = instance
    bm = BoundedModel(net, input_shape=(N_IN,))
    d = m - 0.005                       # below the least output found: unsat
    t0 = time.perf_counter()
    v = verify(bm, parse_vnnlib(_spec_text(lo, hi, d)), timeout=30)
    assert v.status == "unsat" and v.method == "bab-input", v
    assert time.perf_counter() - t0 < 15
    # the subspace's sub-boxes cover the 8 varying inputs: the run is fast
    r = input_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([d])],
                        deadline=time.perf_counter() + 30)
    assert r.status == "unsat" and r.domains < 20000


def test_counterexample_of_the_subspace_replays_on_onnxruntime(instance, tmp_path):
    net, lo, hi, m, x_star = instance
    d = m + 0.002                       # the PGD minimizer violates y <= d
    path = _onnx(net, tmp_path / "gen.onnx")
    spec = tmp_path / "p.vnnlib"
    spec.write_text(_spec_text(lo, hi, d))
    v = verify(str(path), str(spec), timeout=30, attack=False)   # branch and bound finds it
    assert v.status == "sat" and v.method == "bab-input", v
    cex = v.counterexample
    assert cex.replayed_by == "onnxruntime"
    x = cex.x.astype(np.float32)
    np.testing.assert_array_equal(x[N_VARY:], lo[N_VARY:].numpy())      # fixed inputs kept
    assert np.all(x >= lo.numpy()) and np.all(x <= hi.numpy())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.reshape(1, -1)})[0].reshape(-1)
    assert y[0] <= d


def test_relu_splits_that_run_out_hand_their_domains_to_input_splits(instance, relu_only):
    """Forced onto ReLU splits (max_split_inputs=0), the run no longer ends "no unstable
    neuron left": the stuck domains, with their split constraints as prior intervals, are
    split over the varying inputs until closed."""
    net, lo, hi, m, _ = instance
    bm = BoundedModel(net, input_shape=(N_IN,))
    d = m - 0.005
    v = verify(bm, parse_vnnlib(_spec_text(lo, hi, d)), timeout=40, max_split_inputs=0)
    assert v.status == "unsat" and v.method == "bab-relu", v
    assert "closed by input splits" in v.reason


def test_stuck_domains_give_one_domain_whose_intervals_hold_on_their_points(instance, relu_only):
    """The input-split domain made of the stuck ReLU-split domains: the box, with intervals
    that hold at every sampled point of the box satisfying one stuck domain's splits."""
    from verifier.bounds.forward import evaluate
    from verifier.complete.fallback import stuck_domains
    from verifier.complete.relu_bab import ReluFrontier
    net, lo, hi, m, _ = instance
    bm = BoundedModel(net, input_shape=(N_IN,))
    r = relu_split_bab(bm, lo, hi, [torch.tensor([[1.0]])], [torch.tensor([m - 0.005])],
                       deadline=time.perf_counter() + 30)
    assert r.status == "unknown" and isinstance(r.left, ReluFrontier), r
    start = stuck_domains(r.left)
    q, P = r.left.q, r.left.P
    stuck = (q["which"] < 0).nonzero().flatten()
    assert stuck.numel() > 0 and start["lo"].shape[0] == 1
    assert torch.equal(start["lo"][0], lo) and torch.equal(start["hi"][0], hi)
    g = torch.Generator().manual_seed(5)
    x = lo + torch.rand(20000, N_IN, generator=g) * (hi - lo)
    with torch.no_grad():
        _, vals = evaluate(bm.graph, {bm.input: x})
    seen = torch.zeros(x.shape[0], dtype=torch.bool)
    for j in stuck.tolist():
        ok = torch.ones(x.shape[0], dtype=torch.bool)
        for rl in P.relus:
            s = q["sg"][rl][j].flatten()
            z = vals[P.pre[rl]].flatten(1)
            ok &= ((s == 0) | ((s > 0) & (z >= 0)) | ((s < 0) & (z <= 0))).all(1)
        seen |= ok
    assert seen.any()
    for k in [k[2:] for k in start if k.startswith("l:")]:
        z = vals[k][seen]
        assert bool((z >= start["l:" + k][0] - 1e-5).all() and (z <= start["u:" + k][0] + 1e-5).all())
