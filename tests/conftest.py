"""Test-wide settings: one CPU thread (the suite is sized for a 2-core machine), the tests
directory on sys.path (for ``helpers``), and a hypothesis profile without deadlines."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("verifier", deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("verifier")
except ImportError:  # pragma: no cover
    pass
