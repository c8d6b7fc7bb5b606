"""LoRA adapters (``verifier.analysis.lora``): the adapted model, its merge, and the claims the
LoRA example makes, checked by direct evaluation of the source modules (float64): the adapter
set's certified loss is at least its attacked loss and every sampled adapter's loss, the
enclosing box holds every effective weight of the adapter ball, and the merge certificate holds
for sampled scales t."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from verifier import BoundedModel
from verifier.analysis.flatness import flatness, load_npz
from verifier.analysis.lora import (ADAPTERS, LoRALinear, adapter_parameters, adapter_sensitivity,
                                    adapters, add_lora, base_weights, enclosing_radii, fit_adapters,
                                    merge_deltas, merge_flatness, merge_segment, merged)
from verifier.errors import VerifierError
from verifier.weights import WeightPerturbation

ROOT = Path(__file__).resolve().parents[2]


class Tokens(nn.Module):
    """A token-wise ReLU layer, a LayerNorm, a second token layer, the mean, a head."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b, self.head = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.ln(torch.relu(self.a(x))))).mean(1))


def _setup():
    torch.manual_seed(0)
    net = Tokens().eval()
    x = torch.randn(24, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = (net(x) + 0.8 * torch.randn(24, 4, generator=torch.Generator().manual_seed(2))).argmax(1)
    lora = add_lora(net, ["a", "b"], rank=2, alpha=4.0)
    fit_adapters(lora, x, y, steps=60, lr=3e-2)
    return net, lora, x, y


def _ce(out, y):
    return nn.functional.cross_entropy(out.double(), y, reduction="none")


def test_adapted_model_starts_at_the_base_and_merges_exactly():
    torch.manual_seed(0)
    net = Tokens().eval()
    x = torch.randn(3, 5, 6)
    lora = add_lora(net, ["a", "b"], rank=3)
    assert torch.allclose(lora(x), net(x))                        # lora_B starts at zero
    assert not any(isinstance(m, LoRALinear) for m in net.modules())   # the original is untouched
    assert sorted(adapters(lora)) == ["a", "b"]
    trainable = sorted(n for n, p in lora.named_parameters() if p.requires_grad)
    assert trainable == sorted(sum(adapter_parameters(lora).values(), []))
    with torch.no_grad():
        for m in adapters(lora).values():
            m.lora_B.weight.normal_()
    d = merge_deltas(lora)
    assert sorted(d) == ["a.weight", "b.weight"] and d["a.weight"].shape == net.a.weight.shape
    assert torch.allclose(merged(lora, 1.0)(x), lora(x), atol=1e-5)
    assert torch.allclose(merged(lora, 0.0)(x), net(x), atol=1e-6)
    assert base_weights(lora) == ["a.base.weight", "b.base.weight"]


def test_add_lora_errors_name_the_problem():
    net = Tokens().eval()
    with pytest.raises(VerifierError, match="no module matches 'c'.*head"):
        add_lora(net, "c")
    with pytest.raises(VerifierError, match="LayerNorm"):
        add_lora(net, "ln")
    with pytest.raises(VerifierError, match="rank"):
        add_lora(net, "a", rank=0)
    with pytest.raises(VerifierError, match="no LoRA adapters"):
        merge_deltas(net)


def test_enclosing_box_holds_every_effective_weight_of_the_adapter_ball():
    _, lora, _, _ = _setup()
    eps = 0.05
    radii = enclosing_radii(lora, eps)
    gen = torch.Generator().manual_seed(3)
    for name, m in adapters(lora).items():
        A, B = m.lora_A.weight.double(), m.lora_B.weight.double()
        r = radii[f"{name}.base.weight"]
        for i in range(50):
            dA = (torch.rand(A.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
            dB = (torch.rand(B.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
            if i % 2:
                dA, dB = dA.sign() * eps, dB.sign() * eps
            moved = m.scale * ((B + dB) @ (A + dA) - B @ A)
            assert (moved.abs() <= r).all()
    assert sorted(enclosing_radii(lora, eps, names="base")) == ["a.weight", "b.weight"]


def test_adapter_flatness_bounds_sampled_and_attacked_adapters():
    _, lora, x, y = _setup()
    model = BoundedModel(lora, input_shape=(5, 6))
    eps = 0.01
    res = flatness(model, (x, y), WeightPerturbation(ADAPTERS, eps))
    assert res.clean_loss <= res.attack_loss + 1e-9 <= res.certified_loss + 1e-6
    assert res.certified_accuracy > 0      # not vacuous at this radius
    cert = torch.tensor(res.per_sample_certified, dtype=torch.float64)
    net = lora.double()
    base = {k: v.detach() for k, v in net.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    for i in range(40):
        p = dict(base)
        for n in base:
            if ".lora_" in n:
                u = torch.rand(base[n].shape, generator=gen, dtype=torch.float64) * 2 - 1
                p[n] = base[n] + eps * (u.sign() if i % 2 else u)
        with torch.no_grad():
            loss = _ce(functional_call(net, p, (x.double(),)), y)
        assert (loss <= cert * (1 + 1e-5) + 1e-6).all()


def test_merge_certificate_holds_for_sampled_t():
    net, lora, x, y = _setup()
    base = BoundedModel(net, input_shape=(5, 6))
    for t, pieces in (((0.0, 1.0), 1), ((0.0, 1.0), 3), ((0.9, 1.1), 1)):
        res = merge_flatness(base, lora, (x, y), t, pieces=pieces)
        cert = torch.tensor(res.per_sample_certified, dtype=torch.float64)
        correct = torch.tensor(res.per_sample_correct)
        assert res.attack_loss <= res.certified_loss + 1e-6
        for tt in torch.linspace(t[0], t[1], 21).tolist():
            with torch.no_grad():
                out = merged(lora, tt).double()(x.double())
            assert (_ce(out, y) <= cert * (1 + 1e-5) + 1e-6).all(), (t, pieces, tt)
            # a certified sample is classified correctly by every merged model
            assert (out.argmax(1)[correct] == y[correct]).all(), (t, pieces, tt)
    one = merge_flatness(base, lora, (x, y), (0.0, 1.0))
    assert one.certified_loss == pytest.approx(flatness(base, (x, y), merge_segment(lora)).certified_loss)


def test_adapter_sensitivity_has_one_row_per_adapter_ranked():
    _, lora, x, y = _setup()
    model = BoundedModel(lora, input_shape=(5, 6))
    for full in (False, True):
        rs = adapter_sensitivity(model, lora, (x[:8], y[:8]), 0.02, full=full)
        assert sorted(r.label for r in rs) == ["a", "b"]
        inc = [r.certified_increase for r in rs]
        assert inc == sorted(inc, reverse=True)
        assert all(r.attack_loss <= r.certified_loss + 1e-6 for r in rs)


@pytest.mark.slow
def test_vit_lora_example_claims():
    """The example's claims on the zoo's vision transformer, on two digits."""
    sys.path.insert(0, str(ROOT))
    from models import trained
    net, _ = trained("vit_mnist")
    x, y = load_npz(ROOT / "examples" / "data" / "mnist_test100.npz")
    xs = torch.roll(x[:40], shifts=(2, 2), dims=(2, 3))
    lora = add_lora(net, ["blocks.1.mlp.0", "blocks.1.mlp.2"], rank=4, alpha=8.0)
    fit_adapters(lora, xs, y[:40], steps=30, lr=1e-2)
    data = (xs[:2], y[:2])
    model = BoundedModel(lora, input_shape=(1, 28, 28))
    ad = flatness(model, data, WeightPerturbation(ADAPTERS, 0.002))
    assert ad.attack_loss <= ad.certified_loss + 1e-6
    seg = merge_flatness(BoundedModel(net, input_shape=(1, 28, 28)), lora, data, (0.0, 1.0), pieces=2)
    cert = torch.tensor(seg.per_sample_certified, dtype=torch.float64)
    for tt in torch.linspace(0, 1, 11).tolist():
        with torch.no_grad():
            assert (_ce(merged(lora, tt)(data[0]), data[1]) <= cert + 1e-4).all()
    assert math.isfinite(seg.certified_loss)
