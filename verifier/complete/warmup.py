"""Start-up work done once per process, before the first instance's clock starts.

The first ``verify`` of a process pays for what Python and torch do only once: importing the
ONNX reader, onnxruntime (the replay) and the parts of torch that load on first use (the
optimizer of alpha-CROWN, autograd for PGD), about 2-5 s against 0.02-0.3 s for the same
instance again. Counted in that instance's ``time_s``, it skews the first row of every batch.
``warm_up()`` pays it up front by deciding two tiny shipped instances (``warmup/``: a 2-2-2
ReLU network, one sat property found by PGD and replayed with onnxruntime, one unsat property
that IBP, CROWN and alpha-CROWN leave open and input splits prove), so that whatever the
ONNX path imports today is imported, with nothing to keep in step. The command line calls it
before starting any clock and reports its time as ``startup_s``.
"""
from __future__ import annotations

import time
from pathlib import Path

from .verify import verify

WARMUP_DIR = Path(__file__).with_name("warmup")

_startup_s: float | None = None


def warm_up() -> float:
    """Decide the two warm-up instances once per process (a no-op afterwards); -> the seconds
    the first call took (the same number on later calls). An error here is raised: the
    instances that follow would meet it too."""
    global _startup_s
    if _startup_s is None:
        t0 = time.perf_counter()
        net = WARMUP_DIR / "net.onnx"
        verify(net, WARMUP_DIR / "sat.vnnlib", timeout=30.0)
        verify(net, WARMUP_DIR / "unsat.vnnlib", timeout=30.0, attack=False)
        _startup_s = time.perf_counter() - t0
    return _startup_s


def startup_seconds() -> float | None:
    """What ``warm_up`` took in this process, or None before it ran."""
    return _startup_s
