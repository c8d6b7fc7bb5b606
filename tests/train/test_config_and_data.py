"""Training configs (YAML, TOML, overrides) and their one-line errors; dataset readers (IDX
plain and gzip, .npz, scikit-learn digits) and their errors."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from verifier.train.config import ConfigError, from_dict, load_config
from verifier.train.data import DataError, load_digits_split, load_idx_folder, load_npz, read_idx


def test_yaml_and_toml_give_the_same_config_and_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("dataset: digits\nmodel: mlp\nmodel_kwargs: {in_dim: 64, hidden: [32]}\n"
                 "eps: 0.1\nepochs: 5\nramp_epochs: 3\nlr_milestones: [4]\n")
    t = tmp_path / "c.toml"
    t.write_text('dataset = "digits"\nmodel = "mlp"\neps = 0.1\nepochs = 5\nramp_epochs = 3\n'
                 'lr_milestones = [4]\n[model_kwargs]\nin_dim = 64\nhidden = [32]\n')
    a, b = load_config(y), load_config(t)
    assert a == b and a.model_kwargs == {"in_dim": 64, "hidden": [32]} and a.eps == 0.1
    c = load_config(y, {"eps": 0.3, "epochs": 7, "seed": None})   # None = flag not given
    assert (c.eps, c.epochs, c.seed) == (0.3, 7, 0)


@pytest.mark.parametrize("d, match", [
    ({"epoch": 3}, r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"),
    ({"eps": "0.1"}, r"'eps': expected a number"),
    ({"eps": 1.5}, r"'eps': 1.5 is outside \[0, 1\]"),
    ({"epochs": 2.5}, r"'epochs': expected an integer"),
    ({"method": "pgd"}, r"'method': 'pgd' is not one of natural, ibp, crown-ibp"),
    ({"epochs": 5, "warmup_epochs": 2, "ramp_epochs": 4}, r"'ramp_epochs'.*exceeds epochs = 5"),
    ({"dataset": "npz", "train_path": "a.npz"}, r"'test_path': dataset npz needs test_path"),
    ({"dataset": "idx"}, r"'train_path'"),
    ({"eval_methods": ["ibp", "beta-crown"]}, r"'eval_methods'"),
    ({"ibp_init": "yes"}, r"'ibp_init': expected true or false"),
    ({"lr": 0}, r"'lr': must be > 0"),
])
def test_config_errors_name_the_key(d, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(d)
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps: [0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    badt = tmp_path / "bad.toml"
    badt.write_text("eps = \n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(badt)
    lst = tmp_path / "list.yaml"
    lst.write_text("- eps\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(other)
    # a YAML tag that would construct an object is refused (safe_load), not evaluated
    evil = tmp_path / "evil.yaml"
    evil.write_text("eps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(evil)


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    data = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    ds = load_idx_folder(tmp_path, "test")
    assert ds.x.shape == (5, 1, 28, 28) and ds.x.dtype == torch.float32
    assert torch.equal(ds.x[:, 0], torch.from_numpy(imgs.astype(np.float32) / 255))
    assert ds.y.tolist() == [3, 1, 4, 1, 5]
    arr32 = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
    _write_idx(tmp_path / "a.idx", arr32, False)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), arr32)


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="no such dataset folder"):
        load_idx_folder(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte or train-images-idx3-ubyte.gz"):
        load_idx_folder(tmp_path, "train")
    (tmp_path / "x.idx").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "y.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="2 data bytes, the header announces 5"):
        read_idx(tmp_path / "y.idx")
    (tmp_path / "z.idx.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "z.idx.gz")


def test_npz_reader_and_errors(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    imgs[1, 3, 4] = 255
    np.savez(tmp_path / "ok.npz", images=imgs, labels=np.array([0, 1, 2, 9]))
    ds = load_npz(tmp_path / "ok.npz")
    assert ds.x.shape == (4, 1, 28, 28) and float(ds.x[1, 0, 3, 4]) == 1.0 and ds.n_classes == 10
    np.savez(tmp_path / "nolab.npz", images=imgs)
    with pytest.raises(DataError, match=r"missing array\(s\) \['labels'\]"):
        load_npz(tmp_path / "nolab.npz")
    np.savez(tmp_path / "short.npz", images=imgs, labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"\[2\] labels for 4 images"):
        load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "float.npz", images=imgs.astype(np.float32) * 2, labels=np.arange(4))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        load_npz(tmp_path / "float.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def test_digits_split_is_fixed_and_disjoint():
    tr, te = load_digits_split("train"), load_digits_split("test")
    assert len(tr) + len(te) == 1797 and tr.input_shape == (1, 8, 8)
    assert 0 <= float(tr.x.min()) and float(tr.x.max()) <= 1
    assert torch.equal(load_digits_split("test").x, te.x)
    a = {tuple(r) for r in tr.x.flatten(1).tolist()}
    assert sum(tuple(r) in a for r in te.x.flatten(1).tolist()) < 5   # (a few exact duplicates exist)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split():
    ds = load_idx_folder(FASHION, "test")
    assert ds.x.shape == (10000, 1, 28, 28) and ds.y.shape == (10000,)
    assert torch.bincount(ds.y).tolist() == [1000] * 10
