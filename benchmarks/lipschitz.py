"""Lipschitz-constrained training on MNIST: every (optimizer, constraint) pair at each w_max.

An MLP 784-256-256-10 is trained on the 10,000 MNIST training digits of ../shared/datasets/ and
evaluated on the 1,000 test images: clean accuracy, the certified L2 Lipschitz constant
(``verifier.lipschitz.lipschitz_constant``), L2 certified accuracy from margins
(m > sqrt(2) L r) at each radius, and, with --crown, CROWN's L2 verified accuracy on the same
model. Prints one table row per run, writes the rows as JSON and the accuracy-vs-bound plot.

    python benchmarks/lipschitz.py --epochs 5 --crown --out runs/lipschitz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--w-max", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--optimizers", nargs="+", default=["muon", "adamw"])
    p.add_argument("--constraints", nargs="+", default=None, help="default: all")
    p.add_argument("--radii", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--crown", action="store_true", help="also CROWN's L2 verification")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--data", default=str(DATA), help="folder of mnist_train10k.npz, mnist_test1k.npz")
    p.add_argument("--out", default="runs/lipschitz", help="folder for results.json, the plot, "
                   "and each run's state dict")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from verifier.lipschitz.constraints import CONSTRAINTS
    from verifier.lipschitz.train import LipschitzConfig, evaluate_lipschitz, train_lipschitz
    from verifier.train.data import load_npz
    torch.set_num_threads(1)
    train = load_npz(Path(a.data) / "mnist_train10k.npz").subset(a.train_subset)
    test = load_npz(Path(a.data) / "mnist_test1k.npz").subset(a.test_subset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    constraints = a.constraints or list(CONSTRAINTS)
    rows = []
    r_keys = [str(r) for r in a.radii]
    head = (f"{'optimizer':<6} {'constraint':<19} {'w_max':>5} {'clean':>6} {'L cert':>9} "
            + " ".join(f"{'cert@' + k:>8}" for k in r_keys)
            + ("" if not a.crown else " " + " ".join(f"{'crown@' + k:>9}" for k in r_keys))
            + f" {'train s':>7}")
    print(f"MNIST MLP 784-256-256-10, {len(train)} train / {len(test)} test, {a.epochs} epochs, "
          f"CE(T={a.temperature:g} * logits), 1 thread", flush=True)
    print(head, flush=True)
    for opt in a.optimizers:
        for con in constraints:
            for w in a.w_max:
                cfg = LipschitzConfig(model="mlp", model_kwargs={"in_dim": 784, "hidden": [256, 256],
                                                                 "out": 10},
                                      constraint=con, w_max=w, optimizer=opt, epochs=a.epochs,
                                      temperature=a.temperature, seed=a.seed, radii=a.radii,
                                      crown=a.crown)
                t0 = time.perf_counter()
                res = train_lipschitz(cfg, train)
                rep = evaluate_lipschitz(res.net, test, a.radii, crown=a.crown)
                name = f"{opt}_{con}_w{w:g}"
                torch.save(res.net.state_dict(), out / f"{name}.pt")
                row = {"optimizer": opt, "constraint": con, "w_max": w, "clean_acc": rep["clean_acc"],
                       "lipschitz": rep["lipschitz"], "certified_acc": rep["certified_acc"],
                       "crown_certified_acc": rep.get("crown_certified_acc"),
                       "crown_local_constant_median": rep.get("crown_local_constant_median"),
                       "train_time_s": round(res.train_time_s, 1),
                       "total_time_s": round(time.perf_counter() - t0, 1), "epochs": a.epochs,
                       "state_dict": str(out / f"{name}.pt")}
                rows.append(row)
                line = (f"{opt:<6} {con:<19} {w:>5g} {rep['clean_acc']:>6.3f} {rep['lipschitz']:>9.4g} "
                        + " ".join(f"{rep['certified_acc'][k]:>8.3f}" for k in r_keys))
                if a.crown:
                    line += " " + " ".join(f"{rep['crown_certified_acc'][k]:>9.3f}" for k in r_keys)
                print(line + f" {res.train_time_s:>7.1f}", flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "accuracy_vs_bound.png", r_keys)
    print(f"results: {out / 'results.json'}; plot: {out / 'accuracy_vs_bound.png'}")
    return 0


def plot(rows, path, r_keys) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 1 + len(r_keys), figsize=(5 * (1 + len(r_keys)), 4.2))
    keys = sorted({(r["optimizer"], r["constraint"]) for r in rows})
    markers = {"muon": "o", "adamw": "s"}
    cmap = plt.get_cmap("tab10")
    cons = sorted({c for _, c in keys})
    for opt, con in keys:
        sel = sorted((r for r in rows if r["optimizer"] == opt and r["constraint"] == con),
                     key=lambda r: r["lipschitz"])
        xs = [r["lipschitz"] for r in sel]
        style = dict(marker=markers.get(opt, "x"), color=cmap(cons.index(con)),
                     linestyle="-" if opt == "muon" else "--", label=f"{opt} + {con}")
        axes[0].plot(xs, [r["clean_acc"] for r in sel], **style)
        for ax, k in zip(axes[1:], r_keys):
            ax.plot(xs, [r["certified_acc"][k] for r in sel], **style)
    axes[0].set_ylabel("clean accuracy")
    for ax, k in zip(axes[1:], r_keys):
        ax.set_ylabel(f"L2 certified accuracy at r = {k}")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("certified Lipschitz constant L (log)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("MNIST MLP 784-256-256-10: accuracy vs certified Lipschitz bound (w_max 1, 2, 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
