"""Throughput of ``verifier batch`` with 1 and more workers, and of branch and bound on Ray.

    python benchmarks/scale.py [BENCHMARK_DIR] [--workers 1 2] [--every K] [--timeout S]
        [--bab ONNX VNNLIB] [--relu-bab ONNX VNNLIB] [--bab-timeout S] [--no-batch]

BENCHMARK_DIR (default ../shared/benchmarks/vnncomp/acasxu) holds ``instances.csv``. For each
worker count it runs every K-th instance through the batch scheduler (1: in this process; N > 1:
a fresh local Ray of N CPUs; ``ray-1`` is printed for Ray with one worker, to show Ray's own
cost) and prints instances per second over the whole run (wall clock, scheduler start and stop
included) and over the instances only (first submission to last result), the verdict counts,
and whether the verdicts agree across worker counts (``--no-batch`` skips this part). With
``--bab``: input-split branch and bound on one instance in this process and with a
RayDomainPool of each worker count > 1, printing domains bounded per second until the verdict
or ``--bab-timeout``; ``--relu-bab`` does the same for ReLU-split branch and bound (e.g. on an
mnist_fc instance; from CROWN's intermediate bounds of the box, conjunctions that CROWN already
refutes left out).

Every worker uses one torch thread. Ray and its workers are started by this script and shut
down after each configuration.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
DEFAULT = ROOT.parent / "shared" / "benchmarks" / "vnncomp" / "acasxu"


def run_config(label, workers, ray_one, tasks):
    from verifier.cli.verify import instance_result
    from verifier.schedule import make_scheduler
    from verifier.schedule.ray_batch import RayScheduler
    t0 = time.perf_counter()
    sched = RayScheduler(1) if ray_one else make_scheduler(workers)
    t_ready = time.perf_counter()
    verdicts, t_last = {}, t_ready
    with sched:
        for i, o in sched.run(instance_result, tasks):
            verdicts[i] = o.value["status"] if o.error is None else "error"
            t_last = time.perf_counter()
    t_end = time.perf_counter()
    n = len(tasks)
    counts = {k: sum(v == k for v in verdicts.values())
              for k in ("sat", "unsat", "unknown", "timeout", "error")}
    print(f"{label:>8s} {n:5d} {t_end - t0:8.1f} {t_ready - t0:7.1f} {n / (t_end - t0):9.3f} "
          f"{n / (t_last - t_ready):9.3f}   " + " ".join(f"{k}={v}" for k, v in counts.items()),
          flush=True)
    return verdicts


def _region(onnx, vnnlib):
    import torch

    from verifier.api import BoundedModel
    from verifier.spec.vnnlib import read_vnnlib
    m = BoundedModel.from_onnx(onnx)
    r = read_vnnlib(vnnlib).regions[0]
    lo = torch.as_tensor(r.lower, dtype=m.dtype).reshape(m.input_shape)
    hi = torch.as_tensor(r.upper, dtype=m.dtype).reshape(m.input_shape)
    Cs = [torch.as_tensor(c.C, dtype=m.dtype) for c in r.disjuncts]
    ds = [torch.as_tensor(c.d, dtype=m.dtype) for c in r.disjuncts]
    return m, lo, hi, Cs, ds


def _open_conjunctions(m, lo, hi, Cs, ds):
    """The conjunctions that CROWN does not refute over the whole box."""
    import torch

    from verifier.perturbation import Box
    keep = []
    for C, d in zip(Cs, ds):
        spec = C.reshape(1, C.shape[0], *m.output_shape)
        low = m.bounds(Box(lo.unsqueeze(0), hi.unsqueeze(0)), "crown", spec=spec).lower[0]
        if not bool((low > d).any()):
            keep.append((C, d))
    return [c for c, _ in keep], [d for _, d in keep]


def run_bab(onnx, vnnlib, timeout, workers, relu=False):
    from verifier.complete.input_bab import input_split_bab
    from verifier.complete.relu_bab import relu_split_bab
    from verifier.schedule.ray_bab import RayDomainPool
    m, lo, hi, Cs, ds = _region(onnx, vnnlib)
    kind = "ReLU-split" if relu else "input-split"
    if relu:
        Cs, ds = _open_conjunctions(m, lo, hi, Cs, ds)
        if not Cs:
            print(f"\n{Path(vnnlib).name}: CROWN refutes every conjunction; nothing to branch")
            return
    print(f"\n{kind} branch and bound on {Path(onnx).name} {Path(vnnlib).name}, region 0, "
          f"budget {timeout:g} s")
    print(f"{'where':>12s} {'status':>9s} {'domains':>9s} {'time_s':>7s} {'domains/s':>10s}")
    for w in [1] + [w for w in workers if w > 1]:
        pool = RayDomainPool(onnx, w) if w > 1 else None
        t0 = time.perf_counter()
        if relu:
            res = relu_split_bab(m, lo, hi, Cs, ds, t0 + timeout, expander=pool)
        else:
            res = input_split_bab(m, lo, hi, Cs, ds, t0 + timeout, expander=pool)
        el = time.perf_counter() - t0
        if pool is not None:
            pool.close()
        where = "in-process" if w == 1 else f"{w} actors"
        print(f"{where:>12s} {res.status:>9s} {res.domains:9d} {el:7.2f} {res.domains / el:10.0f}",
              flush=True)


def run_batch(args):
    from verifier.cli.verify import read_instances
    rows = read_instances(str(args.bench / "instances.csv"))[::args.every]
    tasks = [(o, v, args.timeout, 0) for o, v, _ in rows]
    print(f"{args.bench.name}: {len(tasks)} instances (every {args.every}th), timeout "
          f"{args.timeout:g} s, {os.cpu_count()} CPUs")
    print(f"{'workers':>8s} {'n':>5s} {'wall_s':>8s} {'start_s':>7s} {'inst/s':>9s} "
          f"{'inst/s*':>9s}   verdicts      (* first submission to last result)")
    runs = {}
    configs = [(str(w), w, False) for w in args.workers]
    if args.ray_one:
        configs.insert(1, ("ray-1", 1, True))
    for label, w, ray_one in configs:
        runs[label] = run_config(label, w, ray_one, tasks)
    first = next(iter(runs.values()))
    for label, v in runs.items():
        diff = [i for i in first if v[i] != first[i]]
        if diff:
            print(f"verdicts of {label} differ on {len(diff)} instance(s): " + ", ".join(
                f"{Path(tasks[i][0]).name} {Path(tasks[i][1]).name} ({first[i]} / {v[i]})"
                for i in diff[:5]))
    if len(runs) > 1 and all(v == first for v in runs.values()):
        print("verdicts agree across worker counts")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ray-one", action="store_true", help="also Ray with one worker")
    ap.add_argument("--every", type=int, default=6, help="every K-th instance (default 6)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per instance (default 10 s)")
    ap.add_argument("--bab", nargs=2, metavar=("ONNX", "VNNLIB"),
                    help="input-split branch and bound on this instance")
    ap.add_argument("--relu-bab", nargs=2, metavar=("ONNX", "VNNLIB"),
                    help="ReLU-split branch and bound on this instance")
    ap.add_argument("--bab-timeout", type=float, default=20.0)
    ap.add_argument("--no-batch", action="store_true", help="only the branch and bound runs")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from verifier.runtime import tune_allocator
    tune_allocator()
    if not args.no_batch:
        if not (args.bench / "instances.csv").exists():
            print(f"{args.bench}/instances.csv not found", file=sys.stderr)
            return 2
        run_batch(args)
    if args.bab:
        run_bab(*args.bab, args.bab_timeout, args.workers)
    if args.relu_bab:
        run_bab(*args.relu_bab, args.bab_timeout, args.workers, relu=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
