"""The certified-training loss's fast CROWN-IBP pass: a lower-side-only backward pass
(``upper=False``), the IBP intervals reused (``intervals=``), BatchNorm folded into the
convolution / dense layer before it (``fold_channel_scales``). Each piece is checked against the
plain computation (differential), and the loss's bounds against sampled and PGD points of the
network (BatchNorm in eval mode and in training mode with the batch's statistics)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import frozen_stats_copy, randomize_batchnorm  # noqa: E402
from models import cnn_cert, mlp, resnet_block_net, small_cnn  # noqa: E402

from verifier import BoundedModel, LpBall, margin_spec  # noqa: E402
from verifier.attack import pgd  # noqa: E402
from verifier.bounds.backward import backward_bound  # noqa: E402
from verifier.bounds.crown import crown  # noqa: E402
from verifier.bounds.forward import evaluate  # noqa: E402
from verifier.bounds.ibp import ibp_bounds  # noqa: E402
from verifier.errors import VerifierError  # noqa: E402
from verifier.graph.live import BatchStats  # noqa: E402
from verifier.graph.simplify import fold_channel_scales  # noqa: E402
from verifier.train.losses import certified_margins  # noqa: E402


def _sigmoid_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 12),
                         nn.BatchNorm1d(12), nn.LeakyReLU(0.1), nn.Linear(12, 10))


NETS = {
    "mlp": (lambda: mlp(64, [32, 16], 10), (1, 8, 8)),
    "small_cnn": (lambda: small_cnn(1, 10, 8, width=4), (1, 8, 8)),
    "cnn_cert_bn": (lambda: cnn_cert(1, 10, 8, width=4, fc=16, bn=True), (1, 8, 8)),
    "resnet": (lambda: resnet_block_net(1, 10, width=4, n_blocks=1), (1, 8, 8)),
    "sigmoid_bn": (_sigmoid_net, (1, 8, 8)),
}


def _make(name, seed=0):
    torch.manual_seed(seed)
    build, shape = NETS[name]
    net = build()
    randomize_batchnorm(net, seed)
    return net.eval(), shape


def _batch(shape, n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("name", sorted(NETS))
def test_lower_only_pass_equals_the_two_sided_pass_lower_bound(name):
    """The one-sided pass (one_sided rules; the others compute and drop their upper half)
    gives the same lower bound as the usual pass, and no upper bound."""
    net, shape = _make(name)
    bm = BoundedModel(net, input_shape=shape)
    x, y = _batch(shape)
    C = margin_spec(y, 10)
    leaves = {bm.input: LpBall(x, 0.05, clip=(0, 1))}
    bounds = ibp_bounds(bm.graph, leaves)
    lo2, up2 = backward_bound(bm.graph, bm.graph.output, C, bounds, leaves)
    lo1, up1 = backward_bound(bm.graph, bm.graph.output, C, bounds, leaves, upper=False)
    assert up1 is None and up2 is not None
    torch.testing.assert_close(lo1, lo2, rtol=0, atol=1e-6)
    assert (lo2 <= up2).all()


@pytest.mark.parametrize("name", ["cnn_cert_bn", "resnet", "sigmoid_bn"])
def test_reused_intervals_give_the_same_crown_ibp_bounds(name):
    net, shape = _make(name, seed=2)
    bm = BoundedModel(net, input_shape=shape)
    x, y = _batch(shape, seed=3)
    C = margin_spec(y, 10)
    ball = LpBall(x, 0.04, clip=(0, 1))
    ibp = bm.bounds(ball, "ibp", spec=C)
    plain = bm.bounds(ball, "crown-ibp", spec=C)
    reused = bm.bounds(ball, "crown-ibp", spec=C, intervals=ibp.nodes)
    torch.testing.assert_close(reused.lower, plain.lower, rtol=0, atol=1e-6)
    torch.testing.assert_close(reused.upper, plain.upper, rtol=0, atol=1e-6)
    # only the lower side by the backward pass: the same lower bounds (no output-box rows),
    # upper bounds from intervals only
    one = bm.bounds(ball, "crown-ibp", spec=C, intervals=ibp.nodes, upper=False)
    ref = crown(bm.graph, {bm.input: ball}, C, "crown-ibp", box_rows=False)
    torch.testing.assert_close(one.lower, ref.lower, rtol=0, atol=1e-6)
    assert (one.upper >= plain.upper - 1e-6).all()


def test_intervals_and_lower_only_are_crown_ibp_options():
    net, shape = _make("mlp")
    bm = BoundedModel(net, input_shape=shape)
    ball = LpBall(torch.rand(2, *shape), 0.01)
    nodes = bm.bounds(ball, "ibp").nodes
    with pytest.raises(VerifierError, match="crown-ibp"):
        bm.bounds(ball, "crown", intervals=nodes)
    with pytest.raises(VerifierError, match="crown-ibp"):
        bm.bounds(ball, "ibp", upper=False)


@pytest.mark.parametrize("name", ["cnn_cert_bn", "sigmoid_bn", "resnet"])
def test_folded_channel_scales_compute_the_same_function(name):
    net, shape = _make(name, seed=4)
    bm = BoundedModel(net, input_shape=shape)
    g = bm.graph
    folded = fold_channel_scales(g)
    n_affine = sum(1 for n in g if n.op == "affine")
    if name == "resnet":
        # its BatchNorms follow convolutions too; the input normalization (if any) has no
        # linear node before it
        assert len(folded) < len(g)
    else:
        assert len(folded) == len(g) - n_affine and not any(n.op == "affine" for n in folded)
    x, _ = _batch(shape, n=7, seed=5)
    out0, vals0 = evaluate(g, {bm.input: x})
    out1, vals1 = evaluate(folded, {bm.input: x})
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out0, net(x), rtol=1e-5, atol=1e-5)
    for n in folded.order:  # every node that survives keeps its value
        torch.testing.assert_close(vals1[n], vals0[n], rtol=1e-5, atol=1e-5)


def test_fold_keeps_a_linear_node_with_other_consumers():
    """conv -> BatchNorm where the conv's value is also read elsewhere is not folded."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(2 * 3 * 16, 4)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(torch.cat([torch.relu(self.bn(h)), h], 1).flatten(1))

    torch.manual_seed(0)
    bm = BoundedModel(Two().eval(), input_shape=(1, 4, 4))
    assert len(fold_channel_scales(bm.graph)) == len(bm.graph)


