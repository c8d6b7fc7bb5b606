"""Flatness of LoRA adapters: fine-tune low-rank adapters of the zoo's vision transformer
``vit_mnist`` on shifted digits, then certify how far the loss can rise when only the adapters
move, compare with the same analysis on the full weights of the adapted layers, and certify
merging the adapter at every scale t of an interval.

    python examples/lora_flatness.py [--n 3] [--eps 0.002] [--pieces 2] [--one-piece] [--targets GLOB ...]

Adapters (rank 4) sit on the last block's MLP layers (``blocks.1.mlp.0``, ``blocks.1.mlp.2``):
with the input fixed, everything below them is one point, so only the tail is bounded. The
adapters are fitted for a few seconds on the first 60 test digits shifted by 1-3 pixels (their
accuracy is then measured on the 40 others); the analyses run on ``--n`` of the fine-tuning
digits (shifted by 2 pixels): the flatness of the minimum the adapters found. Every certified loss is an upper
bound on the mean cross-entropy of every model in the set; the attack's is the loss of one model
in the set, so the true worst lies between them. About 45 s of CPU on one core.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `models` (the zoo)

from models import trained  # noqa: E402
from verifier import BoundedModel  # noqa: E402
from verifier.analysis.flatness import flatness, load_npz  # noqa: E402
from verifier.analysis.lora import (ADAPTERS, adapter_sensitivity, add_lora, base_weights,  # noqa: E402
                                    fit_adapters, merge_flatness, merged)
from verifier.weights import WeightPerturbation  # noqa: E402

torch.set_num_threads(1)
TARGETS = ["blocks.1.mlp.0", "blocks.1.mlp.2"]
TRAIN_SHIFTS = [(1, 2), (2, 1), (2, 2), (2, 3), (3, 2)]


def shift(x, dy, dx):
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def row(name, r):
    print(f"  {name:<44} {r.certified_loss:9.4f} {r.attack_loss:9.4f} {r.certified_accuracy:8.2f} "
          f"{r.stable_fraction:7.2f}")


def header(title, clean):
    print(f"{title} (clean loss {clean:.4f})")
    print(f"  {'set':<44} {'certified':>9} {'attack':>9} {'cert acc':>8} {'stable':>7}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="fine-tuning digits to certify")
    ap.add_argument("--targets", nargs="+", default=TARGETS, help="linear layers to adapt (globs)")
    ap.add_argument("--eps", type=float, default=0.002, help="L-inf radius per weight entry")
    ap.add_argument("--pieces", type=int, default=2, help="pieces of the merge interval t in [0, 1]")
    ap.add_argument("--one-piece", action="store_true", help="also certify [0, 1] in one piece")
    args = ap.parse_args(argv)
    t0 = time.process_time()
    net, _ = trained("vit_mnist")
    x, y = load_npz(ROOT / "examples" / "data" / "mnist_test100.npz")
    xt = torch.cat([shift(x[:60], *s) for s in TRAIN_SHIFTS])
    yt = y[:60].repeat(len(TRAIN_SHIFTS))
    xs, ys = shift(x[60:], 2, 2), y[60:]

    lora = add_lora(net, args.targets, rank=4, alpha=8.0)
    losses = fit_adapters(lora, xt, yt, steps=40, lr=1e-2)
    with torch.no_grad():
        acc0 = (net(xs).argmax(1) == ys).double().mean().item()
        acc1 = (lora(xs).argmax(1) == ys).double().mean().item()
    print(f"adapters on {', '.join(args.targets)} (rank 4): training loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}; accuracy on the 40 held-out shifted digits {acc0:.2f} -> {acc1:.2f}")

    # flatness of the minimum the adapters found: on fine-tuning digits (shifted by (2, 2))
    data = (shift(x[:args.n], 2, 2), y[:args.n])
    model = BoundedModel(lora, input_shape=(1, 28, 28))
    eps = args.eps
    ad = flatness(model, data, WeightPerturbation(ADAPTERS, eps))
    full = flatness(model, data, WeightPerturbation(base_weights(lora), eps))
    header(f"\nflatness on {args.n} digits, L-inf radius {eps:g} per entry", ad.clean_loss)
    row("adapters (lora_A, lora_B)", ad)
    row("full weights of the adapted layers", full)
    assert ad.attack_loss <= ad.certified_loss + 1e-6 and full.attack_loss <= full.certified_loss + 1e-6

    header("\nper-module sensitivity, certified / attacked loss", ad.clean_loss)
    for full_w in (False, True):
        for r in adapter_sensitivity(model, lora, data, eps, full=full_w):
            row(f"{r.label} {'full weight' if full_w else 'adapter'}", r)

    base = BoundedModel(net, input_shape=(1, 28, 28))
    with torch.no_grad():
        base_loss = float(torch.nn.functional.cross_entropy(net(data[0]), data[1]))
    header("\nmerging W + t·s·B A into the base model (t = 0: base, t = 1: adapted)", base_loss)
    rows = [((0.0, 1.0), args.pieces), ((0.9, 1.1), 1)]
    if args.one_piece and args.pieces > 1:
        rows.insert(0, ((0.0, 1.0), 1))
    for t, pieces in rows:
        seg = merge_flatness(base, lora, data, t, pieces=pieces)
        # direct check: the merged models at sampled t stay under each sample's certified loss
        worst = 0.0
        for tt in torch.linspace(t[0], t[1], 11).tolist():
            with torch.no_grad():
                out = merged(lora, tt)(data[0])
            ce = torch.nn.functional.cross_entropy(out.double(), data[1], reduction="none")
            assert (ce <= torch.tensor(seg.per_sample_certified) + 1e-4).all(), tt
            worst = max(worst, float(ce.mean()))
        row(f"t in [{t[0]:g}, {t[1]:g}], {pieces} piece(s); sampled {worst:.4f}", seg)
    print(f"\n{time.process_time() - t0:.1f} s CPU")


if __name__ == "__main__":
    main()
