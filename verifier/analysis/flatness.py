"""Certified flatness: how much can the loss rise when the weights move inside a set?

    res = flatness(model, (x, y), WeightPerturbation("*.weight", 0.01))
    res.certified_loss   # >= the mean loss of every model in the set (each sample's worst model)
    res.attack_loss      # the mean loss of one model in the set found by weight-space PGD
    res.certified_accuracy, res.stable_fraction

The certified bound per sample comes from lower bounds ``L_j`` on the margins
``m_j = f_y - f_j`` under the set (the spec merged into the last layer): cross-entropy is
``log(1 + sum_j exp(-m_j))``, decreasing in every margin, so ``log(1 + sum_j exp(-L_j))`` bounds
it from above for every weight in the set. The mean of the per-sample bounds bounds the mean
loss of every single model in the set (each sample may even take its own worst model). The
attack finds one model in the set and reports its mean loss over all the data: a lower bound
on the worst mean loss, so the true worst lies in ``[attack_loss, certified_loss]``.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..api import margin_spec
from ..devices import as_tensor
from ..errors import ShapeError, VerifierError
from ..weight_attack import evaluate, weight_pgd
from ..weights import ParameterSets

LOSSES = ("cross_entropy",)


@dataclass
class FlatnessResult:
    """Flatness of one model on one dataset under one parameter set (means over samples)."""

    n: int
    clean_loss: float           # mean loss of the unperturbed model
    certified_loss: float       # upper bound on the mean loss of any model in the set
    attack_loss: float          # mean loss of the attack's model (inside the set)
    clean_accuracy: float
    certified_accuracy: float   # correct, and no model in the set changes the prediction
    stable_fraction: float      # the prediction (right or wrong) cannot change
    method: str
    time_s: float
    per_sample_certified: list = field(default_factory=list, repr=False)
    label: str = ""             # what the set was (for tables)
    # per sample: certified correct, and prediction stable (the fractions above are their means)
    per_sample_correct: list = field(default_factory=list, repr=False)
    per_sample_stable: list = field(default_factory=list, repr=False)

    @property
    def certified_increase(self) -> float:
        return self.certified_loss - self.clean_loss

    @property
    def attack_increase(self) -> float:
        return self.attack_loss - self.clean_loss

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("per_sample")}
        d.update(certified_increase=self.certified_increase, attack_increase=self.attack_increase)
        return d


def ce_upper_from_margins(lower: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(-L_j))`` per sample, from margin lower bounds ``[N, K-1]`` (float64)."""
    z = torch.cat([lower.new_zeros(lower.shape[0], 1, dtype=torch.float64), -lower.double()], 1)
    return torch.logsumexp(z, 1)


def _data(model, data):
    """(x, y) tensors, an .npz path with arrays x and y, or an iterable of (x, y) batches."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = load_npz(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = data
        x = model.check_input(x, "data x")
        y = as_tensor(y, device=model.device).reshape(-1).long()
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"data has {x.shape[0]} inputs but {y.shape[0]} labels")
        return x, y
    xs, ys = zip(*[(model.check_input(a, "data x"), as_tensor(b, device=model.device).reshape(-1).long())
                   for a, b in data])
    return torch.cat(xs), torch.cat(ys)


def load_npz(path):
    """``x`` and ``y`` arrays from an .npz file, with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VerifierError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise VerifierError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if isinstance(z, np.ndarray):
        raise VerifierError(f"{path}: a single .npy array; the data is an .npz file with arrays "
                            "x (inputs) and y (integer labels): np.savez(PATH, x=x, y=y)")
    try:
        with z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise VerifierError(f"{path}: the .npz needs arrays 'x' and 'y'; missing "
                                    f"{missing} (has {z.files})")
            x, y = z["x"], z["y"]
    except VerifierError:
        raise
    except Exception as e:
        raise VerifierError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise VerifierError(f"{path}: x must be finite numbers")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise VerifierError(f"{path}: y must hold integer class labels")
    return torch.from_numpy(np.ascontiguousarray(x)).float(), torch.from_numpy(y.astype(np.int64))


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.double(), y, reduction="none")


