"""``verifier verify``, ``verifier batch`` and ``verifier vnncomp-run``: verdicts for VNN-LIB
properties on ONNX models, one at a time, over a VNN-COMP ``instances.csv``, or in the
VNN-COMP results-file format."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from .cli_util import EXIT_OK, CliError, positive_int

VERIFY_DESCRIPTION = """\
Decide a VNN-LIB property on an ONNX model. The VNN-LIB file describes the counterexamples:
"sat" means one exists (a counterexample is printed, replayed on the model with onnxruntime),
"unsat" means none exists (proved by bound propagation), "unknown" that neither was shown,
"timeout" that the budget ran out. Exit status 0 for every verdict."""

VERIFY_EPILOG = """\
example:
  verifier verify net.onnx prop.vnnlib --timeout 60 --json --cex-file cex.txt"""

BATCH_DESCRIPTION = """\
Run every instance of a VNN-COMP instances.csv (rows: onnx path, vnnlib path, timeout; paths
relative to the csv's folder) and write one result row per instance to --out as it finishes.
A failing instance is reported as "error" with its reason, and the run goes on. A summary
table (verdict counts, total and median time) ends the run."""

BATCH_EPILOG = """\
example:
  verifier batch benchmarks/acasxu/instances.csv --timeout 60 --out results.csv"""


def _common(p):
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: small kernels run faster single-threaded "
                        "on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (default 0)")


def verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx", help="the network (.onnx or .onnx.gz)")
    p.add_argument("spec", metavar="SPEC.vnnlib", help="the property (.vnnlib or .vnnlib.gz)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="wall-clock budget in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--progress", action="store_true",
                   help="show a live branch-and-bound line on stderr (default: when stderr is a "
                        "terminal)")
    p.add_argument("--cex-file", metavar="F",
                   help="on sat, write the counterexample there in the VNN-COMP format "
                        "((X_0 v) ... (Y_0 v) ...)")
    _common(p)


def _check_files(*paths):
    for path in paths:
        if not os.path.exists(path):
            raise CliError(f"{path}: no such file")


def _progress_line(domains_left: int, worst: float, elapsed: float) -> None:
    """One live line on stderr while branch and bound runs."""
    _progress_line.shown = True
    print(f"\rbranch and bound: {domains_left} domains left, worst margin {worst:.4g}, "
          f"{elapsed:.1f} s   ", end="", file=sys.stderr, flush=True)


_progress_line.shown = False


def cmd_verify(a: argparse.Namespace) -> int:
    if a.timeout <= 0:
        raise CliError(f"--timeout must be > 0, got {a.timeout}")
    _check_files(a.model, a.spec)
    import torch

    from .complete import verify
    torch.set_num_threads(a.threads)
    progress = _progress_line if (a.progress or sys.stderr.isatty()) else None
    v = verify(a.model, a.spec, timeout=a.timeout, seed=a.seed, progress=progress)
    if progress is not None and _progress_line.shown:
        print(file=sys.stderr)
    if a.cex_file and v.counterexample is not None:
        with open(a.cex_file, "w") as f:
            f.write(v.counterexample.vnncomp_text() + "\n")
    if a.json:
        print(json.dumps(v.to_json()))
    else:
        print(f"{v.status}  ({v.reason}; {v.time_s:.3f} s)")
        if v.counterexample is not None and not a.cex_file:
            print(v.counterexample.vnncomp_text())
    return EXIT_OK


def batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("instances", metavar="INSTANCES.csv", help="VNN-COMP instances file")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="per-instance budget in seconds (default: the csv's third column)")
    p.add_argument("--out", required=True, metavar="RESULTS.csv", help="where to write results")
    _common(p)


def read_instances(path: str) -> list[tuple[str, str, float]]:
    """Rows (onnx, vnnlib, timeout) with paths made relative to the csv's folder."""
    _check_files(path)
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise CliError(f"{path}:{i}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
            try:
                t = float(row[2])
            except ValueError:
                raise CliError(f"{path}:{i}: bad timeout {row[2]!r}") from None
            rows.append((os.path.join(base, row[0].strip()), os.path.join(base, row[1].strip()), t))
    if not rows:
        raise CliError(f"{path}: no instances")
    return rows


def run_instance(onnx_path, vnnlib_path, timeout, seed=0, cache=None):
    """-> Verdict-like dict; an exception becomes status "error" with its reason."""
    from .api import BoundedModel
    from .complete import verify
    t0 = time.perf_counter()
    try:
        if cache is not None:
            if onnx_path not in cache:
                cache.clear()
                cache[onnx_path] = BoundedModel.from_onnx(onnx_path)
            model = cache[onnx_path]
        else:
            model = onnx_path
        v = verify(model, vnnlib_path, timeout=max(0.0, timeout - (time.perf_counter() - t0)),
                   seed=seed)
        return {"status": v.status, "reason": v.reason, "method": v.method or "",
                "time_s": time.perf_counter() - t0, "verdict": v}
    except Exception as e:  # an instance's failure is its result, not the batch's
        return {"status": "error", "reason": f"{type(e).__name__}: {e}".replace("\n", " "),
                "method": "", "time_s": time.perf_counter() - t0, "verdict": None}


def cmd_batch(a: argparse.Namespace) -> int:
    rows = read_instances(a.instances)
    import statistics

    import torch
    from tqdm import tqdm
    torch.set_num_threads(a.threads)
    counts = {k: 0 for k in ("sat", "unsat", "unknown", "timeout", "error")}
    times = []
    cache: dict = {}
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["onnx", "vnnlib", "status", "time_s", "method", "reason"])
        bar = tqdm(rows, unit="inst", file=sys.stderr, dynamic_ncols=True)
        for onnx_path, vnnlib_path, t in bar:
            r = run_instance(onnx_path, vnnlib_path, a.timeout or t, a.seed, cache)
            counts[r["status"]] += 1
            times.append(r["time_s"])
            w.writerow([os.path.relpath(onnx_path), os.path.relpath(vnnlib_path), r["status"],
                        f"{r['time_s']:.4f}", r["method"], r["reason"]])
            f.flush()
            bar.set_postfix({k: v for k, v in counts.items() if v})
    print(f"{'instances':>10s} {'sat':>5s} {'unsat':>6s} {'unknown':>8s} {'timeout':>8s} "
          f"{'error':>6s} {'total_s':>9s} {'median_s':>9s}")
    print(f"{len(rows):10d} {counts['sat']:5d} {counts['unsat']:6d} {counts['unknown']:8d} "
          f"{counts['timeout']:8d} {counts['error']:6d} {sum(times):9.2f} "
          f"{statistics.median(times):9.3f}")
    print(f"results: {a.out}")
    return EXIT_OK


def vnncomp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("category")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("spec", metavar="SPEC.vnnlib")
    p.add_argument("results", metavar="RESULTS_FILE")
    p.add_argument("timeout", type=float)
    _common(p)


def cmd_vnncomp_run(a: argparse.Namespace) -> int:
    """Write the VNN-COMP results file: the verdict word, then the counterexample on sat.
    Any failure is written as ``error`` (never a wrong verdict)."""
    import torch
    torch.set_num_threads(a.threads)
    r = run_instance(a.model, a.spec, a.timeout, a.seed)
    text = r["status"] + "\n"
    v = r["verdict"]
    if v is not None and v.status == "sat":
        text += v.counterexample.vnncomp_text() + "\n"
    with open(a.results, "w") as f:
        f.write(text)
    print(f"{r['status']}  ({r['reason']}; {r['time_s']:.3f} s)", file=sys.stderr)
    return EXIT_OK
