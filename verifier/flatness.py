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
import time
from dataclasses import asdict, dataclass, field

import torch

from .errors import ShapeError, VerifierError

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

    @property
    def certified_increase(self) -> float:
        return self.certified_loss - self.clean_loss

    @property
    def attack_increase(self) -> float:
        return self.attack_loss - self.clean_loss

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "per_sample_certified"}
        d.update(certified_increase=self.certified_increase, attack_increase=self.attack_increase)
        return d


def ce_upper_from_margins(lower: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(-L_j))`` per sample, from margin lower bounds ``[N, K-1]`` (float64)."""
    z = torch.cat([torch.zeros(lower.shape[0], 1, dtype=torch.float64), -lower.double()], 1)
    return torch.logsumexp(z, 1)


def _data(model, data):
    """(x, y) tensors, an .npz path with arrays x and y, or an iterable of (x, y) batches."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = load_npz(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = data
        x = model.check_input(torch.as_tensor(x), "data x")
        y = torch.as_tensor(y).reshape(-1).long()
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"data has {x.shape[0]} inputs but {y.shape[0]} labels")
        return x, y
    xs, ys = zip(*[(model.check_input(torch.as_tensor(a), "data x"), torch.as_tensor(b).reshape(-1).long())
                   for a, b in data])
    return torch.cat(xs), torch.cat(ys)


def load_npz(path):
    """``x`` and ``y`` arrays from an .npz file, with clear errors."""
    import os

    import numpy as np
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VerifierError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
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
    from .api import margin_spec
    from .weight_attack import weight_pgd
    from .weights import ParameterSets

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
    from .weight_attack import evaluate
    inp = sets.graph.leaves[0]
    with torch.no_grad():
        att_out = torch.cat([evaluate(sets.graph, {inp: x[i:i + batch_size], **att.leaves})[0]
                             for i in range(0, N, batch_size)])
    attack_loss = float(_ce(att_out, y).mean())
    # rounding can put a certified bound a hair below the clean loss of a sample; the true
    # worst loss is at least the clean one
    cert = torch.maximum(cert, clean)
    return FlatnessResult(
        n=N, clean_loss=float(clean.mean()), certified_loss=float(cert.mean()),
        attack_loss=attack_loss, clean_accuracy=float((pred == y).double().mean()),
        certified_accuracy=float(torch.cat(correct_cert).double().mean()),
        stable_fraction=float(torch.cat(stable).double().mean()), method=method,
        time_s=time.perf_counter() - t0, per_sample_certified=cert.tolist(), label=label)


def flatness_curve(model, data, make_weights, radii, **kw) -> list[FlatnessResult]:
    """``flatness`` at every radius: ``make_weights(eps)`` builds the set for one radius."""
    return [flatness(model, data, make_weights(e), label=f"eps={e:g}", **kw) for e in radii]


def sensitivity(model, data, eps: float, norm="inf", relative: bool = False,
                params: str = "weight", modules: list[str] | None = None, **kw) -> list[FlatnessResult]:
    """Per module, the certified (and attacked) loss increase when only that module's
    parameters move (``params``: "weight", "bias" or "both"); ranked by certified increase,
    largest first. A module is the layer that uses the parameters, named by their common prefix
    (``fc1`` for ``fc1.weight``, ``fc1.bias``) or else by the layer's node name."""
    from .graph.params import parameter_uses
    from .weights import WeightPerturbation
    if params not in ("weight", "bias", "both"):
        raise VerifierError(f"params must be weight, bias or both, got {params!r}")
    by_node: dict[str, list[str]] = {}
    for name, uses in parameter_uses(model.graph).items():
        node, role, _ = uses[0]
        if params == "both" or role == params:
            by_node.setdefault(node, []).append(name)
    groups: dict[str, list[str]] = {}
    for node, names in by_node.items():
        prefixes = {n.rpartition(".")[0] for n in names}
        label = prefixes.pop() if len(prefixes) == 1 and "" not in prefixes else node
        groups[label] = names
    if modules is not None:
        unknown = [m for m in modules if m not in groups]
        if unknown:
            raise VerifierError(f"unknown module(s) {unknown}; modules: {sorted(groups)}")
        groups = {m: groups[m] for m in modules}
    if not groups:
        raise VerifierError(f"no {params} parameters to perturb")
    out = [flatness(model, data, WeightPerturbation(names, eps, norm, relative), label=mod, **kw)
           for mod, names in groups.items()]
    return sorted(out, key=lambda r: -r.certified_increase)


