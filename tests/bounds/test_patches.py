"""Patch-form CROWN (intermediate bounds of conv nets) must equal the dense computation."""
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, LpBall, margin_spec
from verifier.bounds import crown, patches


class Block(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, dilation=1)
        self.skip = nn.Conv2d(c, c, 1, stride=stride)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))) + self.skip(x))


def _nets():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=2, dilation=2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 10)), (1, 14, 14)
    yield nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), Block(6, 2), Block(6, 1),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 10)), (3, 8, 8)
    yield nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.LeakyReLU(0.1),
                        nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Sigmoid(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 5)), (2, 10, 10)


def _randomize_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("norm", ["inf", 2])
@pytest.mark.parametrize("net_id", [0, 1, 2])
def test_patch_crown_equals_dense_crown(monkeypatch, net_id, norm):
    net, shape = list(_nets())[net_id]
    _randomize_bn(net)
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    torch.manual_seed(1)
    x = torch.rand(2, *shape)
    eps = 0.05 if norm == "inf" else 0.3
    ball = LpBall(x, eps, norm=norm, clip=(0, 1))
    n_out = bm.output_shape[0]
    C = margin_spec([1, 3], n_out)
    with_patches = bm.bounds(ball, "crown", spec=C)
    monkeypatch.setattr(crown, "patchable", lambda *a: False)
    dense = bm.bounds(ball, "crown", spec=C)
    torch.testing.assert_close(with_patches.lower, dense.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(with_patches.upper, dense.upper, rtol=1e-9, atol=1e-9)
    for name, iv in dense.nodes.items():
        torch.testing.assert_close(with_patches[name].lower, iv.lower, rtol=1e-9, atol=1e-9)


def test_patches_turn_dense_when_windows_grow(monkeypatch):
    """With every window made dense at once the bounds are still the same."""
    net, shape = list(_nets())[1]
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    ball = LpBall(torch.rand(1, *shape), 0.05, clip=(0, 1))
    a = bm.bounds(ball, "crown")
    monkeypatch.setattr(patches, "DENSE_SHARE", 0.0)
    b = bm.bounds(ball, "crown")
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-9, atol=1e-9)


def test_patch_chunks_of_rows_give_the_same_bounds(monkeypatch):
    """Chunks of one row each (sharing the windows of the relaxations, masks and input set)
    give the bounds of one chunk for every row."""
    net, shape = list(_nets())[1]
    _randomize_bn(net)
    bm = BoundedModel(net, input_shape=shape, dtype=torch.float64)
    ball = LpBall(torch.rand(2, *shape), 0.05, clip=(0, 1))
    a = bm.bounds(ball, "crown")
    monkeypatch.setattr(crown, "PATCH_CHUNK", 1)
    monkeypatch.setattr(crown, "PATCH_MIN_ROWS", 1)
    b = bm.bounds(ball, "crown")
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-9, atol=1e-9)
    for name, iv in a.nodes.items():
        torch.testing.assert_close(b[name].lower, iv.lower, rtol=1e-9, atol=1e-9)
