"""Training under every constraint keeps each layer under w_max; samples certified at radius r
withstand an L2 PGD attack of radius r; CROWN's L2 bound agrees with the Lipschitz certificate
where both apply; the two command lines."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from verifier.api import margin_spec
from verifier.attack import pgd
from verifier.lipschitz import certified_radius, crown_l2, lipschitz_constant
from verifier.lipschitz.constraints import CONSTRAINTS
from verifier.lipschitz.train import (LipschitzConfig, constrained_weights, evaluate_lipschitz,
                                      train_lipschitz)
from verifier.perturbation import LpBall
from verifier.train.config import ConfigError
from verifier.train.data import load_digits_split

MLP = {"in_dim": 64, "hidden": [32], "out": 10}


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train").subset(600), load_digits_split("test").subset(200)


@pytest.fixture(scope="module")
def trained(digits):
    cfg = LipschitzConfig(model_kwargs=MLP, constraint="spectral_soft_cap", w_max=1.0,
                          optimizer="muon", epochs=8, crown=False)
    return train_lipschitz(cfg, digits[0]).net


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("constraint", [c for c in CONSTRAINTS if c != "weight_decay"])
def test_every_layer_stays_under_w_max_after_training(digits, optimizer, constraint):
    cfg = LipschitzConfig(model_kwargs=MLP, constraint=constraint, w_max=0.8, optimizer=optimizer,
                          epochs=2, lr=0.05, adamw_lr=5e-3, crown=False)
    net = train_lipschitz(cfg, digits[0]).net
    for name, p, _ in constrained_weights(net):
        assert torch.linalg.svdvals(p.detach().double())[0] <= 0.8 * (1 + 1e-5), name
    assert lipschitz_constant(net, (1, 8, 8)).lipschitz <= 0.8 ** 2 * (1 + 1e-4)


def test_weight_decay_baseline_is_not_capped(digits):
    cfg = LipschitzConfig(model_kwargs=MLP, constraint="weight_decay", w_max=0.8, epochs=2,
                          crown=False)
    net = train_lipschitz(cfg, digits[0]).net
    assert max(torch.linalg.svdvals(p.detach().double())[0] for _, p, _ in
               constrained_weights(net)) > 0.8


def test_certified_predictions_withstand_l2_pgd(digits, trained):
    x, y = digits[1].x, digits[1].y
    L = lipschitz_constant(trained, (1, 8, 8)).lipschitz
    with torch.no_grad():
        radius = certified_radius(trained(x).double(), y, L)
    r = float(radius[radius > 0].median())
    cert = radius > r
    assert cert.sum() >= 20
    xc, yc = x[cert], y[cert]
    C = margin_spec(yc, 10)
    res = pgd(trained, LpBall(xc, r * 0.999, norm=2), -C, steps=50, restarts=3)
    with torch.no_grad():   # res.x: [B, 9, 1, 8, 8], one attacked point per margin
        f = trained(res.x.reshape(-1, 1, 8, 8)).reshape(len(xc), 9, 10)
        m = torch.einsum("bsk,bsk->bs", C, f)
    assert (m > 0).all()
    # the attack is not toothless: at 4x the median certified radius it flips some samples
    res4 = pgd(trained, LpBall(x, 4 * r, norm=2), -margin_spec(y, 10), steps=50)
    with torch.no_grad():
        C4 = margin_spec(y, 10)
        m4 = torch.einsum("bsk,bsk->bs", C4, trained(res4.x.reshape(-1, 1, 8, 8)).reshape(len(x), 9, 10))
    assert (m4 <= 0).any(1).sum() > 0


def test_crown_local_constant_at_a_tiny_radius_is_below_the_global_one(digits, trained):
    x, y = digits[1].x[:20], digits[1].y[:20]
    L = lipschitz_constant(trained, (1, 8, 8)).lipschitz
    c = crown_l2(trained, x, y, 1e-4)
    assert (c["local_constant"] <= L * (1 + 1e-3)).all()
    # margins certified by the Lipschitz test are certified by CROWN at that tiny radius too
    with torch.no_grad():
        rad = certified_radius(trained(x).double(), y, L)
    assert bool(c["verified"][rad > 1e-4].all())


def test_evaluate_reports_both_certificates(digits, trained):
    rep = evaluate_lipschitz(trained, digits[1].subset(50), radii=(0.1,), crown=True)
    assert set(rep) >= {"clean_acc", "lipschitz", "certified_acc", "crown_certified_acc", "layers"}
    assert 0 <= rep["certified_acc"]["0.1"] <= rep["clean_acc"]
    assert 0 <= rep["crown_certified_acc"]["0.1"] <= rep["clean_acc"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'constraint'"):
        LipschitzConfig(constraint="spectral_magic")
    with pytest.raises(ConfigError, match="'w_max'"):
        LipschitzConfig(w_max=-1)
    with pytest.raises(ConfigError, match="'optimizer'"):
        LipschitzConfig(optimizer="sgd")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "verifier", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_cli_train_lipschitz_then_lipschitz_json(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--lipschitz", "svd_clip", "--w-max", "1.5", "--optimizer", "adamw",
             "--dataset", "digits", "--model", "mlp", "--model-kwargs", json.dumps(MLP),
             "--epochs", "2", "--radii", "0.2", "--output", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["constraint"] == "svd_clip" and "0.2" in rep["crown_certified_acc"]
    r = _cli("lipschitz", str(out / "model.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["lipschitz"] == pytest.approx(rep["lipschitz"], rel=1e-6)
    assert got["lipschitz"] <= 1.5 ** 2 * (1 + 1e-4)
    assert [l["op"] for l in got["layers"]].count("linear") == 2
    r = _cli("lipschitz", str(out / "model.onnx"))
    assert r.returncode == 0 and "certified L2 Lipschitz constant" in r.stdout


def test_cli_errors_are_usage_errors(tmp_path):
    r = _cli("train", "--lipschitz", "svd_clip", "--eps", "0.1")
    assert r.returncode == 2 and "--eps" in r.stderr
    r = _cli("lipschitz", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_cli_constraint_names_match_the_library():
    from verifier.cli import lipschitz as cli_lipschitz
    assert cli_lipschitz.CONSTRAINTS == CONSTRAINTS
