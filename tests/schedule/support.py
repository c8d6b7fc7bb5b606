"""Shared helpers of the scheduler tests: instance files, the expected verdicts, reading a
results file, finding Ray worker processes under this process (by /proc, no psutil), and the
least output of a net over a box by sampling and PGD."""
from __future__ import annotations

import csv
import os
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
TEST_BENCH = DATA / "vnncomp_test"
ACAS_SAMPLE = DATA / "acasxu_sample"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "vnncomp"


def expected(bench: Path) -> dict:
    """(abs onnx, abs vnnlib) -> verdict, from a folder's expected.csv."""
    with open(bench / "expected.csv", newline="") as f:
        return {(str(bench / o), str(bench / v)): e for o, v, e in csv.reader(f)}


def write_instances(path: Path, rows) -> Path:
    """An instances.csv of (onnx, vnnlib, timeout) rows with absolute paths."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([(str(o), str(v), t) for o, v, t in rows])
    return path


def bench_rows(bench: Path, timeout: float = 60) -> list:
    with open(bench / "instances.csv", newline="") as f:
        return [(bench / o, bench / v, timeout) for o, v, _ in csv.reader(f)]


def results(path: Path, cwd: Path | None = None) -> dict:
    """(abs onnx, abs vnnlib) -> row of a verifier batch results file (paths relative to the
    folder the run started in: ``cwd``, default this process's); asserts every instance
    appears once."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    absolute = lambda p: os.path.normpath(os.path.join(base, p))  # noqa: E731
    out = {(absolute(r["onnx"]), absolute(r["vnnlib"])): r for r in rows}
    assert len(out) == len(rows), "an instance has more than one row"
    return out


def descendants_named(title: str) -> list[int]:
    """Pids of this process's descendants whose command line starts with ``title``."""
    parent, cmd = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    mine, todo = set(), [os.getpid()]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in mine:
                mine.add(c)
                todo.append(c)
    return [p for p in mine if cmd.get(p, "").startswith(title)]


def least_output(net, n_in: int, half: float = 0.5) -> float:
    """The least output of a one-output ``net`` over ``[-half, half]^n_in`` found by 20,000
    random points each descended by 30 signed-gradient steps: an upper estimate of the true
    minimum (a property ``y <= m + delta`` with it has a counterexample)."""
    import torch
    x = (torch.rand(20_000, n_in, generator=torch.Generator().manual_seed(0)) - 0.5) * 2 * half
    for _ in range(30):
        x.requires_grad_(True)
        g, = torch.autograd.grad(net(x).sum(), x)
        x = (x.detach() - 0.04 * half * g.sign()).clamp(-half, half)
    with torch.no_grad():
        return float(net(x).min())
