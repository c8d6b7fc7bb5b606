"""Weight-perturbation benchmark: our bounds against auto_LiRPA's, and against the naive
closed-form bound from layer norms.

Part 1, for every run of the auto_LiRPA reference (``tests/data/weights/reference.json``, the
784-64-64-10 MLP ``mlp3_seed0`` on one fixed MNIST input, weights of fc1..fc3 and, with
``bias``, their biases in a ball of radius eps): method, norm, eps, spec (logits, or margins
``f_2 - f_j``), our mean lower bound and the reference's, ``min_diff`` = the smallest of
``ours_lower - ref_lower`` and ``ref_upper - ours_upper`` over the rows (>= 0: at least as tight
everywhere; the upper side only where the reference has one), our CPU time (process time, one
thread, after a warm-up) and the reference's ``cpu_s`` (measured with 2 threads), and for
margin runs the mean over the rows of the smallest margin weight-space PGD finds (a point of the
set, so the true minimum lies between the certified lower bound and it). On the L2 runs the
reference's CROWN / CROWN-IBP numbers are not certified bounds (marked ``*``; see
``tests/data/weights/README.md``).

Part 2, the naive baseline. A chain ``h_0 = x``, ``h_l = sigma(T_l h_{l-1} + b_l)`` (l < L),
``f = T_L h_{L-1} + b_L``, where each ``T_l`` is a linear or convolutional layer as a matrix at its
input shape and ``sigma`` is 1-Lipschitz with ``sigma(0) = 0`` (ReLU, tanh, LeakyReLU; a flatten
is the identity). Let ``s_l = ||T_l||_2`` (spectral norm, exact by SVD of the dense operator),
``e_l >= ||dT_l||_2`` for every perturbation in the set, ``N_0 = ||x||_2``,
``N_l = s_l N_{l-1} + ||b_l||_2`` (so ``||h_l||_2 <= N_l``, since ``||sigma(z)||_2 <= ||z||_2``). With
``d_l = ||h'_l - h_l||_2`` (primes: perturbed weights), 1-Lipschitz sigma gives
``d_l <= ||T'_l h'_{l-1} - T_l h_{l-1}||_2 <= (s_l + e_l) d_{l-1} + e_l ||h_{l-1}||_2``, hence
``d_0 = 0``, ``d_l <= (s_l + e_l) d_{l-1} + e_l N_{l-1}`` and

    ||f_{W+dW}(x) - f_W(x)||_2 <= d_L = sum_l e_l N_{l-1} prod_{k>l} (s_k + e_k),

which for zero biases is ``(prod_l (s_l + e_l) - prod_l s_l) ||x||_2`` (telescoping). It bounds
every logit's deviation ``|f_j' - f_j|``. Column ``naive`` is that closed form; ``naive*``
replaces ``N_{l-1}`` by the clean activations' actual norms ``||h_{l-1}(x)||_2`` (still sound for
a fixed x, and tighter). The perturbation-size bounds used:

- L-inf, ``|dW| <= eps`` element-wise: ``|dT_l| <= eps P_l`` entry-wise, with ``P_l`` the 0/1
  connection pattern of the layer (all ones for a dense layer; a convolution's kernel of ones),
  so ``||dT_l||_2 <= || |dT_l| ||_2 <= eps ||P_l||_2``; for a dense m x n layer that is
  ``eps sqrt(m n)``, attained by the rank-one sign matrix ``eps·1 1^T`` (so not loose there; it
  equals ``eps sqrt(||P||_1 ||P||_inf)``).
- L2, one Frobenius ball of radius eps per tensor: dense ``||dW||_2 <= ||dW||_F <= eps``; a
  convolution ``||dT||_2 <= eps sqrt(c)``, c the largest number of output positions whose window
  holds one input pixel (``||dT z||^2 = sum_p ||dK patch_p(z)||^2 <= ||dK||_F^2 c ||z||^2``).

Ours: CROWN bounds of the logits (no spec) with the same weights perturbed (biases fixed),
``dev_j = max(upper_j - f_j, f_j - lower_j)``; ``x_worst = naive / max_j dev_j`` and
``x_mean = mean_j naive / dev_j`` say how many times tighter ours is (per logit). ``pgd`` is the
largest ``|f_j' - f_j|`` weight-space PGD finds for the logit with the largest dev (a lower bound
on the true deviation). Models: ``mlp3_seed0`` (the reference model and input) and the zoo's
``mlp`` and ``small_cnn`` (``models/architectures.py``, seed 0) on the first MNIST test digit of
``shared/datasets/mnist_test1k.npz`` (a seeded random image if it is absent).

    python benchmarks/weights.py [--quick] [--data DIR] [--shared DIR] [--threads N] [--repeat K]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.architectures import build  # noqa: E402
from verifier import BoundedModel, margin_spec  # noqa: E402
from verifier.weight_attack import weight_pgd  # noqa: E402
from verifier.weights import ParameterSets, WeightPerturbation  # noqa: E402

METHOD = {"IBP": "ibp", "CROWN-IBP": "crown-ibp", "CROWN": "crown", "alpha-CROWN": "alpha-crown"}


def _timed(fn, repeat: int):
    best, out = math.inf, None
    for _ in range(repeat):
        c0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - c0)
    return out, best


# ---------------------------------------------------------------------------- part 1: reference

def reference_table(data: Path, repeat: int, pgd_steps: int, pgd_restarts: int) -> None:
    ref = json.loads((data / "reference.json").read_text())
    bm = BoundedModel.from_onnx(data / "mlp3_seed0.onnx")
    x = torch.from_numpy(np.load(data / "mlp3_input.npy")).float()
    label = ref["spec_label"]
    C = margin_spec([label], 10)
    bm.bounds(x, "crown", spec=C, weights=WeightPerturbation("fc*.weight", 1e-3))  # warm-up
    attacks: dict[tuple, float] = {}
    print(f"{'method':>11s} {'norm':>4s} {'eps':>6s} {'spec':>6s} {'bias':>4s} {'mean_lb':>9s} "
          f"{'ref_lb':>9s} {'min_diff':>9s} {'ms':>7s} {'ref_ms':>7s} {'speedup':>7s} {'pgd':>8s}")
    for r in ref["runs"]:
        norm = math.inf if r["norm"] == "inf" else 2.0
        names = [f"fc{i}.weight" for i in (1, 2, 3)]
        if r["pert_bias"]:
            names += [f"fc{i}.bias" for i in (1, 2, 3)]
        w = WeightPerturbation(names, r["eps"], norm=norm)
        spec = C if r["spec"] == "margin" else None
        res, cpu = _timed(lambda: bm.bounds(x, METHOD[r["method"]], spec=spec, weights=w), repeat)
        lo = res.lower[0].double().numpy()
        up = res.upper[0].double().numpy()
        rl = np.array(r["lower"])
        diff = lo - rl
        if r["upper"] is not None:
            diff = np.concatenate([diff, np.array(r["upper"]) - up])
        pgd = ""
        if r["spec"] == "margin":
            key = (r["norm"], r["eps"], r["pert_bias"])
            if key not in attacks:
                sets = ParameterSets(bm.graph, w, torch.float32)
                vals = [-weight_pgd(sets, x, lambda o, j=j: -(C[0, j] @ o[0]), steps=pgd_steps,
                                    restarts=pgd_restarts, seed=j).value for j in range(C.shape[1])]
                attacks[key] = float(np.mean(vals))
            pgd = f"{attacks[key]:8.4f}"
        mark = "*" if norm == 2.0 and r["method"] in ("CROWN", "CROWN-IBP") else " "
        ms, ref_ms = 1e3 * cpu, 1e3 * r["cpu_s"]
        print(f"{r['method']:>11s} {r['norm'][:4]:>4s} {r['eps']:6g} {r['spec']:>6s} "
              f"{'y' if r['pert_bias'] else 'n':>4s} {lo.mean():9.4f} {rl.mean():9.4f}{mark}"
              f"{diff.min():9.2e} {ms:7.1f} {ref_ms:7.1f} {ref_ms / ms:6.1f}x {pgd}", flush=True)
    print("min_diff >= 0: at least as tight as auto_LiRPA on every row (lower and upper). "
          "ms: our process CPU time, 1 thread; ref_ms: auto_LiRPA's cpu_s (2 threads). pgd: mean "
          "margin found by weight PGD (the true minimum lies between mean_lb and pgd). "
          "*: auto_LiRPA's L2 CROWN/CROWN-IBP drop a cross term (not certified bounds).")


# ---------------------------------------------------------------------------- part 2: naive

def _dense_operator(layer: nn.Module, in_shape: tuple, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear part with the given weight, as a matrix ``[out_dim, in_dim]``."""
    if isinstance(layer, nn.Linear):
        return weight
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    y = nn.functional.conv2d(eye, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y.reshape(n, -1).T


class NaiveBound:
    """Per affine layer: ``s`` (spectral norm), ``pattern`` (||P||_2), ``count`` (c), ``bias``
    (||b||_2 at the output), ``act`` (||input||_2 on the clean forward pass)."""

    def __init__(self, net: nn.Sequential, x: torch.Tensor):
        self.layers = []
        h = x.double()
        with torch.no_grad():
            for m in net:
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    if isinstance(m, nn.Conv2d) and m.groups != 1:
                        raise ValueError("grouped convolutions are not handled")
                    in_shape = tuple(h.shape[1:])
                    W = m.weight.double()
                    T = _dense_operator(m, in_shape, W)
                    P = _dense_operator(m, in_shape, torch.ones_like(W))
                    out_ch = W.shape[0]
                    count = 1.0
                    if isinstance(m, nn.Conv2d):  # windows holding one pixel, one channel pair
                        per = T.shape[0] // out_ch
                        cols = P[:per].reshape(per, in_shape[0], -1)[:, 0, :]
                        count = float((cols > 0).sum(0).max())
                    b = m(torch.zeros(1, *in_shape)).double()
                    self.layers.append(dict(
                        s=float(torch.linalg.matrix_norm(T, 2)),
                        pattern=float(torch.linalg.matrix_norm(P, 2)),
                        count=count, bias=float(b.norm()), act=float(h.norm())))
                    h = copy.deepcopy(m).double()(h)
                elif isinstance(m, (nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.Flatten, nn.Identity)):
                    h = m(h)
                else:
                    raise ValueError(f"{type(m).__name__}: not a 1-Lipschitz layer with sigma(0) = 0")
        self.x_norm = float(x.double().norm())

    def e(self, layer: dict, eps: float, norm: float) -> float:
        return eps * (layer["pattern"] if norm == math.inf else math.sqrt(layer["count"]))

    def bound(self, eps: float, norm: float, clean_norms: bool = False) -> float:
        """``d_L``: the bound on ``||f' - f||_2`` (see the module doc)."""
        d, N = 0.0, self.x_norm
        for lay in self.layers:
            e = self.e(lay, eps, norm)
            d = (lay["s"] + e) * d + e * (lay["act"] if clean_norms else N)
            N = lay["s"] * N + lay["bias"]
        return d


def _mlp3(bm: BoundedModel) -> nn.Sequential:
    p = bm.parameters()
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for i, k in ((1, 1), (3, 2), (5, 3)):
            net[i].weight.copy_(p[f"fc{k}.weight"])
            net[i].bias.copy_(p[f"fc{k}.bias"])
    return net


def _mnist(shared: Path) -> torch.Tensor:
    f = shared / "datasets" / "mnist_test1k.npz"
    if f.exists():
        return torch.tensor(np.load(f)["images"][:1] / 255.0, dtype=torch.float32).reshape(1, 1, 28, 28)
    print(f"({f} not found: a seeded random image instead)")
    return torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def naive_table(data: Path, shared: Path, settings, pgd_steps: int, pgd_restarts: int) -> None:
    models = []
    bm = BoundedModel.from_onnx(data / "mlp3_seed0.onnx")
    x = torch.from_numpy(np.load(data / "mlp3_input.npy")).float()
    net = _mlp3(bm)
    assert torch.allclose(net(x), bm(x), atol=1e-5)
    models.append(("mlp3_seed0", bm, net, x, "fc*.weight"))
    xm = _mnist(shared)
    for name in ("mlp", "small_cnn"):
        net, shape = build(name, seed=0)
        models.append((name, BoundedModel(net, input_shape=shape), net, xm, "*.weight"))
    print(f"{'model':>10s} {'norm':>4s} {'eps':>6s} {'naive':>10s} {'naive*':>10s} {'ours_max':>9s} "
          f"{'ours_mean':>9s} {'pgd':>8s} {'x_worst':>8s} {'x_mean':>8s} {'x*_worst':>8s} {'ms':>6s}")
    for name, bm, net, x, pattern in models:
        nb = NaiveBound(net, x)
        f = bm(x)[0].double()
        for norm, eps in settings:
            w = WeightPerturbation(pattern, eps, norm=norm)
            c0 = time.process_time()
            res = bm.bounds(x, "crown", weights=w)
            ms = 1e3 * (time.process_time() - c0)
            dev = torch.maximum(res.upper[0].double() - f, f - res.lower[0].double())
            naive, naive_c = nb.bound(eps, norm), nb.bound(eps, norm, clean_norms=True)
            j = int(dev.argmax())
            sets = ParameterSets(bm.graph, w, torch.float32)
            found = max(weight_pgd(sets, x, lambda o, s=s: s * (o[0, j] - float(f[j])), steps=pgd_steps,
                                   restarts=pgd_restarts).value for s in (-1.0, 1.0))
            nm = "inf" if norm == math.inf else "2"
            print(f"{name:>10s} {nm:>4s} {eps:6g} {naive:10.4g} {naive_c:10.4g} {float(dev.max()):9.4g} "
                  f"{float(dev.mean()):9.4g} {found:8.4g} {naive / float(dev.max()):7.1f}x "
                  f"{float((naive / dev).mean()):7.1f}x {naive_c / float(dev.max()):7.1f}x {ms:6.0f}", flush=True)
        s = ", ".join(f"{lay['s']:.3g}" for lay in nb.layers)
        pn = ", ".join(f"{lay['pattern']:.4g}" for lay in nb.layers)
        print(f"{'':>10s} ({name}: ||x||_2 = {nb.x_norm:.3g}; spectral norms s_l = [{s}]; "
              f"||P_l||_2 = [{pn}])")
    print("naive: closed form from layer norms; naive*: with the clean activations' norms; "
          "ours: CROWN's max |f_j' - f_j| over the set (dev_j); x_worst = naive / max_j dev_j, "
          "x_mean = mean_j naive / dev_j (times tighter); pgd: a deviation weight PGD reaches.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "tests" / "data" / "weights"),
                    help="folder with reference.json, mlp3_seed0.onnx, mlp3_input.npy")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared/ folder (MNIST)")
    ap.add_argument("--quick", action="store_true", help="fewer eps values, shorter attacks")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions per run (min is kept)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "reference.json").exists():
        print(f"no reference data at {data}", file=sys.stderr)
        return 1
    steps, restarts = (10, 0) if args.quick else (30, 1)
    t0 = time.perf_counter()
    reference_table(data, args.repeat, steps, restarts)
    print()
    settings = [(math.inf, 1e-3), (2.0, 1e-1)] if args.quick else \
        [(math.inf, 1e-4), (math.inf, 1e-3), (math.inf, 1e-2), (2.0, 1e-2), (2.0, 1e-1)]
    naive_table(data, Path(args.shared), settings, steps, restarts)
    print(f"total {time.perf_counter() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
