"""Per-batch cost of one certified-training step (not part of the test suite).

One step = the clean forward pass, the loss's bounds (none, IBP, or IBP + CROWN-IBP), the
backward pass and the optimizer step: ``verifier.train.trainer.train_step`` exactly as
``verifier train`` runs it. For each model the four methods are timed in turns (natural, IBP,
CROWN-IBP, CROWN-IBP with loss fusion, repeated), each step on a fresh batch of the shipped MNIST training digits (random
pixels where the file is missing), and the median wall time per step is printed with the ratio
CROWN-IBP / IBP (crown-ibp-lf: ``loss_fusion``, one backward row per sample).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py                 # cnn_cert 32/256 and 16/128
    python benchmarks/train_step.py --reps 20 --eps 0.3 --beta 1.0 --models 32:256
    python benchmarks/train_step.py --profile crown-ibp               # torch.profiler table

Settings: batch 100, eps 0.3 (L-inf, pixel scale), kappa 0.5, beta 1 (the loss's bound is
CROWN-IBP's alone, the start of the usual beta ramp), the warm-up regularizers on (progress
0.5), BatchNorm in training mode (batch statistics), IBP initialization, Adam.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verifier.api import BoundedModel  # noqa: E402
from verifier.train.config import TrainConfig  # noqa: E402
from verifier.train.trainer import TrainState, build_model, train_step  # noqa: E402

DATA = Path("/work/shared/datasets/mnist_train10k.npz")


def load(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if DATA.exists():
        d = np.load(DATA)
        x = torch.as_tensor(d["images"][:n]).float()
        if x.max() > 1:
            x = x / 255.0
        return x.reshape(-1, 1, 28, 28), torch.as_tensor(d["labels"][:n]).long()
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def parse_model(spec: str) -> tuple[int, int, int]:
    """``WIDTH:FC`` or ``WIDTH:FC:EXTRA`` -> (width, fc, extra_convs)."""
    try:
        v = [int(t) for t in spec.split(":")]
    except ValueError:
        v = []
    if len(v) not in (2, 3):
        raise SystemExit(f"--models {spec!r}: expected WIDTH:FC or WIDTH:FC:EXTRA")
    return v[0], v[1], v[2] if len(v) == 3 else 0


def make_state(method: str, width: int, fc: int, lr: float = 5e-4,
               extra: int = 0) -> tuple[TrainConfig, TrainState]:
    fused = method == "crown-ibp-lf"        # CROWN-IBP with loss fusion
    cfg = TrainConfig(model="cnn_cert", model_kwargs={"width": width, "fc": fc, "bn": True,
                                                      "extra_convs": extra},
                      method="crown-ibp" if fused else method, loss_fusion=fused, ibp_init=True,
                      batch_size=100, lr=lr, reg_weight=0.5)
    net = build_model(cfg, (1, 28, 28), 10)
    bm = BoundedModel(net, input_shape=(1, 28, 28))
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[])
    return cfg, TrainState(net, bm, opt, sched, 0, [])


def run(args) -> None:
    x, y = load(args.batch * (args.reps + args.warmup) * 3)
    s = {"eps": args.eps, "kappa": 0.5, "beta": args.beta, "progress": 0.5, "warmup": False}
    nb = x.shape[0] // args.batch
    for spec in args.models:
        width, fc, extra = parse_model(spec)
        states = {m: make_state(m, width, fc, extra=extra) for m in ("natural", "ibp", "crown-ibp", "crown-ibp-lf")}
        times = {m: [] for m in states}
        k = 0
        for rep in range(args.warmup + args.reps):
            for m, (cfg, st) in states.items():
                i = k % nb
                k += 1
                xb, yb = x[i * args.batch:(i + 1) * args.batch], y[i * args.batch:(i + 1) * args.batch]
                t0 = time.perf_counter()
                train_step(cfg, st, xb, yb, s, 10, torch.Generator().manual_seed(rep))
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[m].append(dt)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"cnn_cert width {width} fc {fc}" + (f" extra_convs {extra}" if extra else "")
              + f" bn, batch {args.batch}, eps {args.eps}, beta "
              f"{args.beta}, {args.reps} reps, {torch.get_num_threads()} thread(s):")
        for m, v in med.items():
            print(f"  {m:12s} median {1000 * v:8.1f} ms/step  (min {1000 * min(times[m]):.1f}, "
                  f"max {1000 * max(times[m]):.1f})")
        print(f"  ratio crown-ibp / ibp = {med['crown-ibp'] / med['ibp']:.2f}   crown-ibp-lf / ibp "
              f"= {med['crown-ibp-lf'] / med['ibp']:.2f}   "
              f"ibp / natural = {med['ibp'] / med['natural']:.2f}", flush=True)


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile
    x, y = load(args.batch * 8)
    s = {"eps": args.eps, "kappa": 0.5, "beta": args.beta, "progress": 0.5, "warmup": False}
    width, fc, extra = parse_model(args.models[0])
    cfg, st = make_state(args.profile, width, fc, extra=extra)
    for i in range(2):
        train_step(cfg, st, x[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100], s, 10, None)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, 6):
            train_step(cfg, st, x[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100], s, 10, None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["32:256", "16:128"], help="WIDTH:FC[:EXTRA] of cnn_cert (EXTRA: 3x3 convolutions per stage)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", choices=["natural", "ibp", "crown-ibp", "crown-ibp-lf"],
                   help="print a torch.profiler table of 4 steps of this method instead")
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.profile:
        profile(a)
    else:
        run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
