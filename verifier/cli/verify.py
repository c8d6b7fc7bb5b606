"""``verifier verify``, ``verifier batch`` and ``verifier vnncomp-run``: verdicts for VNN-LIB
properties on ONNX models, one at a time, over a VNN-COMP ``instances.csv``, or in the
VNN-COMP results-file format.

The modules that import torch are imported inside the commands, so that ``verifier --help``
and argument errors answer without torch (tests/cli/test_cli_main.py).

Start-up (importing torch, the ONNX reader, onnxruntime, and what torch sets up on first use)
is paid before any instance's clock starts (``complete.warmup.warm_up``) and reported on its
own as ``startup_s``: an instance's ``time_s`` is the same whether it runs first or tenth.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from ..files import write_atomically
from ..runtime import since_start
from ..schedule import ResultsFile, make_scheduler
from ..schedule.ray_batch import check_gpu_share
from ..schedule.results import key
from .util import (EXIT_OK, CliError, device_arguments, load_cli_model, model_arguments,
                   nonneg_int, output_file, positive_int, save_output)

VERIFY_DESCRIPTION = """\
Decide a VNN-LIB property on a model (an ONNX file, or a PyTorch state dict with --arch). The
VNN-LIB file describes the counterexamples: "sat" means one exists (a counterexample is printed,
replayed on the model with onnxruntime, or with torch for a state dict),
"unsat" means none exists (proved by bound propagation), "unknown" that neither was shown,
"timeout" that the budget ran out. Exit status 0 for every verdict."""

VERIFY_EPILOG = """\
examples:
  verifier verify net.onnx prop.vnnlib --timeout 60 --json --cex-file cex.txt
  verifier verify acas.onnx prop_2.vnnlib --workers 2   # branch and bound on 2 Ray actors"""

BATCH_DESCRIPTION = """\
Run every instance of a VNN-COMP instances.csv (rows: onnx path, vnnlib path, timeout; paths
relative to the csv's folder) and append one result row per instance to --out as soon as it
finishes (flushed to disk). A failing instance is reported as "error" with its reason, and the
run goes on. Rerunning the same command resumes: instances that already have a row in --out are
not run again (--retry-errors reruns those whose row says "error"). With --workers N > 1 or
--ray-address the instances run as Ray tasks (pip install '.[ray]'): on a local Ray of N CPUs,
or on the cluster at ADDR with at most N in flight; an instance whose worker dies is run again
up to --max-retries times, then reported as "error". A summary table (verdict counts, total and
median time, over every row of --out) ends the run."""

BATCH_EPILOG = """\
examples:
  verifier batch tests/data/acasxu_sample/instances.csv --timeout 60 --out results.csv
  verifier batch tests/data/acasxu_sample/instances.csv --out results.csv --workers 2
  verifier batch instances.csv --out results.csv --workers 64 --ray-address HEAD_IP:6379"""


def _common(p):
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: small kernels run faster single-threaded "
                        "on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (default 0)")


