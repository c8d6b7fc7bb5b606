"""Style shifts: certify the zoo's MNIST CNN against per-channel mean/std shifts of its input
and of its first feature map (zonotope sets ``x = c + z G``, z in a box of a few dimensions).

For each magnitude: the fraction of images certified by CROWN, beside the fraction an attack
cannot break (PGD in z: no method can certify more), and the worst margin of the first image
three ways: certified lower bound <= attacked minimum <= sampled minimum. Then branch and
bound over z decides the images CROWN left open at the input's largest shift.

Run: python examples/style_shift.py   (about 30 s on one core)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `models` (the zoo)

from models import trained  # noqa: E402
from verifier import BoundedModel, margin_spec  # noqa: E402
from verifier.attack import zonotope_pgd  # noqa: E402
from verifier.complete.zonotope_bab import robustness_conjunctions, zonotope_bab  # noqa: E402
from verifier.perturbation import style_shift  # noqa: E402

torch.set_num_threads(1)
t_start = time.perf_counter()
N = 20
net, entry = trained("nat_mnist")         # Conv-ReLU-Conv-ReLU-Linear-ReLU-Linear, MNIST
model = BoundedModel(net, (1, 28, 28))
data = np.load(ROOT / "examples" / "data" / "mnist_test100.npz")
x = torch.tensor(data["x"][:N], dtype=torch.float32).reshape(N, 1, 28, 28)
y = torch.tensor(data["y"][:N]).long()
C = margin_spec(y, 10)                                   # rows e_y - e_j: margins
correct = net(x).argmax(1) == y


def report(where, Z, place, tail):
    """CROWN bounds of the margins over Z, PGD in z and samples of Z through ``tail``."""
    t0 = time.perf_counter()
    res = model.bounds(place(Z), "crown", spec=C)
    t = time.perf_counter() - t0
    cert = res.verified & correct
    att = zonotope_pgd(tail, Z, -C, steps=20, restarts=1)            # maximize -margin
    unbroken = (-att.value).min(1).values > 0
    with torch.no_grad():
        pts = Z.sample(200, torch.Generator().manual_seed(0))       # [200, N, *shape]
        m = torch.einsum("bso,nbo->nbs", C, tail(pts.flatten(0, 1)).view(200, N, 10))
    lb, a, s = res.lower[0].min(), (-att.value[0]).min(), m[:, 0].min()
    print(f"{where:>14} {Z.k:>3}  {cert.float().mean():9.2f}  {(unbroken & correct).float().mean():9.2f}"
          f"   {lb:9.3f} <= {a:8.3f} <= {s:8.3f}   {t:5.1f}s")
    return res


print(f"nat_mnist, {N} test images ({int(correct.sum())} classified correctly); "
      "y_c = mu_c + (1 + s_c)(x_c - mu_c) + t_c, |s_c| <= sigma, |t_c| <= tau")
print(f"{'set':>14} {'k':>3}  {'certified':>9}  {'unbroken':>9}   "
      f"{'image 0: bound <= attack <= sampled margin':>43}")

# 1. the input image: one channel -> 2 generators (its contrast about its mean, its brightness)
results = {}
for mag in (0.02, 0.05, 0.1):
    Z = style_shift(x, sigma=mag, tau=mag)
    results["input", mag] = report(f"input {mag:g}", Z, lambda Z: Z, net)

# 2. the first feature map (the first ReLU's output, 16 channels -> 32 generators)
node = next(n.name for n in model.graph if n.op == "relu")
feat = model.node_values(x)[node]
assert torch.allclose(feat, net[:2](x), atol=1e-5)     # that node is net[:2]'s output
for mag in (0.02, 0.05, 0.1):
    Z = style_shift(feat, sigma=mag, tau=mag)
    results["feature", mag] = report(f"feature {mag:g}", Z, lambda Z: {node: Z}, net[2:])

# 3. complete verdicts: branch and bound over z in [-1, 1]^k on the images CROWN left open
print()
for where, mag, base, at in (("input", 0.1, x, None), ("feature", 0.05, feat, node)):
    res = results[where, mag]
    open_ = [i for i in range(N) if correct[i] and not res.verified[i]]
    t0 = time.perf_counter()
    verdicts = []
    for i in open_:
        Z = style_shift(base[i:i + 1], mag, mag)
        v = zonotope_bab(model, Z, *robustness_conjunctions(int(y[i]), 10), node=at, timeout=3)
        verdicts.append(v.status)
        if v.status == "sat" and at is None:           # replayed: the shifted image is misread
            assert int(net(v.x).argmax()) != int(y[i])
    done = int((res.verified & correct).sum()) + verdicts.count("unsat")
    rest = len(verdicts) - verdicts.count("unsat") - verdicts.count("sat")
    print(f"{where} {mag:g}, branch and bound over z on the {len(open_)} images CROWN left open "
          f"({time.perf_counter() - t0:.1f}s): {verdicts.count('unsat')} unsat, "
          f"{verdicts.count('sat')} sat, {rest} undecided -> certified {done / N:.2f}")
print(f"total {time.perf_counter() - t_start:.1f}s")
