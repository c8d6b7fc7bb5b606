"""Process-level settings that make bound propagation faster on CPU.

``tune_allocator()``: bound propagation allocates and frees many large, short-lived tensors (the
A matrices of every backward pass). With glibc's default allocator settings, blocks above a
dynamic threshold come from fresh ``mmap`` calls and freed heap memory is returned to the
system, so the next pass pays a page fault for every 4 KiB it touches (measured: about 10,000
faults per CROWN call on the CIFAR ResNet ``resnet2b``). Raising the mmap threshold (to 32 MiB)
and the trim threshold (to 1 GiB) keeps that memory in the heap for reuse: about 600 faults per
call and about 20% less time. The cost: up to the trim threshold of freed memory stays mapped to
the process. The ``verifier`` command line and the benchmarks call it; call it yourself in a
long-running process that bounds many inputs. A no-op (returning False) where the C library is
not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

_IMPORTED_AT = time.perf_counter()

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory in the heap (see the module doc); -> whether the settings took effect.
    Both thresholds are set together: setting one alone turns off glibc's dynamic adjustment of
    the other and makes things worse."""
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def since_start() -> float:
    """Seconds since this process started: the interpreter's own start and every import
    included (Linux: from ``/proc``, to 0.01 s); elsewhere, since ``verifier.runtime`` was
    imported (the command line imports it first)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # fields[0] is the state (field 3 of proc(5)); starttime is field 22
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT
