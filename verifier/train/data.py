"""Datasets for certified training, read from local files only (no downloads).

Every reader returns a ``Dataset``: ``x: [N, C, H, W]`` float32 pixels in [0, 1] and
``y: [N]`` int64 labels.

* ``read_idx(path)``: one IDX file (the MNIST / Fashion-MNIST format), plain or ``.gz``;
* ``load_idx_folder(folder, split)``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
* ``load_npz(path)``: arrays ``images`` (uint8 0-255 or floats in [0, 1]) and ``labels``;
* ``load_digits_split()``: the 1,797 8x8 handwritten digits (pixels 0-16 scaled to [0, 1]),
  split into train and test parts with a fixed permutation.

The digits ship with the package (``digits.npz``, 45 KB: ``images`` uint8 [1797, 8, 8] with
values 0-16, ``labels`` uint8 [1797]), so the default dataset of ``verifier train`` needs no
scikit-learn. They are the test part of the UCI "Optical Recognition of Handwritten Digits"
data set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), in the order in which scikit-learn's
``load_digits`` returns them (tests/test_dependencies.py compares the two where scikit-learn is
installed).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import VerifierError

# IDX element types (third byte of the magic number)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(VerifierError):
    """A dataset file or folder that is missing or malformed."""


@dataclass(repr=False)
class Dataset:
    """``x: [N, C, H, W]`` float32 in [0, 1]; ``y: [N]`` int64; ``n_classes``; ``name``."""

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, n: int | None) -> "Dataset":
        """The first ``n`` samples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return Dataset(self.x[:n], self.y[:n], self.n_classes, self.name)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, n={len(self)}, shape={list(self.input_shape)}, "
                f"classes={self.n_classes})")


def read_idx(path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` is decompressed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - head != count * dtype.itemsize:
        raise DataError(f"{path}: {len(raw) - head} data bytes, the header announces "
                        f"{count * dtype.itemsize} (shape {list(shape)})")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem} or {stem}.gz (expected the standard MNIST file names)")


def _images(arr: np.ndarray, where: str) -> torch.Tensor:
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise DataError(f"{where}: images of shape {list(a.shape)} (need [N, H, W] or [N, C, H, W])")
    if a.dtype == np.uint8:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
    else:
        x = torch.from_numpy(a.astype(np.float32))
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{where}: float images must lie in [0, 1] (got [{x.min():.3g}, "
                            f"{x.max():.3g}])")
    return x


def _labels(arr: np.ndarray, n: int, where: str) -> torch.Tensor:
    y = np.asarray(arr)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: {list(y.shape)} labels for {n} images")
    if not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers")
    return torch.from_numpy(y.astype(np.int64))


def load_idx_folder(folder, split: str = "train", name: str | None = None) -> Dataset:
    """MNIST-format files of one split ("train" or "test") from ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder")
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"unknown split {split!r}: use train or test")
    ximg = _find(folder, f"{prefix}-images-idx3-ubyte")
    x = _images(read_idx(ximg), str(ximg))
    ylab = _find(folder, f"{prefix}-labels-idx1-ubyte")
    y = _labels(read_idx(ylab), x.shape[0], str(ylab))
    return Dataset(x, y, max(10, int(y.max()) + 1) if len(y) else 10, name or f"{folder.name}:{split}")


def load_npz(path, name: str | None = None) -> Dataset:
    """An ``.npz`` with ``images`` and ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in ("images", "labels") if k not in d.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing} (holds {d.files})")
            x = _images(d["images"], str(path))
            y = _labels(d["labels"], x.shape[0], str(path))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    return Dataset(x, y, max(10, int(y.max()) + 1) if len(y) else 10, name or path.stem)


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def load_digits_split(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The shipped 1,797 8x8 digits (see the module doc), ``[N, 1, 8, 8]`` in [0, 1]; a fixed
    (seeded) split."""
    with np.load(DIGITS_FILE, allow_pickle=False) as d:
        images, labels = d["images"], d["labels"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")
    n_test = int(round(len(y) * test_fraction))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: use train or test")
    return Dataset(x[idx], y[idx], 10, f"digits:{split}")


def load_dataset(kind: str, path: str | None, split: str) -> Dataset:
    """``kind``: "digits" (no path), "idx" (a folder), "npz" (a file per split)."""
    if kind == "digits":
        return load_digits_split(split)
    if path is None:
        raise DataError(f"dataset {kind!r} needs a path for the {split} split")
    if kind == "idx":
        return load_idx_folder(path, split)
    if kind == "npz":
        return load_npz(path)
    raise DataError(f"unknown dataset kind {kind!r}: use digits, idx or npz")
