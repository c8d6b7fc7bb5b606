"""Where do CROWN's intermediate bounds lose? Per node, the ratio of CROWN's interval width to a
first-order estimate of the node's true range over the same input box.

The estimate is ``2 sum_i |y(x0 + r_i e_i) - y(x0)|`` in float64 (``x0``: the box's center,
``r_i``: its radius in input coordinate i): the range of the linearization at the center, by
one finite difference per input coordinate. It is an estimate, not a bound (the second-order
terms are left out), but unlike sampling it does not understate the range of a map that sums
many small independent contributions (uniform samples of a 784-pixel box reach about half of a
linear map's range). A ratio near 1 means CROWN is nearly exact at that node; the first node
down the graph whose ratio jumps is where the relaxations start to compound.

    python benchmarks/tightness.py MODEL.onnx XL.npy XU.npy [--index I] [--read-only]
        [--method crown|crown-ibp]

``--read-only`` prints only the nodes whose interval a nonlinear rule reads (the others keep
IBP's interval, which CROWN never refines). Example (the tiny ViT's box 2)::

    python benchmarks/tightness.py ../shared/benchmarks/modern/vit_tiny.onnx \\
        ../shared/benchmarks/modern/vit_tiny_xl.npy ../shared/benchmarks/modern/vit_tiny_xu.npy \\
        --index 2 --read-only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verifier import BoundedModel, Box  # noqa: E402
from verifier.bounds.forward import evaluate  # noqa: E402
from verifier.ops import RULES  # noqa: E402

CHUNK = 64  # input coordinates per float64 evaluation batch


def first_order_width(bm64: BoundedModel, lower: torch.Tensor, upper: torch.Tensor) -> dict:
    """``{node: [*shape]}`` the estimated width ``2 sum_i |y(x0 + r_i e_i) - y(x0)|`` (float64)
    for one box ``lower, upper: [1, *in_shape]``."""
    lo, up = lower.double(), upper.double()
    x0 = (lo + up) / 2
    r = ((up - lo) / 2).flatten()
    nz = (r > 0).nonzero().flatten()
    with torch.no_grad():
        _, base = evaluate(bm64.graph, {bm64.input: x0})
        acc = {k: torch.zeros_like(v[0]) for k, v in base.items()}
        for k in range(0, nz.numel(), CHUNK):
            idx = nz[k:k + CHUNK]
            P = x0.repeat(idx.numel(), *[1] * (x0.ndim - 1))
            P.view(idx.numel(), -1)[torch.arange(idx.numel()), idx] += r[idx]
            _, vals = evaluate(bm64.graph, {bm64.input: P})
            for name, v in vals.items():
                acc[name] += (v - base[name]).abs().sum(0)
    return {k: 2 * v for k, v in acc.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("xl")
    ap.add_argument("xu")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--method", default="crown", choices=["crown", "crown-ibp"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bm = BoundedModel.from_onnx(args.model)
    bm64 = BoundedModel.from_onnx(args.model, dtype=torch.float64)
    i = args.index
    lower = torch.tensor(np.load(args.xl)[i:i + 1])
    upper = torch.tensor(np.load(args.xu)[i:i + 1])
    res = bm.bounds(Box(lower, upper), args.method)
    est = first_order_width(bm64, lower, upper)
    g = bm.graph
    print(f"{'node':45s} {'op':11s} {'width':>10s} {'estimate':>10s} {'ratio':>7s} {'median':>7s}")
    for name in g.order:
        node = g[name]
        if node.op == "input" or name not in res.nodes or name not in est:
            continue
        if args.read_only and not any(RULES[c.op].needs_bounds for c in g.consumers(name)):
            continue
        b = res.nodes[name]
        w = (b.upper[0] - b.lower[0]).double()
        e = est[name]
        med = (w / e.clamp(min=1e-12)).median()
        print(f"{name:45s} {node.op:11s} {float(w.mean()):10.4g} {float(e.mean()):10.4g} "
              f"{float(w.mean() / e.mean().clamp(min=1e-300)):7.3g} {float(med):7.3g}")


if __name__ == "__main__":
    main()