def verify_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("spec", metavar="SPEC.vnnlib", help="the property (.vnnlib or .vnnlib.gz)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="wall-clock budget in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--progress", action="store_true",
                   help="show a live branch-and-bound line on stderr (default: when stderr is a "
                        "terminal)")
    p.add_argument("--cex-file", metavar="F", type=output_file,
                   help="on sat, write the counterexample there in the VNN-COMP format "
                        "((X_0 v) ... (Y_0 v) ...)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="branch and bound (input- or ReLU-split) bounds its batches of "
                        "domains on N Ray actors (default 1: in this process; pip install "
                        "'.[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --workers: the actors run on this Ray cluster (HOST:PORT or auto) "
                        "instead of a local Ray")
    _common(p)
    device_arguments(p, ray=True)


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

    from ..complete import verify
    from ..schedule.ray_bab import RayDomainPool
    torch.set_num_threads(a.threads)
    # no warm-up for one instance: with the ONNX reader what an instance sets up on first use
    # costs ~0.05 s, while deciding the two warm-up instances costs ~1.4 s of wall time
    startup_s = since_start()
    model = load_cli_model(a)
    progress = _progress_line if (a.progress or sys.stderr.isatty()) else None
    if a.workers > 1 or a.ray_address:
        if a.arch is not None:
            raise CliError("--workers and --ray-address need an ONNX model (each Ray actor "
                           "reads the file); export the PyTorch model to ONNX first")
        with RayDomainPool(a.model, a.workers, a.ray_address, device=a.device,
                           gpus_per_worker=a.gpus_per_worker) as pool:
            v = verify(model, a.spec, timeout=a.timeout, seed=a.seed, progress=progress,
                       expander=pool)
    else:
        v = verify(model, a.spec, timeout=a.timeout, seed=a.seed, progress=progress)
    if progress is not None and _progress_line.shown:
        print(file=sys.stderr)
    problem = None
    if a.cex_file and v.counterexample is not None:
        text = v.counterexample.vnncomp_text() + "\n"
        _, problem = save_output(a.cex_file, lambda tmp: _write_text(tmp, text),
                                 "the counterexample")
    if a.json:
        print(json.dumps({**v.to_json(), "startup_s": round(startup_s, 4)}))
    else:
        print(f"{v.status}  ({v.reason}; {v.time_s:.3f} s, start-up {startup_s:.2f} s)")
        if v.counterexample is not None and (not a.cex_file or problem is not None):
            print(v.counterexample.vnncomp_text())
    if problem is not None:
        raise CliError(problem)
    return EXIT_OK


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("instances", metavar="INSTANCES.csv", help="VNN-COMP instances file")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="per-instance budget in seconds (default: the csv's third column)")
    p.add_argument("--out", required=True, metavar="RESULTS.csv", type=output_file,
                   help="the results file: created, or resumed when it exists")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="instances run at once (default 1: in this process; N > 1: Ray tasks, "
                        "one CPU and one torch thread each)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run on this Ray cluster (HOST:PORT of its head, or auto) instead of "
                        "a local Ray; needs the verifier installed on every node")
    p.add_argument("--max-retries", type=nonneg_int, default=2, metavar="K",
                   help="runs again an instance whose worker died, up to K times, before "
                        "reporting it as error (default 2; Ray only)")
    p.add_argument("--retry-errors", action="store_true",
                   help="when resuming, run again the instances whose row in --out is error")
    _common(p)
    device_arguments(p, ray=True)


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


def run_instance(onnx_path, vnnlib_path, timeout, seed=0, cache=None, warm=True, device="cpu"):
    """-> Verdict-like dict; an exception becomes status "error" with its reason. ``time_s``
    starts after this process's start-up (with ``warm``, ``warm_up``, once per process: in a
    Ray worker, at its first instance), which is not counted. ``device``: where the model is
    loaded and bounded (in a Ray worker, "cuda" is the GPU share Ray gave it)."""
    from ..api import BoundedModel
    from ..complete import verify
    from ..complete.warmup import warm_up
    try:
        if warm:
            warm_up()
    except Exception as e:
        return {"status": "error", "reason": f"start-up failed: {type(e).__name__}: {e}".replace(
            "\n", " "), "method": "", "time_s": 0.0, "verdict": None}
    t0 = time.perf_counter()
    try:
        if cache is not None:
            if onnx_path not in cache:
                cache.clear()
                cache[onnx_path] = BoundedModel.from_onnx(onnx_path, device=device)
            model = cache[onnx_path]
        else:
            model = onnx_path
        v = verify(model, vnnlib_path, timeout=max(0.0, timeout - (time.perf_counter() - t0)),
                   seed=seed, device=device)
        return {"status": v.status, "reason": v.reason, "method": v.method or "",
                "time_s": time.perf_counter() - t0, "verdict": v}
    except Exception as e:  # an instance's failure is its result, not the batch's
        return {"status": "error", "reason": f"{type(e).__name__}: {e}".replace("\n", " "),
                "method": "", "time_s": time.perf_counter() - t0, "verdict": None}


def instance_result(onnx_path, vnnlib_path, timeout, seed=0, device="cpu", cache=None) -> dict:
    """One batch task: ``run_instance`` without the Verdict object (what the results file
    needs, cheap to send back from a worker)."""
    r = run_instance(onnx_path, vnnlib_path, timeout, seed, cache, device=device)
    r.pop("verdict")
    return r