@pytest.mark.parametrize("name", ["cnn_cert_bn", "resnet", "sigmoid_bn"])
@pytest.mark.parametrize("training", [False, True])
def test_loss_margins_enclose_samples_and_pgd(name, training):
    """certified_margins("crown-ibp", beta 1): lower bounds of every margin at sampled and PGD
    points (in training mode: of the network with the batch's statistics frozen in)."""
    net, shape = _make(name, seed=6)
    bm = BoundedModel(net, input_shape=shape)
    x, y = _batch(shape, n=6, seed=7)
    eps = 0.06
    stats, target = None, net
    if training:
        net.train()
        with BatchStats(net) as stats:
            net(x)
        target = frozen_stats_copy(net, stats)
    lower, nodes = certified_margins(bm, x, y, eps, 1.0, "crown-ibp", 10, batch_stats=stats)
    assert lower.requires_grad and lower.shape == (6, 9)
    lower.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    lo = lower.detach()
    C = margin_spec(y, 10)
    ball = LpBall(x, eps, clip=(0, 1))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        pts = ball.sample(300, generator=gen)
        out = target(pts.reshape(-1, *shape)).reshape(300, 6, 10)
        vals = torch.einsum("nbk,bsk->nbs", out, C)
    tol = 1e-5
    assert (vals >= lo - tol).all()
    low = -pgd(lambda z: target(z), ball, -C, steps=30, restarts=2, seed=0).value
    assert (low >= lo - tol).all()


