"""Certified training in under a minute: IBP-train a small MLP on scikit-learn's 8x8 digits at
L-inf eps 0.1, beside a naturally trained copy, and compare their certified accuracy on the
held-out digits (IBP and CROWN bounds, PGD as the empirical check).

    python examples/train_digits.py
"""
from __future__ import annotations

import tempfile

import torch

from verifier.train import TrainConfig, evaluate, load_digits_split, train

torch.set_num_threads(1)
data = (load_digits_split("train"), load_digits_split("test"))
with tempfile.TemporaryDirectory() as out:
    for method in ("natural", "ibp"):
        cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"in_dim": 64, "hidden": [64, 64]},
                          method=method, eps=0.1, epochs=20, warmup_epochs=1, ramp_epochs=10,
                          batch_size=64, lr=1e-3, seed=0, output=f"{out}/{method}")
        state = train(cfg, progress=False, data=data)
        r = evaluate(state.net, data[1], eps=0.1, methods=("ibp", "crown"), pgd_steps=20)
        cert = ", ".join(f"{k} {v:.3f}" for k, v in r["certified_acc"].items())
        print(f"{method:8s} clean {r['clean_acc']:.3f}  PGD {r['pgd_acc']:.3f}  certified: {cert}")
