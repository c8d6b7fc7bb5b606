"""Our bounds under weight perturbations against auto_LiRPA 0.7.1's on the same problems.

The reference (``tests/data/weights/``, copied from ``shared/benchmarks/weights/``): a 784-64-64-10
ReLU MLP (``mlp3_seed0.onnx``), one fixed MNIST input, the weights of fc1..fc3 (plus the biases
when ``pert_bias``) each in a ball of radius eps, and IBP / CROWN-IBP / CROWN / alpha-CROWN
bounds of the logits or of the margins ``f_2 - f_j``.

- L-inf runs (the set is the same for both tools): ours at least as tight on every element for
  IBP (equal), CROWN-IBP and CROWN; alpha-CROWN at least as tight on average over the rows.
- L2 runs: auto_LiRPA's IBP uses the same per-row bound as ours (equal); its CROWN / CROWN-IBP
  numbers are not a certificate (a McCormick relaxation with the weight interval collapsed to
  [W, W], see ``tests/data/weights/README.md``), so only soundness is checked there, plus a case
  where dropping that cross term is visibly wrong (``test_l2_cross_term_is_kept``).
- Every run: the bounds contain weight-space PGD points, evaluated by an independent float64
  forward pass of the MLP.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, margin_spec
from verifier.weight_attack import weight_pgd
from verifier.weights import ParameterSets, WeightPerturbation

DATA = Path(__file__).resolve().parents[1] / "data" / "weights"
REF = json.loads((DATA / "reference.json").read_text())
RUNS = REF["runs"]
METHOD = {"IBP": "ibp", "CROWN-IBP": "crown-ibp", "CROWN": "crown", "alpha-CROWN": "alpha-crown"}
LABEL = REF["spec_label"]
TOL = 1e-4  # relative: |a - b| <= TOL * max(1, |ref|)


def run_id(r) -> str:
    norm = "inf" if r["norm"] == "inf" else "l2"
    return f"{r['method']}-{norm}-{r['eps']:g}-{r['spec']}" + ("-bias" if r["pert_bias"] else "")


def config(r) -> tuple:
    """The perturbation set and spec of a run (shared by its methods)."""
    return (r["norm"], r["eps"], r["spec"], r["pert_bias"])


def _runs(pred):
    sel = [r for r in RUNS if pred(r)]
    return pytest.mark.parametrize("run", sel, ids=[run_id(r) for r in sel])


@functools.lru_cache(maxsize=None)
def model():
    bm = BoundedModel.from_onnx(DATA / "mlp3_seed0.onnx")
    x = torch.from_numpy(np.load(DATA / "mlp3_input.npy")).float()
    return bm, x


def weights_of(r) -> WeightPerturbation:
    names = [f"fc{i}.weight" for i in (1, 2, 3)]
    if r["pert_bias"]:
        names += [f"fc{i}.bias" for i in (1, 2, 3)]
    return WeightPerturbation(names, r["eps"], norm=math.inf if r["norm"] == "inf" else 2)


def spec_of(r) -> torch.Tensor:
    """``[1, S, 10]``: the identity for logits, ``e_2 - e_j`` (j != 2 ascending) for margins."""
    if r["spec"] == "margin":
        return margin_spec([LABEL], 10)
    return torch.eye(10).unsqueeze(0)


@functools.lru_cache(maxsize=None)
def ours(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Our lower and upper bounds ``[S]`` for ``RUNS[i]`` (float64 numpy)."""
    r = RUNS[i]
    bm, x = model()
    C = spec_of(r) if r["spec"] == "margin" else None
    res = bm.bounds(x, METHOD[r["method"]], spec=C, weights=weights_of(r))
    return res.lower[0].double().numpy(), res.upper[0].double().numpy()


def bounds(r):
    return ours(RUNS.index(r))


