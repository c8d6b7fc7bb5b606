"""CROWN-IBP with loss fusion (``verifier.train.losses.fused_robust_ce``): one backward row per
sample bounds the cross-entropy over the ball. The bound must hold for every point of the ball
(sampled points and a PGD attack on the cross-entropy), with BatchNorm in eval mode and with the
batch's statistics; the config, the flag and a training step use it."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import frozen_stats_copy, randomize_batchnorm  # noqa: E402
from models import cnn_cert, mlp  # noqa: E402

from verifier import BoundedModel  # noqa: E402
from verifier.cli import main  # noqa: E402
from verifier.graph.live import BatchStats  # noqa: E402
from verifier.train.config import ConfigError, from_dict  # noqa: E402
from verifier.train.losses import certified_margins, fused_robust_ce, robust_ce  # noqa: E402

NETS = {
    "mlp": lambda: mlp(64, [32, 16], 10),
    "cnn_cert_bn": lambda: cnn_cert(1, 10, 8, width=4, fc=16, bn=True),
}


def _make(name, seed=0):
    torch.manual_seed(seed)
    net = NETS[name]()
    randomize_batchnorm(net, seed)
    return net


def _batch(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    x[:2] = (x[:2] < 0.5).float()                       # pixels at the clip's edges
    return x, torch.randint(0, 10, (n,), generator=gen)


def _ce_per_sample(net, pts, y):
    return F.cross_entropy(net(pts), y, reduction="none")


def _pgd_ce(net, x, y, eps, steps=30, seed=0):
    """Maximize each sample's cross-entropy in the clipped ball (sign steps, random start)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    gen = torch.Generator().manual_seed(seed)
    xa = (lo + torch.rand(x.shape, generator=gen) * (hi - lo)).requires_grad_(True)
    best = torch.full((len(x),), -float("inf"))
    for _ in range(steps):
        ce = _ce_per_sample(net, xa, y)
        best = torch.maximum(best, ce.detach())
        g, = torch.autograd.grad(ce.sum(), xa)
        xa = (xa + eps / 4 * g.sign()).clamp(lo, hi).detach().requires_grad_(True)
    return torch.maximum(best, _ce_per_sample(net, xa, y).detach())


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("eps", [0.01, 0.1])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_fused_bound_holds_on_sampled_and_attacked_points(name, eps, beta):
    net = _make(name).eval()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, y = _batch()
    with torch.no_grad():
        ub, lower, _ = fused_robust_ce(bm, x, y, eps, beta, 10)
    assert ub.shape == (len(x),) and torch.isfinite(ub).all()
    gen = torch.Generator().manual_seed(3)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    worst = torch.full((len(x),), -float("inf"))
    with torch.no_grad():
        for _ in range(20):
            pts = lo + torch.rand(x.shape, generator=gen) * (hi - lo)
            worst = torch.maximum(worst, _ce_per_sample(net, pts, y))
        for corner in (lo, hi):
            worst = torch.maximum(worst, _ce_per_sample(net, corner, y))
    worst = torch.maximum(worst, _pgd_ce(net, x, y, eps))
    assert (worst <= ub + 1e-5).all(), (worst, ub)
    # the clean point's cross-entropy is a point of the ball too
    with torch.no_grad():
        assert (_ce_per_sample(net, x, y) <= ub + 1e-5).all()


def test_fused_bound_holds_with_batch_statistics():
    """BatchNorm in training mode: the bound is over the network that normalizes with the clean
    batch's statistics (as the training loss's other bounds are)."""
    net = _make("cnn_cert_bn").train()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, y = _batch(n=16)
    eps = 0.05
    with BatchStats(net) as stats:
        net(x)
    with torch.no_grad():
        ub, _, _ = fused_robust_ce(bm, x, y, eps, 1.0, 10, batch_stats=stats)
    frozen = frozen_stats_copy(net, stats)
    worst = _pgd_ce(frozen, x, y, eps)
    gen = torch.Generator().manual_seed(5)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        for _ in range(20):
            pts = lo + torch.rand(x.shape, generator=gen) * (hi - lo)
            worst = torch.maximum(worst, _ce_per_sample(frozen, pts, y))
    assert (worst <= ub + 1e-5).all()


