"""Scale out ``verifier batch``: a resumable run, and the same run on Ray workers.

    python examples/scale_out.py [--workers N]

1. Runs the VNN-COMP `test` benchmark (tests/data/vnncomp_test: 5 instances) with the
   in-process scheduler, keeps only its first 2 result rows (as if the run had been killed
   there), and reruns the same command: only the 3 missing instances run again.
2. With ``--workers N`` (N > 1, needs ``pip install '.[ray]'``): the same instances as Ray
   tasks on a local Ray of N CPUs, and a check that the verdicts are the in-process ones.

The command line equivalent: ``verifier batch INSTANCES.csv --out results.csv [--workers N]``.
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

from verifier.cli import main as verifier

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "vnncomp_test"


def verdicts(path: str) -> dict:
    with open(path, newline="") as f:
        return {(os.path.basename(r["onnx"]), os.path.basename(r["vnnlib"])): r["status"]
                for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    os.chdir(tempfile.mkdtemp())
    inst = str(SAMPLE / "instances.csv")

    t0 = time.perf_counter()
    assert verifier(["batch", inst, "--out", "local.csv"]) == 0
    print(f"in-process: {len(verdicts('local.csv'))} instances in {time.perf_counter() - t0:.1f} s")

    with open("local.csv") as f:           # "killed" after two rows
        lines = f.readlines()
    with open("local.csv", "w") as f:
        f.writelines(lines[:3])
    t0 = time.perf_counter()
    assert verifier(["batch", inst, "--out", "local.csv"]) == 0   # resumes: 3 to run
    print(f"resumed: {len(verdicts('local.csv'))} instances, the 3 missing ones run again in "
          f"{time.perf_counter() - t0:.1f} s")

    if a.workers > 1:
        t0 = time.perf_counter()
        assert verifier(["batch", inst, "--out", "ray.csv", "--workers", str(a.workers)]) == 0
        print(f"{a.workers} Ray workers: {time.perf_counter() - t0:.1f} s (Ray's start included)")
        assert verdicts("ray.csv") == verdicts("local.csv"), "the verdicts differ"
        print("same verdicts as in-process")


if __name__ == "__main__":
    main()
