"""Flatness, sensitivity, weight-delta and quantization certificates: every certified number
must hold for models sampled in the set (and for the attack's model), and the attack's model
must lie in the set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from verifier import BoundedModel
from verifier.errors import ShapeError, VerifierError
from verifier.analysis.deltas import parameter_delta, quantization_radii, quantize_parameters
from verifier.analysis.flatness import (ce_upper_from_margins, flatness, load_npz, plot_curve,
                                        write_csv)
from verifier.analysis.sensitivity import plot_sensitivity, sensitivity
from verifier.weights import WeightPerturbation, WeightSegment


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 3)).eval()


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _losses(module, params, x, y):
    with torch.no_grad():
        out = functional_call(module.double(), {k: v.double() for k, v in params.items()},
                              (x.double(),))
    module.float()
    return torch.nn.functional.cross_entropy(out, y, reduction="none"), out.argmax(1)


def _sample(base, eps, names, gen, corner):
    out = dict(base)
    for k in names:
        u = torch.rand(base[k].shape, generator=gen, dtype=torch.float64) * 2 - 1
        out[k] = base[k].double() + (torch.sign(u) if corner else u) * eps
    return out


def test_ce_upper_bound_from_margins_is_the_loss_at_equality():
    out = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0])
    margins = (out[0, 0] - out[0, 1:]).unsqueeze(0)
    ce = torch.nn.functional.cross_entropy(out, y)
    assert torch.allclose(ce_upper_from_margins(margins), ce.reshape(1))
    assert (ce_upper_from_margins(margins - 0.1) > ce).all()  # smaller margins, larger bound


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown"])
def test_flatness_bounds_hold_for_sampled_models(method):
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    x, y = _data()
    eps = 0.02
    res = flatness(bm, (x, y), WeightPerturbation("*.weight", eps), method=method,
                   batch_size=10, attack_steps=10)
    base = {k: v.detach() for k, v in module.named_parameters()}
    names = [k for k in base if k.endswith("weight")]
    clean, pred = _losses(module, base, x, y)
    assert res.clean_loss == pytest.approx(float(clean.mean()), rel=1e-5)
    cert = torch.tensor(res.per_sample_certified, dtype=torch.float64)
    stable = None
    gen = torch.Generator().manual_seed(1)
    for i in range(30):
        loss, p = _losses(module, _sample(base, eps, names, gen, corner=i % 2 == 1), x, y)
        assert (loss <= cert * (1 + 1e-5) + 1e-6).all()
        assert float(loss.mean()) <= res.certified_loss * (1 + 1e-5) + 1e-6
        same = p == pred
        stable = same if stable is None else stable & same
    assert res.attack_loss <= res.certified_loss * (1 + 1e-5) + 1e-6
    assert res.attack_loss >= res.clean_loss - 1e-9  # the attack starts at the clean model
    assert res.certified_accuracy <= res.clean_accuracy
    assert 0.0 <= res.stable_fraction <= 1.0
    # samples certified stable did not change under any sampled model
    assert res.stable_fraction <= float(stable.double().mean()) + 1e-9


def test_flatness_at_zero_radius_is_the_clean_loss():
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    x, y = _data()
    res = flatness(bm, (x, y), WeightPerturbation("*", 0.0), attack_steps=2)
    assert res.certified_loss == pytest.approx(res.clean_loss, rel=1e-4, abs=1e-6)
    assert res.stable_fraction == 1.0


def test_flatness_grows_with_the_radius_and_crown_beats_ibp():
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    data = _data()
    w = lambda e: WeightPerturbation("*.weight", e)  # noqa: E731
    a, b = (flatness(bm, data, w(e), attack_steps=3) for e in (0.01, 0.03))
    assert a.certified_loss < b.certified_loss
    ibp = flatness(bm, data, w(0.03), method="ibp", attack_steps=3)
    assert b.certified_loss < ibp.certified_loss


def test_sensitivity_ranks_modules_and_each_is_sound():
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    x, y = _data()
    res = sensitivity(bm, (x, y), 0.05, relative=True, attack_steps=5)
    assert sorted(r.label for r in res) == ["0", "2", "4"]
    incs = [r.certified_increase for r in res]
    assert incs == sorted(incs, reverse=True)
    base = {k: v.detach() for k, v in module.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    for r in res:
        name = f"{r.label}.weight"
        assert r.attack_increase <= r.certified_increase + 1e-6
        for _ in range(10):
            pt = dict(base)
            u = torch.rand(base[name].shape, generator=gen, dtype=torch.float64) * 2 - 1
            pt[name] = base[name].double() * (1 + 0.05 * torch.sign(u))
            loss, _ = _losses(module, pt, x, y)
            assert float(loss.mean()) <= r.certified_loss * (1 + 1e-5) + 1e-6
    with pytest.raises(VerifierError, match="unknown module"):
        sensitivity(bm, (x, y), 0.05, modules=["nope"])


def test_segment_between_two_models_covers_both_ends():
    a, b = _net(0), _net(1)
    bma, bmb = BoundedModel(a, input_shape=(5,)), BoundedModel(b, input_shape=(5,))
    delta = parameter_delta(bma, bmb)
    assert set(delta) == {k for k, _ in a.named_parameters()}
    x, y = _data()
    res = flatness(bma, (x, y), WeightSegment(delta, (0.0, 1.0)), attack_steps=5)
    base = {k: v.detach() for k, v in a.named_parameters()}
    for t in (0.0, 0.3, 1.0):
        pt = {k: base[k].double() + t * delta[k].double() for k in base}
        loss, _ = _losses(a, pt, x, y)
        assert (loss <= torch.tensor(res.per_sample_certified) * (1 + 1e-5) + 1e-6).all()
    loss_b, _ = _losses(b, {k: v.detach() for k, v in b.named_parameters()}, x, y)
    assert float(loss_b.mean()) <= res.certified_loss + 1e-6


def test_quantized_copy_lies_in_its_ball_and_is_certified():
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    q = quantize_parameters(bm, bits=6)
    radii = quantization_radii(bm, bits=6)
    base = bm.parameters()
    for k in q:
        assert (torch.as_tensor(q[k]).double() - base[k].double()).abs().le(radii[k]).all()
        step = base[k].abs().max() / 31
        assert len(torch.unique(torch.round(q[k] / step))) <= 63
    x, y = _data()
    res = flatness(bm, (x, y), WeightPerturbation(None, radii), attack_steps=3)
    loss, _ = _losses(module, {k: v.double() for k, v in q.items()}, x, y)
    assert (loss <= torch.tensor(res.per_sample_certified) * (1 + 1e-5) + 1e-6).all()
    per_ch = quantization_radii(bm, bits=6, per_channel=True)
    assert all((per_ch[k] <= radii[k] + 1e-12).all() for k in radii)


def test_reports_csv_and_png(tmp_path):
    module = _net()
    bm = BoundedModel(module, input_shape=(5,))
    data = _data(8)
    res = [flatness(bm, data, WeightPerturbation("*", e), attack_steps=2, label=str(e))
           for e in (0.01, 0.02)]
    write_csv(res, tmp_path / "c.csv")
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0].startswith("label,n,clean_loss,certified_loss,attack_loss") and len(rows) == 3
    plot_curve(res, [0.01, 0.02], tmp_path / "c.png")
    plot_sensitivity(res, tmp_path / "s.png")
    for f in ("c.png", "s.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_data_and_sets_are_clear_errors(tmp_path):
    bm = BoundedModel(_net(), input_shape=(5,))
    np.savez(tmp_path / "nox.npz", y=np.zeros(3, dtype=np.int64))
    with pytest.raises(VerifierError, match="missing"):
        load_npz(tmp_path / "nox.npz")
    np.savez(tmp_path / "fy.npz", x=np.zeros((3, 5)), y=np.array([0.5, 1, 2]))
    with pytest.raises(VerifierError, match="integer"):
        load_npz(tmp_path / "fy.npz")
    with pytest.raises(VerifierError, match="no such file"):
        load_npz(tmp_path / "absent.npz")
    x, y = _data(4)
    with pytest.raises(ShapeError, match="labels"):
        flatness(bm, (x, y + 5), WeightPerturbation("*", 0.01))
    with pytest.raises(ShapeError):
        flatness(bm, (torch.zeros(4, 7), y), WeightPerturbation("*", 0.01))
    with pytest.raises(VerifierError, match="no parameter matches"):
        flatness(bm, (x, y), WeightPerturbation("fc*", 0.01))
    with pytest.raises(VerifierError, match="shape"):
        WeightSegment({"0.weight": torch.zeros(3)}) and flatness(
            bm, (x, y), WeightSegment({"0.weight": torch.zeros(3)}))
    other = BoundedModel(nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).eval(),
                         input_shape=(5,))
    with pytest.raises(VerifierError):
        parameter_delta(bm, other)
    with pytest.raises(VerifierError, match="bits"):
        quantization_radii(bm, bits=1)
    assert math.isfinite(flatness(bm, (x, y), WeightPerturbation("*", 0.0), attack_steps=1).certified_loss)
