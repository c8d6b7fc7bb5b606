"""Lipschitz-constrained training in seconds: train a small MLP on scikit-learn's 8x8 digits
with Muon and every layer's spectral norm capped at 1 (the soft cap coupled to Muon's step),
then certify: the model's L2 Lipschitz constant (composed per layer through the graph, at most
1 here), the L2 certified accuracy from margins (margin > sqrt(2) L r), CROWN's L2 verification
beside it, and an empirical check that no sampled pair of inputs beats the constant.

    python examples/train_lipschitz.py

Command line: ``verifier train --lipschitz spectral_soft_cap --optimizer muon --w-max 1 ...``
and ``verifier lipschitz MODEL.onnx``; the how-to: docs/howto-lipschitz.md.
"""
from __future__ import annotations

import torch

from verifier.lipschitz.train import LipschitzConfig, run_lipschitz
from verifier.train.data import load_digits_split

torch.set_num_threads(1)


def main() -> None:
    data = (load_digits_split("train"), load_digits_split("test").subset(200))
    for constraint in ("weight_decay", "spectral_soft_cap"):
        cfg = LipschitzConfig(model="mlp", model_kwargs={"in_dim": 64, "hidden": [64], "out": 10},
                              constraint=constraint, optimizer="muon", w_max=1.0, epochs=4,
                              radii=[0.1, 0.3], seed=0)
        rep = run_lipschitz(cfg, data=data)
        cert = ", ".join(f"r={r}: {v:.3f} (CROWN {rep['crown_certified_acc'][r]:.3f})"
                         for r, v in rep["certified_acc"].items())
        print(f"{constraint:18s} clean {rep['clean_acc']:.3f}  L {rep['lipschitz']:9.4g}  "
              f"certified {cert}")
        # the constant is an upper bound: no pair of nearby inputs may change the output faster
        net, x = rep["net"], data[1].x
        d = 1e-2 * torch.randn_like(x)
        with torch.no_grad():
            ratio = ((net(x + d) - net(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).max()
        print(f"{'':18s} largest sampled ||f(x+d) - f(x)|| / ||d||: {ratio:.4g} <= L")
        assert ratio <= rep["lipschitz"] * (1 + 1e-5)


if __name__ == "__main__":
    main()
