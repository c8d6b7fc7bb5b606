"""Weight perturbations on the shipped MNIST classifier: which models near the trained weights
keep every prediction, how high the loss can go, and which layer is the most fragile.

Run: python examples/weight_flatness.py   (about 20 s on one core)
"""
from pathlib import Path

import torch

from verifier import BoundedModel, margin_spec
from verifier.analysis.flatness import flatness, load_npz
from verifier.analysis.sensitivity import sensitivity
from verifier.weights import WeightPerturbation

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent / "data"
model = BoundedModel.from_onnx(DATA / "lirpa_mnist_fc_3layer.onnx")
x, y = load_npz(DATA / "mnist_test100.npz")
x, y = x[:40], y[:40]

# 1. one digit: can any model within 0.1% of every weight change its prediction?
w = WeightPerturbation("*.weight", 0.001, relative=True)
res = model.bounds(x[:1], "crown", margin_spec(y[:1], 10), weights=w)
print(f"digit {int(y[0])}: smallest certified margin {res.lower.min().item():.3f} "
      f"-> {'no model in the set changes it' if bool(res.verified[0]) else 'not certified'}")

# 2. flatness: worst mean loss over every weight within eps (absolute), certified vs attacked
print("\n   eps   clean loss   attack (lower)   certified (upper)   certified accuracy")
for eps in (0.0005, 0.001, 0.002):
    r = flatness(model, (x, y), WeightPerturbation("*", eps), attack_steps=20)
    print(f"{eps:6g}   {r.clean_loss:10.4f}   {r.attack_loss:14.4f}   {r.certified_loss:17.4f}"
          f"   {r.certified_accuracy:18.2f}")

# 3. per-layer sensitivity: each layer's weights moved by 1% of their magnitude, alone
print("\nlayer   certified loss increase   attack increase")
for r in sensitivity(model, (x, y), 0.01, relative=True, attack_steps=20):
    print(f"{r.label:>5}   {r.certified_increase:23.4f}   {r.attack_increase:15.4f}")