def forward64(params: dict, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64, written out (independent of the graph and its rules): ``[10]``."""
    h = x.double().reshape(-1)
    for i in (1, 2, 3):
        h = params[f"fc{i}.weight"].double() @ h + params[f"fc{i}.bias"].double()
        if i < 3:
            h = h.clamp(min=0)
    return h


def test_copied_model_reproduces_the_reference_logits():
    bm, x = model()
    clean = torch.tensor(REF["clean_logits"], dtype=torch.float64)
    assert torch.allclose(forward64(bm.parameters(), x), clean, atol=1e-5)
    assert torch.allclose(bm(x)[0].double(), clean, atol=1e-5)
    assert int(clean.argmax()) == LABEL


@_runs(lambda r: r["norm"] == "inf" and r["method"] != "alpha-CROWN")
def test_linf_bounds_at_least_as_tight_as_reference(run):
    lo, up = bounds(run)
    rl, ru = np.array(run["lower"]), np.array(run["upper"])
    tl, tu = TOL * np.maximum(1, np.abs(rl)), TOL * np.maximum(1, np.abs(ru))
    assert (lo >= rl - tl).all(), ("lower looser than the reference", (lo - rl).min())
    assert (up <= ru + tu).all(), ("upper looser than the reference", (ru - up).min())
    if run["method"] == "IBP":  # the same interval arithmetic: equal
        assert (np.abs(lo - rl) <= tl).all() and (np.abs(up - ru) <= tu).all()


@_runs(lambda r: r["norm"] == "inf" and r["method"] == "alpha-CROWN")
def test_linf_alpha_crown_at_least_as_tight_on_average(run):
    lo, _ = bounds(run)
    rl = np.array(run["lower"])
    assert lo.mean() >= rl.mean() - TOL * max(1.0, abs(rl.mean())), (lo.mean(), rl.mean())


@_runs(lambda r: r["norm"] != "inf" and r["method"] == "IBP")
def test_l2_ibp_at_least_as_tight_as_reference(run):
    """The reference's L2 IBP (per-row ``|dw_o · x| <= eps ||x||``) is sound; ours uses the same
    per-row bound and also intersects with the layer's certified joint L2 deviation."""
    lo, up = bounds(run)
    rl, ru = np.array(run["lower"]), np.array(run["upper"])
    assert (lo >= rl - TOL * (1 + np.abs(rl))).all() and (up <= ru + TOL * (1 + np.abs(ru))).all()
    assert (lo > rl + 1e-3).any()  # the joint bound does tighten the hidden layers


def _attack_rows(S: int) -> list[int]:
    return [0, S - 1]


@functools.lru_cache(maxsize=None)
def attacks(cfg: tuple) -> list[tuple[int, float, float]]:
    """Weight-PGD on a few spec rows of a configuration: ``(row, min found, max found)``, each
    value the float64 forward pass at a point checked to lie in the set."""
    r = next(r for r in RUNS if config(r) == cfg)
    bm, x = model()
    w = weights_of(r)
    sets = ParameterSets(bm.graph, w, torch.float32)
    C = spec_of(r)[0].double()
    base = bm.parameters()
    out = []
    for j in _attack_rows(C.shape[0]):
        vals = []
        for sgn in (-1.0, 1.0):
            res = weight_pgd(sets, x, lambda o, j=j, s=sgn: s * (C[j].float() @ o[0]),
                             steps=15, restarts=1, seed=j)
            params = {**base, **res.params}
            for name in res.params:  # the point is inside the set
                d = (params[name].double() - base[name].double())
                if r["norm"] == "inf":
                    assert float(d.abs().max()) <= r["eps"] * (1 + 1e-5) + 1e-7, name
                else:
                    assert float(d.norm()) <= r["eps"] * (1 + 1e-5), name
            vals.append(float(C[j] @ forward64(params, x)))
        out.append((j, vals[0], vals[1]))
    return out


CONFIGS = sorted({config(r) for r in RUNS}, key=str)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]:g}-{c[2]}" + ("-bias" if c[3] else ""))
def test_bounds_contain_weight_attacks(cfg):
    """Every method's bounds (ours, and auto_LiRPA's L-inf ones) contain the attack's values."""
    found = attacks(cfg)
    for r in (r for r in RUNS if config(r) == cfg):
        lo, up = bounds(r)
        for j, vmin, vmax in found:
            tol = TOL * (1 + abs(vmin) + abs(vmax))
            assert lo[j] <= vmin + tol, (run_id(r), j, lo[j], vmin)
            assert up[j] >= vmax - tol, (run_id(r), j, up[j], vmax)
            if r["norm"] == "inf":
                assert r["lower"][j] <= vmin + tol, ("reference", run_id(r), j)
                assert r["upper"] is None or r["upper"][j] >= vmax - tol, ("reference", run_id(r), j)


@pytest.mark.parametrize("method", list(METHOD.values()))
def test_l2_cross_term_is_kept(method):
    """h = relu(W1 x), y = W2 h with x = (1, 1), W1 = I, W2 = 0 and Frobenius balls of radius 0.5
    (W1) and 1 (W2). The point W1 = I + 0.25·ones, W2 = -(1, 1)/sqrt(2) reaches
    y = -(sqrt(2) + 0.5·sqrt(2)) = -2.1213 (and +2.1213 mirrored), the exact extremes. A CROWN
    relaxation that keeps W2's interval at [W2, W2] (auto_LiRPA's L2 weights) drops the
    term (h - h_l)·dW2 and claims y >= -||h_l|| = -0.414."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].bias.zero_()
    bm = BoundedModel(net, input_shape=(2,))
    x = torch.ones(1, 2)
    w = [WeightPerturbation("0.weight", 0.5, norm=2), WeightPerturbation("2.weight", 1.0, norm=2)]
    worst = bm.graph_forward(x, {"0.weight": torch.eye(2) + 0.25, "2.weight": -torch.ones(1, 2) / math.sqrt(2)})
    assert abs(float(worst) + 1.5 * math.sqrt(2)) < 1e-5
    r = bm.bounds(x, method, weights=w)
    assert float(r.lower) <= -1.5 * math.sqrt(2) + 1e-5
    assert float(r.upper) >= 1.5 * math.sqrt(2) - 1e-5
