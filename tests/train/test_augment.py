"""augment_shift: training images moved by random whole-pixel offsets, zero-filled."""
from __future__ import annotations

import pytest
import torch

from verifier.train import TrainConfig, train
from verifier.train.config import ConfigError
from verifier.train.data import Dataset
from verifier.train.trainer import random_shift


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img ([C, H, W]) moved down by dy and right by dx, written out with loops."""
    C, H, W = img.shape
    out = torch.zeros_like(img)
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def test_every_image_is_itself_moved_by_at_most_k_pixels():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, 2, 5, 6, generator=gen) + 0.5          # no zero pixel of its own
    y = random_shift(x, 2, torch.Generator().manual_seed(1))
    seen = set()
    for img, out in zip(x, y):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out, _shifted(img, dy, dx))]
        assert len(match) == 1, "not a shift of its own image by at most 2 pixels"
        seen.add(match[0])
    assert len(seen) == 25                        # every offset in [-2, 2]^2 occurs
    assert (0, 0) in seen and (-2, 2) in seen
    again = random_shift(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(y, again)                  # the generator decides the offsets
    assert random_shift(x, 0, gen) is x


def _images(n=40, side=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, 1, side, side, generator=g),
                   torch.randint(0, 3, (n,), generator=g), 3)


def test_training_with_shifts_differs_from_training_without(tmp_path):
    data = _images()
    base = dict(dataset="digits", model="mlp", model_kwargs={"in_dim": 36, "hidden": [8], "out": 3}, method="ibp", eps=0.05,
                epochs=2, warmup_epochs=0, ramp_epochs=1, batch_size=10, eval_methods=["ibp"])
    plain = train(TrainConfig(**base, output=str(tmp_path / "a")), progress=False, data=(data, data))
    moved = train(TrainConfig(**base, augment_shift=1, output=str(tmp_path / "b")), progress=False,
                  data=(data, data))
    again = train(TrainConfig(**base, augment_shift=1, output=str(tmp_path / "c")), progress=False,
                  data=(data, data))
    w = [dict(s.net.named_parameters()) for s in (plain, moved, again)]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])     # and is reproducible


@pytest.mark.parametrize("shift, x, needle", [
    (6, torch.rand(10, 1, 6, 6), "larger than the shift"),
    (1, torch.rand(10, 36), "[10, 36]"),
])
def test_a_shift_the_data_cannot_take_is_a_config_error(tmp_path, shift, x, needle):
    data = Dataset(x, torch.zeros(10, dtype=torch.long), 3)
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": [4]}, epochs=1,
                      warmup_epochs=0, ramp_epochs=1, augment_shift=shift, output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="augment_shift") as e:
        train(cfg, progress=False, data=(data, data))
    assert needle in str(e.value)
    assert not (tmp_path / "o").exists()                         # nothing written


def test_a_negative_shift_is_a_config_error():
    with pytest.raises(ConfigError, match="'augment_shift': must be >= 0"):
        TrainConfig(augment_shift=-1)
