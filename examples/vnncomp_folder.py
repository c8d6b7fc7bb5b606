"""Run a VNN-COMP benchmark folder: every instance of ``instances.csv`` (here the competition's
small `test` benchmark in tests/data/vnncomp_test), a results CSV in the format of
``verifier batch --out``, the verdict counts, and the check against the expected answers.

    python examples/vnncomp_folder.py [FOLDER] [--out results.csv]

Each row of instances.csv is ``onnx,vnnlib,timeout`` with paths relative to the folder. The
same run on the command line: ``verifier batch FOLDER/instances.csv --out results.csv``, then
``verifier report results.csv --html report.html`` for the table and the cactus plot.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch

from verifier.complete import verify

torch.set_num_threads(1)
DEFAULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "vnncomp_test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--out", default=str(Path(tempfile.mkdtemp()) / "results.csv"))
    a = ap.parse_args()
    folder = Path(a.folder)
    with open(folder / "instances.csv", newline="") as f:
        instances = [r for r in csv.reader(f) if r]
    expected = {}
    if (folder / "expected.csv").exists():          # this copy ships the right answers
        with open(folder / "expected.csv", newline="") as f:
            expected = {(r[0], r[1]): r[2] for r in csv.reader(f) if r}

    counts: dict[str, int] = {}
    wrong = 0
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["onnx", "vnnlib", "status", "time_s", "method", "reason"])
        for onnx, vnnlib, timeout in instances:
            v = verify(str(folder / onnx), str(folder / vnnlib), timeout=float(timeout))
            counts[v.status] = counts.get(v.status, 0) + 1
            exp = expected.get((onnx, vnnlib), "")
            wrong += exp in ("sat", "unsat") and v.status in ("sat", "unsat") and exp != v.status
            w.writerow([onnx, vnnlib, v.status, f"{v.time_s:.4f}", v.method or "", v.reason])
            print(f"{onnx:22s} {vnnlib:24s} {v.status:7s} (expected {exp or '?':5s}) "
                  f"{v.time_s:6.3f} s  {v.method or ''}")
    print(f"\n{len(instances)} instances: {counts}; wrong verdicts: {wrong}")
    print(f"results: {a.out}")
    if wrong:
        raise SystemExit("a verdict contradicts expected.csv")


if __name__ == "__main__":
    main()
