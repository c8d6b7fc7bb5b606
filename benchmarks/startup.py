"""Start-up benchmark: what a fresh ``verifier`` process costs before and while it works, in the
current environment (the Python running this script, or ``--python``), against a bare
``python -c "import torch"`` in the same environment.

Prints, as the median of ``--runs`` fresh processes (the commands interleaved, so that a change
of machine load hits them alike), wall time and peak RSS (the child's ``ru_maxrss``) of:

* ``import torch``: ``python -c "import torch"``;
* ``bounds``: the README's first command, ``verifier bounds`` on the shipped MNIST example;
* ``verify``: ``verifier verify`` on a shipped VNN-LIB instance (``test_sat``), with its
  ``startup_s`` and ``time_s``;

then ``bounds`` and ``verify`` minus ``import torch`` against the targets (at most 1 s over
``import torch``, under 400 MB peak RSS), and one ``verifier batch`` of ``--batch`` copies of
the same instance: the first row's ``time_s`` against the median of the others (target: at
most 0.5 s more). ``--imports`` adds ``python -X importtime`` of ``bounds``: the cumulative
import time of each top-level package.

    python benchmarks/startup.py [--runs 5] [--batch 4] [--python PYTHON] [--imports] [--json]

The machine's load average is printed with the figures: on a shared machine, compare only
figures taken together.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data"
BENCH = ROOT / "tests" / "data" / "vnncomp_test"
BOUNDS_ARGS = ["bounds", str(EXAMPLE / "lirpa_mnist_fc_3layer.onnx"),
               "--input", str(EXAMPLE / "mnist_sample.npy"), "--eps", "0.03",
               "--label", str(EXAMPLE / "mnist_label.npy"), "--method", "crown"]
INSTANCE = (BENCH / "onnx" / "test_sat.onnx", BENCH / "vnnlib" / "test_prop.vnnlib")
TARGET_OVER_TORCH_S = 1.0
TARGET_RSS_MB = 400.0
TARGET_FIRST_ROW_S = 0.5


def _env() -> dict:
    """The checkout's ``verifier`` first on the path; one torch thread, as the CLI uses."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
            "OMP_NUM_THREADS": "1"}


def measure(cmd: list[str], cwd=None) -> dict:
    """Run ``cmd`` once: -> wall seconds, CPU seconds (user + system), peak RSS in MB (this
    child alone), stdout, stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        r = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
             "rss_mb": usage.ru_maxrss / 1024, "stdout": out.read(),
             "stderr": err.read()}
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{r['stderr'][-2000:]}")
    return r


def run_commands(python: str, runs: int) -> dict:
    cmds = {
        "import torch": [python, "-c", "import torch"],
        "bounds": [python, "-m", "verifier", *BOUNDS_ARGS],
        "verify": [python, "-m", "verifier", "verify", str(INSTANCE[0]), str(INSTANCE[1]),
                   "--json"],
    }
    samples: dict = {k: [] for k in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            r = measure(cmd)
            if name == "verify":
                v = json.loads(r["stdout"])
                r["time_s"], r["startup_s"] = v["time_s"], v.get("startup_s")
            samples[name].append(r)
    out = {}
    for name, rs in samples.items():
        out[name] = {"wall_s": statistics.median(r["wall_s"] for r in rs),
                     "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                     "rss_mb": statistics.median(r["rss_mb"] for r in rs),
                     "walls_s": [round(r["wall_s"], 3) for r in rs]}
        if name == "verify":
            out[name]["time_s"] = statistics.median(r["time_s"] for r in rs)
            if all(r["startup_s"] is not None for r in rs):
                out[name]["startup_s"] = statistics.median(r["startup_s"] for r in rs)
    return out


def run_batch(python: str, copies: int) -> dict:
    """One ``verifier batch`` over ``copies`` copies of the instance (copied files: a batch
    runs a repeated row once) -> the rows' time_s in csv order (the order they ran)."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        shutil.copy(INSTANCE[1], d / "prop.vnnlib")
        lines = []
        for i in range(copies):
            shutil.copy(INSTANCE[0], d / f"net{i}.onnx")
            lines.append(f"net{i}.onnx,prop.vnnlib,60\n")
        (d / "instances.csv").write_text("".join(lines))
        r = measure([python, "-m", "verifier", "batch", "instances.csv", "--out", "r.csv"],
                    cwd=d)
        with open(d / "r.csv", newline="") as f:
            times = [float(row["time_s"]) for row in csv.DictReader(f)]
    startup = [ln for ln in r["stderr"].splitlines() if ln.startswith("start-up:")]
    return {"time_s": times, "wall_s": r["wall_s"], "rss_mb": r["rss_mb"],
            "startup": startup[0] if startup else None}


