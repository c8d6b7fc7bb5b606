"""Certify a vision transformer: the zoo's ``vit_mnist`` (LayerNorm, softmax attention, a ReLU
MLP) under an L-inf ball, first as a PyTorch model, then as ONNX against a VNN-LIB property.

    python examples/verify_transformer.py

For a few MNIST test digits: IBP and CROWN bounds on the margins ``f_y(x) - f_j(x)`` over the
ball of radius eps (clipped to [0, 1]); a digit is certified when every margin's lower bound is
positive. Then ``verify`` decides the same question for one digit from the model's ONNX file and
a VNN-LIB property (attack, then bounds, then branch and bound), as ``verifier verify`` does.
About 30 s on a laptop CPU (CROWN takes about 4 s per digit on one core).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `models` (the zoo)

from models import trained  # noqa: E402
from verifier import BoundedModel, LpBall, margin_spec  # noqa: E402
from verifier.complete import verify  # noqa: E402

torch.set_num_threads(1)
EPS = 0.002


def vnnlib(x: np.ndarray, y: int, eps: float) -> str:
    """The robustness property of one image: a counterexample is a point of the clipped ball
    where some other class scores at least as high as ``y``."""
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    n = x.size
    out = [f"(declare-const X_{i} Real)" for i in range(n)]
    out += [f"(declare-const Y_{j} Real)" for j in range(10)]
    out += [f"(assert (>= X_{i} {lo[i]:.9g}))\n(assert (<= X_{i} {hi[i]:.9g}))" for i in range(n)]
    out.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{y}))" for j in range(10) if j != y) + "))")
    return "\n".join(out) + "\n"


def main() -> None:
    net, entry = trained("vit_mnist")
    print(f"model vit_mnist: {entry['arch']} {entry['arch_kwargs']} "
          f"(clean accuracy {entry['measured']['clean_acc']:.1%} on the test images)")
    model = BoundedModel(net, input_shape=tuple(entry["input_shape"]))
    data = np.load(ROOT / "examples" / "data" / "mnist_test100.npz")
    X = torch.as_tensor(data["x"][:4], dtype=torch.float32).reshape(-1, 1, 28, 28)
    Y = torch.as_tensor(data["y"][:4]).long()
    C = margin_spec(Y, 10)
    worst = {}
    for method in ("ibp", "crown"):
        t0 = time.process_time()
        # one digit per call: CROWN's intermediate passes on a transformer are wide (the
        # softmax's pairwise differences), a batch only makes their chunks smaller
        low = torch.cat([model.bounds(LpBall(X[i:i + 1], EPS, clip=(0.0, 1.0)), method,
                                      spec=C[i:i + 1]).lower for i in range(len(Y))])
        dt = time.process_time() - t0
        worst[method] = low.min(1).values
        print(f"{method:6s} eps {EPS}: certified {int((worst[method] > 0).sum())}/{len(Y)}; worst "
              f"margin lower bound per digit {[round(float(v), 3) for v in worst[method]]} "
              f"({dt:.1f} s)")

    # the same question from the ONNX file and a VNN-LIB property, for a digit CROWN certifies
    # (branch and bound on the others would run past any short budget on a transformer)
    i = int(worst["crown"].argmax())
    with tempfile.TemporaryDirectory() as tmp:
        prop = Path(tmp) / "vit_robust.vnnlib"
        prop.write_text(vnnlib(X[i].reshape(-1).numpy().astype(np.float64), int(Y[i]), EPS))
        v = verify(str(ROOT / entry["onnx"]), str(prop), timeout=60)
        print(f"verify {Path(entry['onnx']).name} against the property of digit {i}: {v.status} "
              f"({v.reason}; {v.time_s:.1f} s)")


if __name__ == "__main__":
    main()