def cmd_batch(a: argparse.Namespace) -> int:
    rows = read_instances(a.instances)
    import functools
    import statistics

    import torch
    from tqdm import tqdm

    from ..complete.warmup import warm_up

    torch.set_num_threads(a.threads)
    seen, unique = set(), []
    for r in rows:
        if key(r[0], r[1]) not in seen:
            seen.add(key(r[0], r[1]))
            unique.append(r)
    if len(unique) < len(rows):
        print(f"note: {len(rows) - len(unique)} repeated instance(s) in {a.instances} run once",
              file=sys.stderr)
    with ResultsFile(a.out, retry_errors=a.retry_errors) as out:
        done = out.done()
        todo = [(o, v, a.timeout or t, a.seed, a.device) for o, v, t in unique
                if key(o, v) not in done]
        if out.rows:
            print(f"resuming {a.out}: {len(unique) - len(todo)} of {len(unique)} instances "
                  f"already there, {len(todo)} to run"
                  + (f" ({out.dropped_errors} error rows to rerun)" if out.dropped_errors else ""),
                  file=sys.stderr)
        if todo:
            if a.workers == 1 and not a.ray_address:
                warm_up()          # here, so that a missing package is one error, not N rows
                print(f"start-up: {since_start():.2f} s (imports and warm-up, counted in no "
                      "instance's time_s)", file=sys.stderr)
            if a.workers > 1 or a.ray_address:
                check_gpu_share(a.device, a.gpus_per_worker)
            with make_scheduler(a.workers, a.ray_address, a.max_retries,
                                hard_limit=lambda t: 2 * t[2] + 60,
                                gpus_per_worker=a.gpus_per_worker) as sched:
                fn = instance_result if sched.workers > 1 or a.ray_address else \
                    functools.partial(instance_result, cache={})
                counts: dict = {}
                bar = tqdm(total=len(todo), unit="inst", file=sys.stderr, dynamic_ncols=True,
                           disable=not sys.stderr.isatty())  # no bars in a log file
                for i, o in sched.run(fn, todo):
                    onnx_path, vnnlib_path = todo[i][:2]
                    r = o.value if o.error is None else {
                        "status": "error", "reason": o.error, "method": "", "time_s": 0.0}
                    out.append(onnx_path, vnnlib_path, r["status"], r["time_s"], r["method"],
                               r["reason"])
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
                    bar.update(1)
                    bar.set_postfix(counts)
                bar.close()
        all_rows = out.rows
    counts = {k: sum(r["status"] == k for r in all_rows)
              for k in ("sat", "unsat", "unknown", "timeout", "error")}
    times = [float(r["time_s"]) for r in all_rows]
    print(f"{'instances':>10s} {'sat':>5s} {'unsat':>6s} {'unknown':>8s} {'timeout':>8s} "
          f"{'error':>6s} {'total_s':>9s} {'median_s':>9s}")
    print(f"{len(all_rows):10d} {counts['sat']:5d} {counts['unsat']:6d} {counts['unknown']:8d} "
          f"{counts['timeout']:8d} {counts['error']:6d} {sum(times):9.2f} "
          f"{statistics.median(times) if times else 0.0:9.3f}")
    print(f"results: {a.out}")
    return EXIT_OK


def vnncomp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("category")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("spec", metavar="SPEC.vnnlib")
    p.add_argument("results", metavar="RESULTS_FILE", type=output_file,
                   help="the results file to write (the verdict word, then the counterexample)")
    p.add_argument("timeout", type=float)
    _common(p)
    device_arguments(p)


def cmd_vnncomp_run(a: argparse.Namespace) -> int:
    """Write the VNN-COMP results file: the verdict word, then the counterexample on sat.
    Any failure is written as ``error`` (never a wrong verdict)."""
    import torch
    torch.set_num_threads(a.threads)
    # the harness times the whole process: the start-up (imports) comes out of the instance's
    # budget, so a cold process does not overrun the harness's timeout; no warm-up (one
    # instance: it would cost more than the first-use set-up it saves)
    r = run_instance(a.model, a.spec, max(0.0, a.timeout - since_start()), a.seed, warm=False,
                     device=a.device)
    text = r["status"] + "\n"
    v = r["verdict"]
    if v is not None and v.status == "sat":
        text += v.counterexample.vnncomp_text() + "\n"
    write_atomically(a.results, lambda tmp: _write_text(tmp, text))
    print(f"{r['status']}  ({r['reason']}; {r['time_s']:.3f} s)", file=sys.stderr)
    return EXIT_OK