def import_times(python: str) -> list[tuple[str, float]]:
    """``-X importtime`` of the bounds command: (top-level package, cumulative s), largest first."""
    r = measure([python, "-X", "importtime", "-m", "verifier", *BOUNDS_ARGS])
    tops: dict = {}
    for line in r["stderr"].splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("  "):  # imported at top level
            top = name.strip().split(".")[0]
            tops[top] = tops.get(top, 0.0) + int(cumulative) / 1e6
    return sorted(tops.items(), key=lambda kv: -kv[1])


def _mark(ok: bool) -> str:
    return "ok" if ok else "OVER"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command (median)")
    ap.add_argument("--batch", type=int, default=4, help="instances in the batch run (>= 2)")
    ap.add_argument("--python", default=sys.executable, help="the environment to measure")
    ap.add_argument("--imports", action="store_true", help="also -X importtime of bounds")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.batch < 2:
        ap.error("--runs must be >= 1 and --batch >= 2")
    load_before = os.getloadavg()
    res = run_commands(a.python, a.runs)
    batch = run_batch(a.python, a.batch)
    torch_s, torch_mb = res["import torch"]["wall_s"], res["import torch"]["rss_mb"]
    first, rest = batch["time_s"][0], statistics.median(batch["time_s"][1:])
    summary = {
        "python": a.python, "runs": a.runs, "load_avg_1min": [load_before[0], os.getloadavg()[0]],
        "commands": res, "batch": batch,
        "bounds_over_torch_s": res["bounds"]["wall_s"] - torch_s,
        "verify_over_torch_s": res["verify"]["wall_s"] - torch_s,
        "first_row_over_rest_s": first - rest,
        "targets": {"over_torch_s": TARGET_OVER_TORCH_S, "rss_mb": TARGET_RSS_MB,
                    "first_row_s": TARGET_FIRST_ROW_S},
    }
    if a.imports:
        summary["imports_s"] = import_times(a.python)
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"environment: {a.python}; load average (1 min) {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; median of {a.runs} fresh processes")
    print(f"{'command':14s} {'wall_s':>7s} {'over torch':>10s} {'cpu_s':>6s} {'over torch':>10s} "
          f"{'peak_MB':>8s}  notes")
    torch_cpu = res["import torch"]["cpu_s"]
    for name, r in res.items():
        over = "" if name == "import torch" else f"{r['wall_s'] - torch_s:+10.2f}"
        over_cpu = "" if name == "import torch" else f"{r['cpu_s'] - torch_cpu:+10.2f}"
        notes = ""
        if name != "import torch":
            notes = (f"target <= +{TARGET_OVER_TORCH_S:g} s: "
                     f"{_mark(r['wall_s'] - torch_s <= TARGET_OVER_TORCH_S)}; "
                     f"< {TARGET_RSS_MB:g} MB: {_mark(r['rss_mb'] < TARGET_RSS_MB)}")
        if name == "verify":
            notes += f"; time_s {r['time_s']:.3f}"
            if "startup_s" in r:
                notes += f", startup_s {r['startup_s']:.2f}"
        print(f"{name:14s} {r['wall_s']:7.2f} {over:>10s} {r['cpu_s']:6.2f} {over_cpu:>10s} "
              f"{r['rss_mb']:8.0f}  {notes}")
    print(f"(import torch itself: {torch_mb:.0f} MB; the targets are on wall time, which a "
          "loaded machine inflates: CPU time is the steadier figure there)")
    print(f"batch of {a.batch} copies of {INSTANCE[0].name}: time_s per row "
          + ", ".join(f"{t:.3f}" for t in batch["time_s"])
          + f"; first - median of the rest = {first - rest:+.3f} s (target <= "
          f"+{TARGET_FIRST_ROW_S:g} s: {_mark(first - rest <= TARGET_FIRST_ROW_S)})"
          + (f"; {batch['startup']}" if batch["startup"] else ""))
    if a.imports:
        print("imports of bounds (cumulative s, top-level packages over 0.01 s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary["imports_s"] if v >= 0.01))
    return 0


if __name__ == "__main__":
    sys.exit(main())
