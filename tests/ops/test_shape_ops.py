"""Soundness of the shape rules (verifier/ops/shape.py: ``select``, ``concat``): Flatten, Reshape,
View, Unflatten, Transpose, Permute, movedim, Squeeze/Unsqueeze, Slice/getitem (steps, negative
indices, None, constant index tensors with duplicates), narrow, index_select, select, Pad
(constant non-zero value, reflect, replicate, the Pad modules), expand, repeat, Identity and
Dropout in eval, contiguous/clone, and Concat of two perturbed branches with a constant part.

Each op runs twice: right after an element-wise affine map of the input (the whole model is then
affine, so CROWN must be exact) and between ReLUs (its backward receives A from a relaxation)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import check_all_specs, check_sound, exact_affine_bounds, linf, specs_for
from verifier import BoundedModel, LpBall

SHAPE = (2, 4, 3)

OPS = {
    "nn.Flatten": lambda: nn.Flatten(),
    "torch.flatten": lambda: (lambda x: torch.flatten(x, 1)),
    "flatten_start2": lambda: (lambda x: x.flatten(2)),
    "view": lambda: (lambda x: x.view(x.shape[0], 4, 6)),
    "view_minus1": lambda: (lambda x: x.view(-1, 24)),
    "torch.reshape": lambda: (lambda x: torch.reshape(x, (x.shape[0], 3, 8))),
    "reshape_method": lambda: (lambda x: x.reshape(x.size(0), -1, 2)),
    "unflatten": lambda: nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 6))),
    "transpose": lambda: (lambda x: x.transpose(1, 3)),
    "torch.transpose": lambda: (lambda x: torch.transpose(x, 2, 3)),
    "permute": lambda: (lambda x: x.permute(0, 2, 3, 1)),
    "torch.permute": lambda: (lambda x: torch.permute(x, (0, 3, 1, 2))),
    "movedim": lambda: (lambda x: x.movedim(1, -1)),
    "unsqueeze": lambda: (lambda x: x.unsqueeze(2)),
    "torch.unsqueeze": lambda: (lambda x: torch.unsqueeze(x, -1)),
    "squeeze": lambda: (lambda x: x[:, :1].squeeze(1)),
    "torch.squeeze": lambda: (lambda x: torch.squeeze(x[:, :, :1], 2)),
    "getitem_slice": lambda: (lambda x: x[:, 1:, 1:3]),
    "getitem_step": lambda: (lambda x: x[:, :, ::2, 1:]),
    "getitem_negative": lambda: (lambda x: x[..., -1]),
    "getitem_none": lambda: (lambda x: x[:, None, 0]),
    "getitem_index_tensor": lambda: (lambda x: x[:, :, torch.tensor([3, 0, 0, 2])]),
    "narrow": lambda: (lambda x: x.narrow(2, 1, 2)),
    "torch.narrow": lambda: (lambda x: torch.narrow(x, 3, 1, 2)),
    "index_select": lambda: (lambda x: torch.index_select(x, 3, torch.tensor([2, 0, 2]))),
    "index_select_method": lambda: (lambda x: x.index_select(2, torch.tensor([1, 3]))),
    "select": lambda: (lambda x: x.select(1, 1)),
    "F.pad_constant": lambda: (lambda x: F.pad(x, (1, 2, 0, 1), value=0.7)),
    "F.pad_reflect": lambda: (lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect")),
    "F.pad_replicate": lambda: (lambda x: F.pad(x, (1, 1, 2, 0), mode="replicate")),
    "ZeroPad2d": lambda: nn.ZeroPad2d((1, 0, 0, 1)),
    "ConstantPad2d": lambda: nn.ConstantPad2d(1, -0.3),
    "ConstantPad1d": lambda: nn.ConstantPad1d((2, 1), 1.5),
    "ReflectionPad2d": lambda: nn.ReflectionPad2d(1),
    "ReplicationPad2d": lambda: nn.ReplicationPad2d((0, 2, 1, 0)),
    "expand": lambda: (lambda x: x[:, :, :1].expand(-1, -1, 3, -1)),
    "repeat": lambda: (lambda x: x.repeat(1, 2, 1, 1)),
    "Identity": lambda: nn.Identity(),
    "Dropout": lambda: nn.Dropout(0.5),
    "Dropout2d": lambda: nn.Dropout2d(0.3),
    "F.dropout": lambda: (lambda x: F.dropout(x, 0.5, training=False)),
    "contiguous": lambda: (lambda x: x.transpose(2, 3).contiguous()),
    "clone": lambda: (lambda x: x.clone()),
}


class Wrap(nn.Module):
    """``fc(flatten(post(op(pre(x)))))``; pre/post element-wise affine, or ReLU layers."""

    def __init__(self, op, between_relus: bool):
        super().__init__()
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        self.relus = between_relus
        self.register_buffer("a", torch.rand(SHAPE) + 0.5)
        self.register_buffer("b", 0.3 * torch.randn(SHAPE))
        self.conv = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            n = self._op(torch.zeros(1, *SHAPE)).numel()
        self.fc = nn.Linear(n, 4)

    def _op(self, h):
        return self.op(h) if self.op is not None else self.fn(h)

    def forward(self, x):
        h = x * self.a + self.b
        if self.relus:
            h = torch.relu(self.conv(torch.relu(h)))
        h = self._op(h)
        if self.relus:
            h = torch.relu(h)
        return self.fc(h.flatten(1))


def make(name, between_relus, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return BoundedModel(Wrap(OPS[name](), between_relus), input_shape=SHAPE, dtype=dtype)


@pytest.mark.parametrize("name", list(OPS))
def test_shape_op_sound_and_exact_in_affine_model(name):
    bm = make(name, between_relus=False)
    x = torch.randn(2, *SHAPE)
    for pert in (linf(x, 0.25), LpBall(x, 0.6, 2)):
        for spec_name, C in specs_for(bm, 2):
            rep = check_sound(bm, pert, spec=C, pgd_steps=8, restarts=1, n_random=32,
                              n_extreme=16)
            lo, up = exact_affine_bounds(bm, pert, C)
            for m in ("crown", "crown-ibp"):
                r = rep.results[m]
                torch.testing.assert_close(r.lower.double(), lo, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(r.upper.double(), up, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", list(OPS))
def test_shape_op_sound_between_relus(name):
    bm = make(name, between_relus=True, seed=1)
    check_all_specs(bm, linf(torch.randn(2, *SHAPE), torch.tensor([0.3, 0.8])), pgd_steps=10,
                    restarts=1, n_random=64, n_extreme=32)


class Concat(nn.Module):
    """cat of two perturbed branches, the input itself twice and a constant part, along a
    per-sample dim; then a second cat along the last dim with a negative index."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)
        self.register_buffer("const", torch.randn(1, 2))
        self.register_buffer("const3", torch.randn(1, 1, 2, 5))
        self.fc = nn.Linear(3 + 4 + 2 + 2 + 4 + 2 * 9, 3)

    def forward(self, x):
        h1, h2 = torch.relu(self.a(x)), torch.tanh(self.b(x))
        c = torch.cat([h1, x, self.const.expand([x.shape[0], 2]), h2, x], dim=1)
        grid = torch.cat([h1[:, None, None, :2], -h2[:, None, None, :]], -1)       # [B, 1, 1, 4]
        g2 = torch.concat([grid.expand(-1, 1, 2, 4),
                           torch.broadcast_to(self.const3[..., :4], (x.shape[0], 1, 2, 4))], dim=-1)
        g2 = torch.cat([g2, self.const3[..., 4:].repeat(x.shape[0], 1, 1, 1)], -1)   # [B, 1, 2, 9]
        return self.fc(torch.cat([torch.relu(c), g2.flatten(1)], 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_concat_of_branches_and_constants_sound(dtype):
    torch.manual_seed(2)
    bm = BoundedModel(Concat(), input_shape=(4,), dtype=dtype)
    check_all_specs(bm, linf(torch.randn(3, 4), 0.5), pgd_steps=15, restarts=2)


def test_concat_alone_is_exact():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.tensor([[1.5, -2.0]]))

        def forward(self, x):
            return torch.cat([x[:, :2] * 2, self.k.expand([x.shape[0], 2]), x, -x[:, 1:]], 1)

    bm = BoundedModel(C(), input_shape=(3,), dtype=torch.float64)
    pert = linf(torch.randn(2, 3), 0.4)
    rep = check_sound(bm, pert)
    lo, up = exact_affine_bounds(bm, pert)
    for r in rep.results.values():
        torch.testing.assert_close(r.lower.double(), lo)
        torch.testing.assert_close(r.upper.double(), up)
    assert torch.allclose(rep.results["ibp"].lower[:, 2:4], torch.tensor([1.5, -2.0], dtype=torch.float64))


def test_identity_and_dropout_are_aliases_not_nodes():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.Dropout(0.5), nn.ReLU(), nn.Linear(3, 2))
    bm = BoundedModel(net, input_shape=(3,), dtype=torch.float64)
    rep = check_sound(bm, linf(torch.randn(2, 3), 0.3))
    assert {"_1", "_2"}.isdisjoint(rep.results["crown"].nodes)
    assert {"_0", "_3", "_4"} <= set(rep.results["ibp"].nodes)
