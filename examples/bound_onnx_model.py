"""Bound an ONNX classifier: the shipped 3-layer MNIST network, one digit, several radii.

    python examples/bound_onnx_model.py

Loads ``examples/data/lirpa_mnist_fc_3layer.onnx`` (784-128-64-10, ReLU) with
``BoundedModel.from_onnx``, the digit in ``examples/data/mnist_sample.npy`` and its label in
``examples/data/mnist_label.npy``, and bounds the 9 margins ``f_y - f_j`` over L-inf balls of
growing radius (clipped to the pixel range [0, 1]) with IBP, CROWN-IBP and CROWN. The same
numbers come out of ``verifier bounds ... --method crown`` on the command line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from verifier import BoundedModel, LpBall, margin_spec

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    model = BoundedModel.from_onnx(DATA / "lirpa_mnist_fc_3layer.onnx")
    print(f"model: input {list(model.input_shape)}, output {list(model.output_shape)}")
    print("graph:", model.graph)

    x = torch.from_numpy(np.load(DATA / "mnist_sample.npy"))      # [1, 1, 28, 28] in [0, 1]
    label = int(np.load(DATA / "mnist_label.npy").reshape(-1)[0])
    logits = model(x)
    print(f"\nlabel {label}, prediction {logits.argmax(1).item()}")
    spec = margin_spec([label], n_classes=10)                      # [1, 9, 10]

    print(f"\nsmallest margin lower bound (> 0: verified) per radius")
    print(f"{'eps':>7} {'ibp':>10} {'crown-ibp':>10} {'crown':>10}")
    for eps in (0.0, 0.005, 0.01, 0.02, 0.03):
        ball = LpBall(x, eps=eps, clip=(0.0, 1.0))
        row = [model.bounds(ball, method=m, spec=spec).lower.min().item()
               for m in ("ibp", "crown-ibp", "crown")]
        print(f"{eps:7.3f} " + " ".join(f"{v:10.4f}" for v in row))

    # Intermediate bounds, by node name (the ONNX node names in fx's style, as listed above)
    res = model.bounds(LpBall(x, eps=0.01, clip=(0.0, 1.0)), method="crown", spec=spec)
    for node in ("_1_gemm", "_3_gemm"):
        iv = res[node]
        unstable = ((iv.lower < 0) & (iv.upper > 0)).sum().item()
        print(f"eps 0.01, node {node} {list(iv.shape)}: {unstable} unstable ReLU inputs")


if __name__ == "__main__":
    main()