@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_fused_bound_is_exact_on_a_two_class_linear_model(eps):
    """f = W x + c with 2 classes: CE = log(1 + exp(d)), d = f_other - f_y linear, maximized at
    the box's vertex sign(grad d) (clipped to [0, 1]). There the chord of exp is exact at its
    end, CROWN on a linear map is exact, so the fused bound equals that maximum."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, _ = _batch(n=8, seed=2)
    y = torch.arange(8) % 2
    with torch.no_grad():
        ub, _, _ = fused_robust_ce(bm, x, y, eps, 1.0, 2)
        w = net[1].weight
        g = (w[1 - y] - w[y]).reshape(x.shape)           # gradient of d in x, per sample
        vertex = torch.where(g > 0, (x + eps).clamp(0, 1), (x - eps).clamp(0, 1))
        exact = _ce_per_sample(net, vertex, y)
    torch.testing.assert_close(ub, exact, rtol=0, atol=2e-5)


def test_fused_bound_is_never_above_ibp_and_tight_for_a_tiny_ball():
    """The fused bound is at most IBP's robust cross-entropy, and on a ball of radius 1e-6 it
    equals the clean cross-entropy to within 1e-3 (the chord of exp and CROWN are exact in the
    limit); beta 0 is IBP's loss exactly."""
    net = _make("mlp").eval()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, y = _batch()
    with torch.no_grad():
        ub, lower, _ = fused_robust_ce(bm, x, y, 0.05, 1.0, 10)
        ibp = torch.logsumexp(torch.cat([torch.zeros_like(lower[:, :1]), -lower], 1), 1)
        assert (ub <= ibp + 1e-6).all()
        ub0, _, _ = fused_robust_ce(bm, x, y, 0.05, 0.0, 10)
        torch.testing.assert_close(ub0, ibp)
        tiny, _, _ = fused_robust_ce(bm, x, y, 1e-6, 1.0, 10)
        torch.testing.assert_close(tiny, _ce_per_sample(net, x, y), rtol=0, atol=1e-3)


def test_fused_loss_is_differentiable_and_close_to_the_per_margin_loss_on_a_small_ball():
    net = _make("cnn_cert_bn").eval()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, y = _batch()
    ub, _, _ = fused_robust_ce(bm, x, y, 0.01, 1.0, 10)
    ub.mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        lower, _ = certified_margins(bm, x, y, 0.01, 1.0, "crown-ibp", 10)
        per_margin = robust_ce(lower)
    # both are upper bounds of the same worst case; on a small ball they agree closely
    assert abs(float(ub.mean()) - float(per_margin)) < 0.05 * float(per_margin) + 1e-3


def test_fused_bound_holds_under_weight_perturbations():
    """Flatness training: with a weight set (every parameter within 2% of its value) the fused
    bound holds for sampled models of the set at sampled and attacked inputs of the ball."""
    from verifier.weights import WeightPerturbation
    net = _make("mlp").eval()
    bm = BoundedModel(net, input_shape=(1, 8, 8))
    x, y = _batch()
    eps, rel = 0.03, 0.02
    with torch.no_grad():
        ub, _, _ = fused_robust_ce(bm, x, y, eps, 1.0, 10,
                                   weights=WeightPerturbation("*", rel, relative=True))
    gen = torch.Generator().manual_seed(9)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    worst = torch.full((len(x),), -float("inf"))
    for k in range(12):
        other = copy.deepcopy(net)
        with torch.no_grad():
            for q in other.parameters():
                u = torch.rand(q.shape, generator=gen) * 2 - 1
                if k % 2:
                    u = u.sign()                             # a vertex of the weight box
                q.add_(rel * q.abs() * u)
            for _ in range(5):
                pts = lo + torch.rand(x.shape, generator=gen) * (hi - lo)
                worst = torch.maximum(worst, _ce_per_sample(other, pts, y))
        worst = torch.maximum(worst, _pgd_ce(other, x, y, eps, steps=15, seed=k))
    assert (worst <= ub + 1e-5).all(), (worst, ub)


@pytest.mark.parametrize("d, match", [
    ({"method": "ibp", "loss_fusion": True}, r"'loss_fusion'.*method ibp has no CROWN-IBP pass"),
    ({"method": "crown-ibp", "loss_fusion": "yes"}, r"'loss_fusion': expected true or false"),
])
def test_config_errors_of_loss_fusion(d, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(d)


def test_train_command_runs_crown_ibp_with_loss_fusion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_methods: [ibp]\neval_eps: []\neval_pgd_steps: 3\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--dataset", "digits", "--model", "mlp",
            "--model-kwargs", '{"in_dim": 64, "hidden": [16]}', "--eps", "0.05", "--epochs", "1",
            "--warmup-epochs", "0", "--ramp-epochs", "1", "--method", "crown-ibp",
            "--loss-fusion", "--test-subset", "40", "--no-progress", "--output", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "crown-ibp" and report["violations"] == 0
    assert json.loads((out / "config.json").read_text())["loss_fusion"] is True