def parameter_delta(base, other) -> dict:
    """``other - base`` per parameter: ``other`` is a model of the same architecture (a
    ``BoundedModel``) or a dict of parameter values; names and shapes must match."""
    mine = base.parameters()
    theirs = other.parameters() if hasattr(other, "parameters") and not isinstance(other, dict) else other
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise VerifierError(f"parameters {extra} are not in the base model (its parameters: "
                            f"{sorted(mine)})")
    out = {}
    for name, w in mine.items():
        if name in missing:
            continue
        v = torch.as_tensor(theirs[name]).to(w.dtype)
        if tuple(v.shape) != tuple(w.shape):
            raise ShapeError(f"parameter {name}: shape {list(v.shape)} differs from the base "
                             f"model's {list(w.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise VerifierError(f"parameter {name} of the other model holds NaN or inf")
        d = (v.double() - w.double()).to(w.dtype)
        if bool((d != 0).any()):
            out[name] = d
    return out


def _grid_steps(model, bits, per_channel, params):
    from .weights import select_parameters
    if not 2 <= bits <= 32:
        raise VerifierError(f"bits must lie in [2, 32], got {bits}")
    vals = model.parameters()
    levels = 2 ** (bits - 1) - 1
    for name in select_parameters(vals, params):
        w = vals[name].double()
        if per_channel and w.ndim > 1:
            m = w.abs().flatten(1).amax(1).view(-1, *([1] * (w.ndim - 1)))
        else:
            m = w.abs().max()
        yield name, w, (m / levels).clamp(min=torch.finfo(torch.float64).tiny)


def quantize_parameters(model, bits: int = 8, per_channel: bool = False,
                        params: str | list[str] = "*") -> dict:
    """The round-to-nearest copy of the selected parameters on a symmetric uniform grid of
    ``bits`` bits (step ``max|W| / (2^(bits-1) - 1)``, per tensor or per output channel)."""
    return {name: (torch.round(w / step) * step).to(torch.float32)
            for name, w, step in _grid_steps(model, bits, per_channel, params)}


def quantization_radii(model, bits: int = 8, per_channel: bool = False,
                       params: str | list[str] = "*") -> dict:
    """Per-element radii that cover every rounding of the selected parameters to that grid
    (half a step, plus 2^-20 relative slack for a quantizer that rounds in float32):
    ``WeightPerturbation(None, quantization_radii(m))`` certifies all such copies at once."""
    return {name: (step / 2 * (1 + 2 ** -20)).expand_as(w).clone()
            for name, w, step in _grid_steps(model, bits, per_channel, params)}


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


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VerifierError("plots need matplotlib (pip install matplotlib)") from None
    return plt


def plot_curve(results: list[FlatnessResult], radii, path, title: str = "") -> None:
    """Certified max loss and the attack's loss against the radius."""
    plt = _pyplot()
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


def plot_sensitivity(results: list[FlatnessResult], path, title: str = "") -> None:
    """Bars: certified and attacked loss increase per module."""
    plt = _pyplot()
    labels = [r.label for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 2), 3.8))
    idx = range(len(labels))
    ax.bar([i - 0.2 for i in idx], [r.certified_increase for r in results], 0.4, label="certified")
    ax.bar([i + 0.2 for i in idx], [r.attack_increase for r in results], 0.4, label="attack")
    ax.set_xticks(list(idx))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("loss increase")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(title or "per-module sensitivity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
