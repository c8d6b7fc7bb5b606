"""The spelling of a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``), checked without torch: the
configs and the command line read it before torch is imported (``verifier --help`` stays
torch-free); ``verifier.devices.resolve_device`` turns it into a ``torch.device``."""
from __future__ import annotations

import re

from .errors import DeviceError

DEVICE_NAMES = "cpu, cuda, cuda:N or auto"
_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


def check_device_name(text) -> str:
    """``text`` lowercased and stripped if it names a device this package accepts (no GPU
    check), else DeviceError."""
    name = str(text).strip().lower()
    if not _PATTERN.match(name):
        raise DeviceError(f"unknown device {text!r}: use {DEVICE_NAMES}")
    return name
