"""Run VNN-COMP benchmarks and score the verdicts against ``ground_truth.csv``.

    python benchmarks/vnncomp.py BENCHMARK_DIR [BENCHMARK_DIR ...] --timeout S [--limit N]
        [--every K] [--only TEXT ...] [--out results.csv]

BENCHMARK_DIR is a folder with ``instances.csv`` (e.g. ../shared/benchmarks/vnncomp/acasxu);
the ground truth is read from ``ground_truth.csv`` in its parent folder. Prints, per benchmark:
instances, solved, correct, WRONG, unknown, timeout, error, total and median time, and the
branch-and-bound domains bounded per second (``dom/s``: the domains of all instances over the
seconds they spent in branch and bound, ``Verdict.details``; ``-`` when none ran it). A wrong
answer is an ``unsat`` where the truth is ``sat`` (or the reverse), or a ``sat`` whose
counterexample failed replay (``verify`` never reports those). One thread, in-process; the
per-instance time includes loading the model and the spec.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def truth_table(bench_dir: Path) -> dict:
    gt = bench_dir.parent / "ground_truth.csv"
    out = {}
    if gt.exists():
        with open(gt, newline="") as f:
            for row in csv.DictReader(f):
                out[(row["benchmark"], row["onnx"], row["vnnlib"])] = row["expected"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--timeout", type=float, default=None, help="per instance (default: the csv's)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N instances")
    ap.add_argument("--every", type=int, default=1, help="only every K-th instance (a sample)")
    ap.add_argument("--out", default=None, help="per-instance results csv")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="only the instances whose 'onnx vnnlib' paths contain one of these "
                         "(e.g. '256x4.onnx vnnlib/prop_6_0.03')")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from verifier.cli.verify import read_instances, run_instance
    from verifier.runtime import tune_allocator
    tune_allocator()  # as the verifier command line does

    rows_out = []
    print(f"{'benchmark':16s} {'n':>4s} {'solved':>6s} {'correct':>7s} {'WRONG':>5s} {'unknown':>7s} "
          f"{'timeout':>7s} {'error':>5s} {'total_s':>8s} {'median_s':>8s} {'dom/s':>8s}",
          flush=True)
    for d in args.dirs:
        name = d.name
        truth = truth_table(d)
        inst = read_instances(str(d / "instances.csv"))
        if args.only:
            inst = [i for i in inst if any(t in f"{os.path.relpath(i[0], d)} {os.path.relpath(i[1], d)}"
                                           for t in args.only)]
        inst = inst[::args.every]
        if args.limit:
            inst = inst[:args.limit]
        c = {k: 0 for k in ("solved", "correct", "wrong", "unknown", "timeout", "error")}
        times = []
        domains, bab_s = 0, 0.0
        cache: dict = {}
        for onnx_path, vnnlib_path, t in inst:
            r = run_instance(onnx_path, vnnlib_path, args.timeout or t, 0, cache)
            rel_o = os.path.relpath(onnx_path, d)
            rel_v = os.path.relpath(vnnlib_path, d)
            exp = truth.get((name, rel_o, rel_v), "unknown")
            s = r["status"]
            times.append(r["time_s"])
            details = r["verdict"].details if r.get("verdict") is not None else {}
            domains += details.get("domains", 0)
            bab_s += details.get("bab_s", 0.0)
            if s in ("sat", "unsat"):
                c["solved"] += 1
                if exp in ("sat", "unsat") and exp != s:
                    c["wrong"] += 1
                    print(f"  WRONG: {rel_o} {rel_v}: ours {s}, expected {exp}", flush=True)
                elif exp == s:
                    c["correct"] += 1
            elif s in c:
                c[s] += 1
            if s == "error":
                print(f"  error: {rel_o} {rel_v}: {r['reason']}", flush=True)
            rows_out.append([name, rel_o, rel_v, s, exp, f"{r['time_s']:.4f}", r["method"]])
        print(f"{name:16s} {len(inst):4d} {c['solved']:6d} {c['correct']:7d} {c['wrong']:5d} "
              f"{c['unknown']:7d} {c['timeout']:7d} {c['error']:5d} {sum(times):8.1f} "
              f"{statistics.median(times):8.3f} "
              f"{(f'{domains / bab_s:8.0f}' if bab_s > 0 else '       -')}", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["benchmark", "onnx", "vnnlib", "status", "expected", "time_s", "method"])
            w.writerows(rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
