"""Bound a PyTorch model: IBP vs CROWN on the margins of a small CNN under an L-inf ball.

    python examples/bound_pytorch_model.py

Builds ``small_cnn`` from the model zoo (random weights, fixed seed), wraps it in a
``BoundedModel``, and bounds the margins ``f_y(x) - f_j(x)`` of 4 random inputs over the L-inf
ball of radius eps (clipped to the pixel range [0, 1]) with IBP, CROWN-IBP and CROWN. Then it
prints the bounds of one intermediate node (the second convolution) by its node name.
Runs in a few seconds on a laptop CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `models` (the zoo)

from models import small_cnn  # noqa: E402
from verifier import BoundedModel, LpBall, margin_spec  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    net = small_cnn(in_ch=1, n_classes=10, input_size=28)
    model = BoundedModel(net, input_shape=(1, 28, 28))
    print("graph:", model.graph)

    x = torch.rand(4, 1, 28, 28)
    labels = model(x).argmax(dim=1)      # the model's own predictions as the labels
    spec = margin_spec(labels, n_classes=10)
    eps = 0.002
    ball = LpBall(x, eps=eps, clip=(0.0, 1.0))

    print(f"\nmargins f_y - f_j over the L-inf ball of radius {eps} (4 samples, 9 margins each)")
    print(f"{'method':>10} {'min lower':>11} {'mean lower':>11} {'verified':>9} {'time (s)':>9}")
    results = {}
    for method in ("ibp", "crown-ibp", "crown"):
        res = model.bounds(ball, method=method, spec=spec)
        results[method] = res
        print(f"{method:>10} {res.lower.min().item():11.4f} {res.lower.mean().item():11.4f} "
              f"{int(res.verified.sum()):>6} / 4 {res.time_s:9.4f}")

    crown = results["crown"]
    print("\nCROWN margin lower bounds, sample 0 (label "
          f"{labels[0].item()}):", [round(v, 4) for v in crown.lower[0].tolist()])

    # Intermediate bounds are keyed by node name: nn.Sequential's layers are "_0", "_1", ...
    # (print(model.graph) lists them). "_2" is the second convolution, the input of a ReLU:
    # CROWN tightens it (the first convolution's IBP box is already exact).
    for method in ("ibp", "crown"):
        iv = results[method]["_2"]
        unstable = ((iv.lower < 0) & (iv.upper > 0)).sum().item()
        print(f"{method:>5} bounds of node _2 {list(iv.shape)}: mean width "
              f"{(iv.upper - iv.lower).mean().item():.5f}, {unstable} unstable ReLU inputs")


if __name__ == "__main__":
    main()
