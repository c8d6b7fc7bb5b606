"""Inputs on another scale than the model's (a uint8 image, 0-255, for a model of [0, 1]
inputs): never accepted silently. With a declared range (--clip) a center outside it is an
error; without one, integers above 1 get a warning that says how to scale (some models do take
raw pixels, so they still run)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def images(tiny, tmp_path):
    x = tiny["x"][:1]
    u8 = (x * 255).round().astype(np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    np.save(tmp_path / "f.npy", u8.astype(np.float32) / 255)
    np.savez(tmp_path / "u8.npz", x=(tiny["x"] * 255).round().astype(np.uint8), y=tiny["y"])
    np.savez(tmp_path / "f.npz", x=tiny["x"], y=tiny["y"])
    return tmp_path


def test_a_uint8_image_gets_a_warning_that_says_how_to_scale(cli, tiny, images):
    r = cli("bounds", tiny["model"], "--input", images / "u8.npy", "--eps", "1")
    assert r.code == 0 and "sample 0" in r.out
    warning = r.err.strip()
    assert warning.startswith("warning: input file") and "uint8" in warning
    u8 = np.load(images / "u8.npy")
    assert f"({u8.min()} to {u8.max()})" in warning and u8.max() > 1
    assert "/ 255" in warning and len(warning.splitlines()) == 1


def test_the_same_image_scaled_to_0_1_gets_no_warning(cli, tiny, images):
    r = cli("bounds", tiny["model"], "--input", images / "f.npy", "--eps", "0.01")
    assert r.code == 0 and r.err == ""


def test_a_center_farther_than_eps_outside_the_clip_range_is_an_error(cli, tiny, images):
    r = cli("bounds", tiny["model"], "--input", images / "u8.npy", "--eps", "0.03",
            "--clip", "0", "1")
    assert r.code == 2 and r.out == ""
    assert "outside --clip [0, 1]" in r.err and "empty" in r.err and "/ 255" in r.err


def test_a_center_within_eps_of_the_clip_range_is_accepted(cli, tiny, images, tmp_path):
    x = np.load(images / "f.npy")
    x.reshape(-1)[0] = 1.02                  # outside [0, 1], but the ball reaches in
    np.save(tmp_path / "near.npy", x)
    r = cli("bounds", tiny["model"], "--input", tmp_path / "near.npy", "--eps", "0.03",
            "--clip", "0", "1")
    assert r.code == 0 and r.err == ""


def test_a_uint8_box_gets_the_warning_too(cli, tiny, images):
    r = cli("bounds", tiny["model"], "--lower", images / "u8.npy", "--upper", images / "u8.npy")
    assert r.code == 0 and r.err.count("warning: ") == 2


def test_uint8_data_of_flatness_gets_the_warning(cli, tiny, images):
    common = ["--weights", "*", "--weight-eps", "0.001", "--attack-steps", "1"]
    r = cli("flatness", tiny["model"], "--data", images / "u8.npz", *common)
    assert r.code == 0 and "warning: data file" in r.err and "uint8" in r.err
    r = cli("flatness", tiny["model"], "--data", images / "f.npz", *common)
    assert r.code == 0 and "warning" not in r.err


def test_uint8_inputs_of_lipschitz_get_the_warning(cli, tiny, images):
    r = cli("lipschitz", tiny["model"], "--input", images / "u8.npy", "--label", "0")
    assert r.code == 0 and "warning: input file" in r.err and "uint8" in r.err
