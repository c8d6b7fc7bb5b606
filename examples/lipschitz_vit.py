"""A Lipschitz-constrained vision transformer from the zoo, certified twice.

``lip_vit_mnist`` (``models.architectures.vit_lipschitz``: 1/d attention logits, convex
residuals, no LayerNorm, every matrix spectrally capped at 1 while training with Muon) has a
certified L2 Lipschitz constant on the input domain [0, 1]^784, composed through its graph with
attention included (softmax attention is not globally Lipschitz, so the domain is part of the
statement). This script

1. recomputes that constant and prints its attention nodes' part of the composition;
2. certifies the 100 test images shipped in examples/data from margins (margin > sqrt(2) L r, ball within [0, 1]);
3. runs CROWN on the L2 ball of one radius for a few images beside it;
4. checks the constant against autograd Jacobian norms at test images.

    python examples/lipschitz_vit.py

The benchmark that trained it, beside an unconstrained ViT: benchmarks/lipschitz_vit.py; the
how-to: docs/howto-lipschitz.md ("A Lipschitz vision transformer").
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `models` (the zoo)
from models import trained  # noqa: E402
from verifier.analysis.lipschitz import crown_l2, lipschitz_certify, lipschitz_constant  # noqa: E402
from verifier.analysis.flatness import load_npz  # noqa: E402

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent / "data" / "mnist_test100.npz"  # shipped: 100 MNIST test digits


def main() -> None:
    net, entry = trained("lip_vit_mnist")
    rep = lipschitz_constant(net, (1, 28, 28), domain=(0.0, 1.0))
    L = rep.lipschitz
    print(f"certified L2 Lipschitz constant on [0, 1]^784: {L:.4g} "
          f"(zoo entry: {entry['measured']['lipschitz']:.4g})")
    print(f"  {'node':<16} {'op':<10} {'constant':>9} {'cumulative':>10}  (attention's nodes)")
    for layer in rep.layers:
        if layer.op == "einsum" or layer.how.startswith("softmax"):
            print(f"  {layer.name:<16} {layer.op:<10} {layer.constant:>9.4g} "
                  f"{layer.cumulative:>10.4g}  {layer.how}")
    xs, ys = load_npz(DATA)
    xs, ys = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.long)
    radii = [0.05, 0.1, 0.2]
    cert = lipschitz_certify(net, xs, ys, L, radii)
    print(f"clean accuracy {cert['clean_acc']:.3f} on {len(ys)} test images; certified from L: "
          + ", ".join(f"r={r}: {v:.3f}" for r, v in cert["certified_acc"].items()))
    k, r = 2, 0.1
    c = crown_l2(net, xs[:k], ys[:k], r)
    print(f"CROWN, L2 ball r={r}, first {k} images: verified {c['verified'].tolist()}")
    # the constant bounds every Jacobian norm on the domain
    net64 = net.double()
    worst = 0.0
    for x in xs[:8].double():
        J = torch.autograd.functional.jacobian(lambda t: net64(t.unsqueeze(0))[0], x)
        worst = max(worst, float(torch.linalg.matrix_norm(J.reshape(10, -1), ord=2)))
    print(f"largest Jacobian norm at 8 test images: {worst:.4g} <= L = {L:.4g}")
    assert worst <= L and math.isfinite(L)


if __name__ == "__main__":
    main()
