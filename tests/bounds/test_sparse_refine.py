"""Per-sample refinement (``crown._sparse_rows``): where the samples of a batch leave different
neurons unstable, CROWN bounds each sample's own unstable neurons, one (sample, neuron) pair per
batch element. The bounds equal the dense pass's (up to float summation order) and contain
sampled and PGD values (``check_sound``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_sound
from verifier import BoundedModel, Box
from verifier.bounds import crown


def _boxes(B, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(B, 5, generator=g) * 2 - 1
    r = torch.rand(B, 1, generator=g) ** 3 * 0.5 + 1e-3        # widths over three decades
    return Box(c - r, c + r)


@pytest.mark.parametrize("seed", range(3))
def test_sparse_rows_match_dense_pass_and_are_sound(seed, monkeypatch):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 32), nn.LeakyReLU(0.1), nn.Linear(32, 4))
    bm = BoundedModel(net, input_shape=(5,))
    box = _boxes(48, seed)
    spec = torch.tensor([[1.0, -1.0, 0, 0], [0, 1.0, 0, -1.0]])
    calls = []
    orig = crown._sparse_rows
    monkeypatch.setattr(crown, "_sparse_rows", lambda *a: calls.append(1) or orig(*a))
    sparse = bm.bounds(box, "crown", spec=spec)
    assert calls, "the per-sample path was not taken"
    monkeypatch.setattr(crown, "SPARSE_GAIN", float("inf"))
    calls.clear()
    dense = bm.bounds(box, "crown", spec=spec)
    assert not calls
    torch.testing.assert_close(sparse.lower, dense.lower, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.upper, dense.upper, rtol=1e-4, atol=1e-4)
    for k in dense.nodes:
        torch.testing.assert_close(sparse.nodes[k].lower, dense.nodes[k].lower, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(crown, "SPARSE_GAIN", 1.5)
    calls.clear()
    check_sound(bm, box, spec=spec, methods=("crown",), n_random=64, n_extreme=32,
                pgd_steps=10, restarts=1)
    assert calls