@pytest.mark.parametrize("training", [False, True])
def test_loss_margins_equal_the_plain_crown_ibp_pass(training):
    """The fast path against the plain one on the frozen graph: CROWN-IBP's lower bound of the
    spec rows (no output-box rows) with C over the IBP box, and at least the IBP term of the
    old loss."""
    net, shape = _make("cnn_cert_bn", seed=9)
    bm = BoundedModel(net, input_shape=shape)
    x, y = _batch(shape, n=8, seed=10)
    stats = None
    if training:
        net.train()
        with BatchStats(net) as stats:
            net(x)
        frozen = BoundedModel(frozen_stats_copy(net, stats), input_shape=shape)
    else:
        frozen = bm
    lower, _ = certified_margins(bm, x, y, 0.05, 1.0, "crown-ibp", 10, batch_stats=stats)
    C = margin_spec(y, 10)
    ref = crown(frozen.graph, {frozen.input: LpBall(x, 0.05, clip=(0, 1))}, C, "crown-ibp",
                box_rows=False, ibp_spec=False)
    torch.testing.assert_close(lower.detach(), ref.lower, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_pos_bias", [False, True])
@pytest.mark.parametrize("rows_slopes", [False, True])
def test_line_select_gradients_match_autograd_of_the_formula(with_pos_bias, rows_slopes):
    """LineSelect's hand-written backward against autograd through clamps and products (float64),
    for slopes shared by the rows ([B, 1, ...]) or per row ([B, S, ...], alpha-CROWN's)."""
    from verifier.ops.activation import LineSelect
    gen = torch.Generator().manual_seed(11)
    B, S, shape = 3, 4, (2, 3, 3)
    n = 18

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)

    A = rnd(B, S, *shape)
    kp = rnd(B, S if rows_slopes else 1, *shape)
    kn = rnd(B, 1, *shape)
    bp = rnd(B, n, 1) if with_pos_bias else None
    bn = rnd(B, n, 1)
    gout = torch.randn(B, S, *shape, generator=gen, dtype=torch.float64)
    gbias = torch.randn(B, S, generator=gen, dtype=torch.float64)
    ins = [t for t in (A, kp, kn, bp, bn) if t is not None]

    def plain():
        Ap, An = A.clamp(min=0), A.clamp(max=0)
        out = Ap * kp + An * kn
        bias = (An.flatten(2) @ bn).squeeze(-1)
        if bp is not None:
            bias = bias + (Ap.flatten(2) @ bp).squeeze(-1)
        return out, bias

    for f in (plain, lambda: LineSelect.apply(A, kp, kn, bp, bn)):
        out, bias = f()
        grads = torch.autograd.grad((out * gout).sum() + (bias * gbias).sum(), ins)
        if f is plain:
            ref_out, ref_bias, ref = out.detach(), bias.detach(), grads
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(bias.detach(), ref_bias)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *t: LineSelect.apply(t[0], t[1], t[2], bp, t[3]),
                                    (A, kp, kn, bn))


@pytest.mark.parametrize("training", [False, True])
def test_loss_margins_under_weight_perturbations_reuse_the_ibp_intervals(training):
    """Flatness training (a weight set): the loss's CROWN-IBP margins with the IBP call's
    intervals reused equal those with the intervals recomputed, and carry gradients."""
    from verifier.weights import WeightPerturbation
    net, shape = _make("cnn_cert_bn", seed=12)
    bm = BoundedModel(net, input_shape=shape)
    x, y = _batch(shape, n=4, seed=13)
    stats = None
    if training:
        net.train()
        with BatchStats(net) as stats:
            net(x)
    wp = WeightPerturbation("*", 0.01, relative=True)
    lower, _ = certified_margins(bm, x, y, 0.03, 1.0, "crown-ibp", 10, batch_stats=stats,
                                 weights=wp)
    ref = bm.bounds(LpBall(x, 0.03, clip=(0, 1)), "crown-ibp", spec=margin_spec(y, 10),
                    live=True, batch_stats=stats, weights=wp, upper=False)
    torch.testing.assert_close(lower, ref.lower, rtol=1e-6, atol=1e-6)
    lower.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