def flatness(model, data, weights, loss: str = "cross_entropy", method: str = "crown",
             batch_size: int = 64, attack_steps: int = 30, attack_samples: int = 256,
             label: str = "", progress=None) -> FlatnessResult:
    """Certified and attacked loss under the parameter set ``weights`` (a ``WeightPerturbation``,
    ``WeightSegment`` or a list of them) over ``data`` (see ``_data``); the input is fixed.

    ``attack_samples``: the attack optimizes one model on that many samples (the first ones),
    then its loss is measured on all the data. ``progress(done, total)`` is called per batch.
    """
    if loss not in LOSSES:
        raise VerifierError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    t0 = time.perf_counter()
    x, y = _data(model, data)
    n_cls = math.prod(model.output_shape)
    if len(model.output_shape) != 1:
        raise ShapeError(f"flatness needs a classifier with a vector output, got shape "
                         f"{list(model.output_shape)}")
    if ((y < 0) | (y >= n_cls)).any():
        raise ShapeError(f"labels must lie in [0, {n_cls - 1}]")
    N = x.shape[0]
    if N == 0:
        raise ShapeError("the dataset is empty")
    clean_out = torch.cat([model.graph_forward(x[i:i + batch_size]).detach()
                           for i in range(0, N, batch_size)])
    clean = _ce(clean_out, y)
    pred = clean_out.argmax(1)
    cert, correct_cert, stable = [], [], []
    for i in range(0, N, batch_size):
        xb, yb, pb = x[i:i + batch_size], y[i:i + batch_size], pred[i:i + batch_size]
        r = model.bounds(xb, method, margin_spec(yb, n_cls, model.dtype), weights=weights)
        cert.append(ce_upper_from_margins(r.lower))
        correct_cert.append((r.lower > 0).all(1))
        # the prediction is stable when it is the label, or when its own margins are positive
        same = pb == yb
        st = (r.lower > 0).all(1) & same
        if bool((~same).any()):
            idx = (~same).nonzero().flatten()
            rp = model.bounds(xb[idx], method, margin_spec(pb[idx], n_cls, model.dtype), weights=weights)
            st[idx] = (rp.lower > 0).all(1)
        stable.append(st)
        if progress is not None:
            progress(min(i + batch_size, N), N)
    cert = torch.cat(cert)
    sets = ParameterSets(model.graph, weights, model.dtype)
    xa, ya = x[:attack_samples], y[:attack_samples]
    att = weight_pgd(sets, xa, lambda out: _ce(out, ya).mean(), steps=attack_steps, restarts=1)
    inp = sets.graph.leaves[0]
    with torch.no_grad():
        att_out = torch.cat([evaluate(sets.graph, {inp: x[i:i + batch_size], **att.leaves})[0]
                             for i in range(0, N, batch_size)])
    attack_loss = float(_ce(att_out, y).mean())
    # rounding can put a certified bound a hair below the clean loss of a sample; the true
    # worst loss is at least the clean one
    cert = torch.maximum(cert, clean)
    correct_cert, stable = torch.cat(correct_cert), torch.cat(stable)
    return FlatnessResult(
        n=N, clean_loss=float(clean.mean()), certified_loss=float(cert.mean()),
        attack_loss=attack_loss, clean_accuracy=float((pred == y).double().mean()),
        certified_accuracy=float(correct_cert.double().mean()),
        stable_fraction=float(stable.double().mean()), method=method,
        time_s=time.perf_counter() - t0, per_sample_certified=cert.tolist(), label=label,
        per_sample_correct=correct_cert.tolist(), per_sample_stable=stable.tolist())


def flatness_curve(model, data, make_weights, radii, **kw) -> list[FlatnessResult]:
    """``flatness`` at every radius: ``make_weights(eps)`` builds the set for one radius."""
    return [flatness(model, data, make_weights(e), label=f"eps={e:g}", **kw) for e in radii]


# --- reports ------------------------------------------------------------------------------------
COLUMNS = ("label", "n", "clean_loss", "certified_loss", "attack_loss", "certified_increase",
           "attack_increase", "clean_accuracy", "certified_accuracy", "stable_fraction", "method",
           "time_s")


def write_csv(results: list[FlatnessResult], path, extra: dict | None = None) -> None:
    cols = list(COLUMNS) + list(extra or {})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i, r in enumerate(results):
            row = {k: v for k, v in r.summary().items() if k in cols}
            for k, vals in (extra or {}).items():
                row[k] = vals[i]
            w.writerow(row)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a VerifierError that says how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VerifierError("plots need matplotlib (pip install matplotlib)") from None
    return plt


def plot_curve(results: list[FlatnessResult], radii, path, title: str = "") -> None:
    """Certified max loss and the attack's loss against the radius."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(radii, [r.certified_loss for r in results], "o-", label="certified upper bound")
    ax.plot(radii, [r.attack_loss for r in results], "s--", label="attack (lower bound)")
    ax.axhline(results[0].clean_loss, color="gray", lw=0.8, label="unperturbed")
    ax.set_xlabel("weight radius eps")
    ax.set_ylabel("mean cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title or "worst-case loss under weight perturbation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
