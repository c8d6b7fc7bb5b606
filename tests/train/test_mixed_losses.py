"""MTL-IBP, CC-IBP and SABR (``verifier.train.mixed``): each loss equals its formula recomputed
here by hand (interval arithmetic written out for a 2-layer MLP, the adversarial logits from the
module itself), alpha 0 / 1 give the adversarial / IBP loss, SABR's small box lies in the eps
ball and in [0, 1] and its bounds hold on points sampled in the box and on a PGD attack; the
config's errors; ``verifier train --method ...`` runs one epoch on the shipped digits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from verifier import BoundedModel, LpBall, margin_spec
from verifier.cli import main
from verifier.train import mixed
from verifier.train.config import ConfigError, from_dict
from verifier.train.losses import robust_ce
from verifier.train.mixed import (adversarial_margins, cc_ibp_loss, forward_with_stats, mixed_loss,
                                  mtl_ibp_loss, pgd_in_box, sabr_box)

N_IN, N_HID, N_CLS, B, EPS = 6, 8, 4, 7, 0.15


def _net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(N_IN, N_HID), nn.ReLU(), nn.Linear(N_HID, N_CLS))


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(B, N_IN, generator=g)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.05])          # pixels at and near the clip range's ends
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    # a fixed point of the ball (inside [0, 1]): +-eps by a fixed sign pattern, clipped
    s = torch.where(torch.arange(N_IN) % 2 == 0, 1.0, -1.0)
    xa = (x + 0.7 * EPS * s).clamp(0, 1)
    return x, y, xa


def _hand_ibp_margins(net, lo, hi, y):
    """IBP margin lower bounds ``[B, n-1]`` over the box [lo, hi], written out: the first layer by
    W+ / W-, the ReLU monotone, the last layer merged with the margin rows W2[y] - W2[j]."""
    W1, b1, W2, b2 = net[0].weight, net[0].bias, net[2].weight, net[2].bias
    l1 = lo @ W1.clamp(min=0).T + hi @ W1.clamp(max=0).T + b1
    u1 = hi @ W1.clamp(min=0).T + lo @ W1.clamp(max=0).T + b1
    hl, hu = l1.clamp(min=0), u1.clamp(min=0)
    rows = []
    for i in range(len(y)):
        yi = int(y[i])
        ms = []
        for j in range(N_CLS):
            if j == yi:
                continue
            c = W2[yi] - W2[j]
            ms.append((c.clamp(min=0) * hl[i]).sum() + (c.clamp(max=0) * hu[i]).sum() + b2[yi] - b2[j])
        rows.append(torch.stack(ms))
    return torch.stack(rows)


def _hand_ce_of_margins(v):
    """mean_i log(1 + sum_j exp(-v_ij))"""
    return torch.log(1 + torch.exp(-v).sum(1)).mean()


def _fixed_attack(monkeypatch, point, seen):
    def fake(net, x, y, lo, hi, steps, generator=None):
        seen.append((lo.clone(), hi.clone(), steps))
        return torch.min(torch.max(point, lo), hi)
    monkeypatch.setattr(mixed, "pgd_in_box", fake)


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("method", ["mtl-ibp", "cc-ibp"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mtl_and_cc_ibp_equal_their_formulas_by_hand(monkeypatch, method, alpha):
    net = _net()
    x, y, xa = _data()
    bm = BoundedModel(net, input_shape=(N_IN,))
    net.train()
    seen = []
    _fixed_attack(monkeypatch, xa, seen)
    loss, _, logged = mixed_loss(net, bm, x, y, EPS, method, N_CLS, alpha=alpha, steps=3)
    # the attack searched the eps ball clipped to [0, 1], with the configured steps
    lo, hi, steps = seen[0]
    assert steps == 3
    assert torch.equal(lo, (x - EPS).clamp(0, 1)) and torch.equal(hi, (x + EPS).clamp(0, 1))
    # by hand
    logits = net(xa)
    z = torch.stack([torch.stack([logits[i, y[i]] - logits[i, j] for j in range(N_CLS) if j != y[i]])
                     for i in range(B)])
    m = _hand_ibp_margins(net, (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1), y)
    assert (m <= z + 1e-6).all()                      # the bound holds at the attack point
    if method == "mtl-ibp":
        hand = (1 - alpha) * F.cross_entropy(logits, y) + alpha * _hand_ce_of_margins(m)
    else:
        hand = _hand_ce_of_margins((1 - alpha) * z + alpha * m)
    assert torch.allclose(loss, hand, rtol=1e-5, atol=1e-6), (float(loss), float(hand))
    # the same gradients in the parameters
    for a, b in zip(_grads(net, loss), _grads(net, hand)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # alpha 0: the adversarial cross-entropy; alpha 1: IBP's robust cross-entropy
    with torch.no_grad():
        if alpha == 0:
            assert torch.allclose(loss, F.cross_entropy(net(xa), y), rtol=1e-5)
        if alpha == 1:
            assert torch.allclose(loss, _hand_ce_of_margins(m), rtol=1e-5)
    assert logged["cert"] == float((m > 0).all(1).float().mean())


def test_mixed_losses_lie_between_the_adversarial_and_the_ibp_loss():
    torch.manual_seed(0)
    z = torch.randn(20, 9) * 3
    m = z - torch.rand(20, 9) * 4                    # lower bounds: m <= z
    adv, ibp = robust_ce(z), robust_ce(m)
    assert torch.allclose(mtl_ibp_loss(z, m, 0.0), adv) and torch.allclose(cc_ibp_loss(z, m, 0.0), adv)
    assert torch.allclose(mtl_ibp_loss(z, m, 1.0), ibp) and torch.allclose(cc_ibp_loss(z, m, 1.0), ibp)
    prev_mtl = prev_cc = adv
    for a in (0.1, 0.4, 0.7, 0.9):
        mtl, cc = mtl_ibp_loss(z, m, a), cc_ibp_loss(z, m, a)
        # ce is convex and decreasing in v: cc <= mtl; both grow with alpha
        assert adv - 1e-6 <= cc <= mtl + 1e-6 and mtl <= ibp + 1e-6
        assert mtl >= prev_mtl - 1e-6 and cc >= prev_cc - 1e-6
        prev_mtl, prev_cc = mtl, cc


def test_sabr_loss_is_ibp_over_the_small_box_by_hand(monkeypatch):
    net = _net()
    x, y, xa = _data()
    bm = BoundedModel(net, input_shape=(N_IN,))
    net.train()
    lam = 0.4
    seen = []
    _fixed_attack(monkeypatch, xa, seen)
    loss, _, _ = mixed_loss(net, bm, x, y, EPS, "sabr", N_CLS, lam=lam, steps=2)
    lo, hi = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    r = torch.minimum(torch.full_like(x, lam * EPS), (hi - lo) / 2)
    ilo, ihi, steps = seen[0]
    # the attack searched the ball shrunk by r (per pixel), so the small box stays inside
    assert steps == 2
    assert torch.allclose(ilo, lo + r) and torch.allclose(ihi, hi - r)
    c = torch.min(torch.max(xa, lo + r), hi - r)
    m = _hand_ibp_margins(net, c - r, c + r, y)
    hand = _hand_ce_of_margins(m)
    assert torch.allclose(loss, hand, rtol=1e-5, atol=1e-6), (float(loss), float(hand))
    for a, b in zip(_grads(net, loss), _grads(net, hand)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # lambda 1: SABR is IBP over the whole ball
    seen.clear()
    full, _, _ = mixed_loss(net, bm, x, y, EPS, "sabr", N_CLS, lam=1.0, steps=2)
    assert torch.allclose(full, _hand_ce_of_margins(_hand_ibp_margins(net, lo, hi, y)), rtol=1e-5)


@pytest.mark.parametrize("eps, lam", [(0.1, 0.3), (0.3, 0.6), (0.05, 1.0)])
def test_sabr_box_inside_the_ball_and_its_bounds_hold_on_samples_and_pgd(eps, lam):
    net = _net().eval()
    g = torch.Generator().manual_seed(11)
    x = torch.rand(64, N_IN, generator=g)
    x[:8] = (x[:8] < 0.5).float()                        # binary pixels: the clip at 0 and 1
    x[8:16] = x[8:16] * 0.1                              # near 0
    y = torch.arange(64) % N_CLS
    box = sabr_box(net, x, y, eps, lam, steps=5, generator=torch.Generator().manual_seed(1))
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    assert (box.lower >= lo).all() and (box.upper <= hi).all()
    assert (box.lower >= 0).all() and (box.upper <= 1).all()
    width = box.upper - box.lower
    expect = torch.minimum(torch.full_like(x, 2 * lam * eps), hi - lo)
    assert torch.allclose(width, expect, atol=1e-6)      # as large as allowed, never larger
    # the bounds of the loss hold over the small box: sampled points and a PGD attack inside it
    bm = BoundedModel(net, input_shape=(N_IN,))
    C = margin_spec(y, N_CLS)
    lower = bm.bounds(box, "ibp", spec=C, live=True).lower.detach()
    u = torch.rand(200, *x.shape, generator=g)
    pts = box.lower + u * (box.upper - box.lower)
    with torch.no_grad():
        out = net(pts.reshape(-1, N_IN)).reshape(200, 64, N_CLS)
        z = torch.einsum("bsk,nbk->nbs", C, out)
    assert (z >= lower - 1e-5).all()
    # PGD on the margin sum inside the box
    xp = pgd_in_box(net, x, y, box.lower, box.upper, 20, torch.Generator().manual_seed(2))
    assert (xp >= box.lower).all() and (xp <= box.upper).all()
    with torch.no_grad():
        zp = torch.einsum("bsk,bk->bs", C, net(xp))
    assert (zp >= lower - 1e-5).all()


def test_adversarial_margins_match_the_module_and_bound_ibp_with_batchnorm():
    """With BatchNorm in training mode the adversarial margins are those of the bounded network
    (the clean batch's statistics), so IBP's lower bounds never exceed them."""
    from verifier.graph.live import BatchStats
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(N_IN, N_HID), nn.BatchNorm1d(N_HID), nn.ReLU(),
                        nn.Linear(N_HID, N_CLS))
    x, y, xa = _data()
    bm = BoundedModel(net, input_shape=(N_IN,))
    net.eval()
    z_eval = adversarial_margins(bm, xa, y, N_CLS)
    logits = net(xa)
    hand = torch.stack([torch.stack([logits[i, y[i]] - logits[i, j] for j in range(N_CLS) if j != y[i]])
                        for i in range(B)])
    assert torch.allclose(z_eval, hand, atol=1e-5)
    net.train()
    with BatchStats(net) as stats:
        net(x)
    loss, nodes, logged = mixed_loss(net, bm, x, y, EPS, "cc-ibp", N_CLS, alpha=0.5, steps=2,
                                     batch_stats=stats)
    z = adversarial_margins(bm, xa, y, N_CLS, stats)
    # the module's forward with the clean statistics computes the live graph's function
    z_mod = (margin_spec(y, N_CLS) @ forward_with_stats(net, xa, stats).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(z, z_mod, atol=1e-5)
    assert net.training                               # the mode is restored
    g1 = torch.autograd.grad(z.sum(), net[1].weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(z_mod.sum(), net[1].weight, retain_graph=True)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
    running = net[1].running_mean.clone()
    forward_with_stats(net, xa, stats)
    assert torch.equal(net[1].running_mean, running)  # no running-statistics update
    m = bm.bounds(LpBall(x, EPS, clip=(0, 1)), "ibp", spec=margin_spec(y, N_CLS), live=True,
                  batch_stats=stats).lower
    assert (m <= z + 1e-5).all()
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("d, match", [
    ({"method": "mtl-ibp", "alpha": 1.5}, r"'alpha': must lie in \[0, 1\]"),
    ({"method": "cc-ibp", "alpha": -0.1}, r"'alpha': must lie in \[0, 1\]"),
    ({"alpha": "0.5"}, r"'alpha': expected a number"),
    ({"method": "sabr", "sabr_lambda": 0}, r"'sabr_lambda': must lie in \(0, 1\]"),
    ({"method": "sabr", "sabr_lambda": 1.2}, r"'sabr_lambda': must lie in \(0, 1\]"),
    ({"method": "sabr", "pgd_steps": 0}, r"'pgd_steps': method sabr needs an attack of at least 1"),
    ({"method": "mtl-ibp", "weight_eps": 0.01}, r"'weight_eps'.*needs method ibp or crown-ibp, not mtl-ibp"),
    ({"method": "tapas"}, r"'method': 'tapas' is not one of .*mtl-ibp, cc-ibp, sabr"),
])
def test_config_errors_of_the_mixed_methods(d, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(d)
    assert "\n" not in str(e.value)


def test_config_files_and_flags_set_the_mixed_methods(tmp_path):
    from verifier.cli.main import build_parser
    from verifier.cli.train import _FLAGS
    from verifier.train.config import load_config
    f = tmp_path / "c.toml"
    f.write_text('method = "cc-ibp"\nalpha = 0.2\npgd_steps = 2\nsabr_lambda = 0.5\n')
    cfg = load_config(f)
    assert (cfg.method, cfg.alpha, cfg.pgd_steps, cfg.sabr_lambda) == ("cc-ibp", 0.2, 2, 0.5)
    a = build_parser().parse_args(["train", "--method", "sabr", "--sabr-lambda", "0.3",
                                   "--pgd-steps", "1", "--alpha", "0.1"])
    cfg = load_config(f, {k: getattr(a, k) for k in _FLAGS})
    assert (cfg.method, cfg.alpha, cfg.pgd_steps, cfg.sabr_lambda) == ("sabr", 0.1, 1, 0.3)


@pytest.mark.parametrize("method", ["mtl-ibp", "cc-ibp", "sabr"])
def test_train_command_runs_one_epoch_of_each_method_on_digits(tmp_path, capsys, method):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_methods: [ibp]\neval_eps: []\neval_pgd_steps: 3\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--dataset", "digits", "--model", "mlp",
            "--model-kwargs", '{"in_dim": 64, "hidden": [16]}', "--eps", "0.05", "--epochs", "1",
            "--warmup-epochs", "0", "--ramp-epochs", "1", "--method", method, "--alpha", "0.3",
            "--sabr-lambda", "0.5", "--pgd-steps", "1", "--test-subset", "40", "--no-progress",
            "--output", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and report["epochs"] == 1 and report["violations"] == 0
    hist = json.loads((out / "report.json").read_text())["history"]
    assert len(hist) == 1 and "rob" in hist[0]
    assert ("box_cert" in hist[0]) == (method == "sabr")


class _Stop(Exception):
    pass


def test_a_resumed_sabr_run_ends_with_the_uninterrupted_weights(tmp_path):
    """The attack's random starts come from the step's generator: resuming is exact."""
    from verifier.train import load_digits_split
    from verifier.train.trainer import train
    data = load_digits_split("train"), load_digits_split("test")
    d = dict(dataset="digits", model="mlp", model_kwargs={"in_dim": 64, "hidden": [16]}, eps=0.1,
             epochs=3, warmup_epochs=0, ramp_epochs=2, method="sabr", pgd_steps=2, seed=1)
    full = train(from_dict({**d, "output": str(tmp_path / "full")}), progress=False, data=data)

    def interrupt(epoch, step):
        if epoch == 1 and step == 5:
            raise _Stop
    with pytest.raises(_Stop):
        train(from_dict({**d, "output": str(tmp_path / "cut")}), progress=False, data=data,
              callback=interrupt)
    again = train(from_dict({**d, "output": str(tmp_path / "cut")}), resume=True, progress=False,
                  data=data)
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k


def test_a_checkpoint_without_the_new_keys_resumes_with_their_defaults(tmp_path):
    """Checkpoints written before alpha / sabr_lambda existed resume (those keys had their
    defaults then); one whose value differs is refused."""
    from verifier.train import load_digits_split
    from verifier.train.trainer import train
    data = load_digits_split("train"), load_digits_split("test")
    d = dict(dataset="digits", model="mlp", model_kwargs={"in_dim": 64, "hidden": [8]}, eps=0.1,
             epochs=1, warmup_epochs=0, ramp_epochs=1, output=str(tmp_path / "o"))
    train(from_dict(d), progress=False, data=data)
    path = tmp_path / "o" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["alpha"], ckpt["config"]["sabr_lambda"]
    torch.save(ckpt, path)
    assert train(from_dict(d), resume=True, progress=False, data=data).epoch == 1
    with pytest.raises(ConfigError, match=r"different config \(alpha\)"):
        train(from_dict({**d, "alpha": 0.2}), resume=True, progress=False, data=data)


def test_mixed_loss_names_an_unknown_method():
    from verifier.errors import VerifierError
    net = _net()
    x, y, _ = _data()
    with pytest.raises(VerifierError, match="'ibp' is not one of mtl-ibp, cc-ibp, sabr"):
        mixed_loss(net, BoundedModel(net, input_shape=(N_IN,)), x, y, EPS, "ibp", N_CLS)
