"""Bounds benchmark against auto_LiRPA's reference bounds (../shared/benchmarks/classifiers/,
and with ``--suite modern`` ../shared/benchmarks/modern/: GELU, LayerNorm and attention models).

For each reference model prints: graph build time, IBP / CROWN-IBP / CROWN time per sample
(margin spec, one sample per call, one thread, process CPU time like the reference), peak
memory, mean margin lower bound (ours and the reference), the worst agreement figures (IBP:
relative error; CROWN: how much looser than the reference, relative; <= 0 means at least as
tight), and the reference's CPU seconds per sample.

    python benchmarks/bounds.py [--models NAME ...] [--methods ibp crown ...] [--shared PATH] [--repeat K]
        [--default-allocator] [--suite classifiers|modern] [--per-box]

With ``--suite modern`` each row also says whether every lower bound is at most the reference's
empirical minimum of that margin (20,000 samples + PGD: ``sound``), how many margins are proved
(ours / the reference's), and the reference's mean over the samples where its method did not fail.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verifier import BoundedModel, Box, margin_spec  # noqa: E402
from verifier.runtime import tune_allocator  # noqa: E402

METHODS = [("IBP", "ibp"), ("CROWN-IBP", "crown-ibp"), ("CROWN", "crown"), ("alpha-CROWN", "alpha-crown")]


def _reference(args, suite: str):
    """-> (the suite's folder, its reference.json), or (folder, None) with a message."""
    D = Path(args.shared) / "benchmarks" / suite
    if not (D / "reference.json").exists():
        print(f"no reference data at {D}", file=sys.stderr)
        return D, None
    return D, json.loads((D / "reference.json").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared/ folder")
    ap.add_argument("--models", nargs="*", help="model names (default: all in reference.json)")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions per sample (min is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", choices=[m for _, m in METHODS],
                    help="methods to run (default: all)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="keep glibc's default malloc settings (the CLI tunes them: verifier/runtime.py)")
    ap.add_argument("--suite", choices=["classifiers", "modern"], default="classifiers")
    ap.add_argument("--per-box", action="store_true",
                    help="with --suite modern: also a line per box (worst and mean margin lower "
                         "bound, margins proved, CPU seconds)")
    args = ap.parse_args(argv)
    if not args.default_allocator:
        print(f"allocator tuned: {tune_allocator()}")
    torch.set_num_threads(args.threads)
    if args.suite == "modern":
        return modern(args)
    D, ref = _reference(args, "classifiers")
    if ref is None:
        return 1
    names = args.models or list(ref["models"])
    print(f"{'model':24s} {'build_s':>7s} {'method':>11s} {'ms/sample':>9s} {'ref_ms':>8s} "
          f"{'speedup':>7s} {'mean_lb':>11s} {'ref_lb':>11s} {'worst':>9s} {'peak_MB':>8s}")
    for name in names:
        m = ref["models"][name]
        t0 = time.perf_counter()
        bm = BoundedModel.from_onnx(D / "models" / f"{name}.onnx")
        build = time.perf_counter() - t0
        xl = np.load(D / "models" / f"{name}_xl.npy")
        xu = np.load(D / "models" / f"{name}_xu.npy")
        y = np.load(D / "models" / f"{name}_y.npy")
        # warm-up (first calls initialise kernels)
        bm.bounds(Box(torch.tensor(xl[:1]), torch.tensor(xu[:1])), "crown-ibp", spec=margin_spec(y[:1], 10))
        for label, method in METHODS:
            if args.methods and method not in args.methods:
                continue
            runs = [r for r in m["runs"] if r["method"] == label]
            if not runs:
                continue
            times, ours, refs, worst = [], [], [], -np.inf
            for r in runs:
                i = r["idx"]
                box = Box(torch.tensor(xl[i:i + 1]), torch.tensor(xu[i:i + 1]))
                C = margin_spec([int(y[i])], 10)
                best = np.inf
                for _ in range(args.repeat):
                    c0 = time.process_time()
                    res = bm.bounds(box, method, spec=C)
                    best = min(best, time.process_time() - c0)
                times.append(best)
                lo = res.lower[0].double().numpy()
                rl = np.array(r["margin"]["lower"])
                ours.append(lo.mean())
                refs.append(rl.mean())
                scale = np.maximum(1.0, np.abs(rl))
                if method == "ibp":
                    worst = max(worst, float(np.max(np.abs(lo - rl) / scale)))
                else:
                    worst = max(worst, float(np.max((rl - lo) / scale)))
            ref_t = np.mean([r["cpu_margin_s"] for r in runs])
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ms = 1e3 * np.mean(times)
            print(f"{name:24s} {build:7.2f} {label:>11s} {ms:9.2f} {1e3 * ref_t:8.2f} "
                  f"{1e3 * ref_t / ms:6.2f}x {np.mean(ours):11.4f} {np.mean(refs):11.4f} "
                  f"{worst:9.1e} {peak:8.0f}", flush=True)
    print("worst: IBP = max relative error vs reference; the others = max relative amount "
          "looser than the reference (<= 0: at least as tight on every row). peak_MB = process "
          "peak RSS so far.")
    return 0


MODERN = [("IBP", "ibp", "IBP"), ("CROWN", "crown", "CROWN"),
          ("alpha-CROWN", "alpha-crown", "CROWN-Optimized")]


def modern(args) -> int:
    D, ref = _reference(args, "modern")
    if ref is None:
        return 1
    names = args.models or list(ref["models"])
    print(f"{'model':14s} {'build_s':>7s} {'method':>11s} {'s/sample':>8s} {'ref_s':>7s} "
          f"{'mean_lb':>11s} {'ref_lb':>11s} {'proved':>7s} {'ref':>4s} {'sound':>5s} {'peak_MB':>8s}")
    for name in names:
        m = ref["models"][name]
        t0 = time.perf_counter()
        bm = BoundedModel.from_onnx(D / f"{name}.onnx")
        build = time.perf_counter() - t0
        xl, xu = np.load(D / f"{name}_xl.npy"), np.load(D / f"{name}_xu.npy")
        for label, method, key in MODERN:
            if args.methods and method not in args.methods:
                continue
            times, ours, refs, ref_t, proved, ref_proved, sound = [], [], [], [], 0, 0, True
            for s in m["samples"]:
                i, y = s["index"], int(s["y"])
                box = Box(torch.tensor(xl[i:i + 1]), torch.tensor(xu[i:i + 1]))
                C = margin_spec([y], 10)
                best = np.inf
                for _ in range(args.repeat):
                    c0 = time.process_time()
                    res = bm.bounds(box, method, spec=C)
                    best = min(best, time.process_time() - c0)
                times.append(best)
                lo = res.lower[0].double().numpy()
                ours.append(lo.mean())
                proved += int((lo > 0).sum())
                if args.per_box:
                    print(f"  {name} box {i} {label}: worst {lo.min():.4g} mean {lo.mean():.4g} "
                          f"proved {int((lo > 0).sum())}/{lo.size} {best:.1f} s", flush=True)
                sound &= bool(np.all(lo <= np.array(s["empirical"]["min"]) + 1e-5))
                r = s[key]
                if not r["failed"]:
                    refs.append(np.mean(r["lower"]))
                    ref_t.append(r["cpu_s"])
                    ref_proved += int((np.array(r["lower"]) > 0).sum())
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rlb = f"{np.mean(refs):11.4g}" if refs else f"{'failed':>11s}"
            rt = f"{np.mean(ref_t):7.3f}" if ref_t else f"{'-':>7s}"
            print(f"{name:14s} {build:7.2f} {label:>11s} {np.mean(times):8.3f} {rt} "
                  f"{np.mean(ours):11.4g} {rlb} {proved:7d} {ref_proved:4d} {str(sound):>5s} "
                  f"{peak:8.0f}", flush=True)
    print("s/sample: process CPU seconds per box (one call, 9 margins); ref: auto_LiRPA 0.7.1 on "
          "the same boxes (failed: it failed on every box); proved: margins with lower bound > 0 "
          "over the 5 boxes; peak_MB: process peak RSS so far.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
