"""Where tensors live: one ``device`` argument, resolved once, then read off existing tensors.

``resolve_device(spec)`` turns what a user gives (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
``"auto"``, a ``torch.device``, or None for the CPU) into a ``torch.device``, or raises
:class:`DeviceError` (``cuda`` where no GPU is visible, an index beyond the GPUs there are).
``"auto"`` is the first GPU when one is visible, else the CPU.

The engine never creates a tensor on the default device: every factory call names its device
(``device=x.device`` of a tensor at hand, or ``new_zeros`` / ``zeros_like``), so that a model
wrapped with ``device="cuda"`` keeps every bound, alpha, beta, domain and attack point there
(``tests/test_devices.py`` scans the source for factory calls without ``device=``).
``as_tensor(x, dtype, device)``: a tensor stays where it is unless ``device`` is given; other
data (lists, numpy arrays, numbers) goes to ``device``, the CPU when None.
"""
from __future__ import annotations

import torch

from .device_names import check_device_name
from .errors import DeviceError


def resolve_device(device=None) -> torch.device:
    """-> the ``torch.device`` of ``device`` (see the module doc); a GPU must be visible."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        name = check_device_name(device)
        if name == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!s}: no CUDA GPU is visible here (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                              "use --device cpu (or auto, which falls back to the CPU)")
        count = torch.cuda.device_count()
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(f"device {device!s}: only {count} GPU(s) visible (cuda:0 to "
                              f"cuda:{count - 1})")
        dev = torch.device("cuda", index)
    return dev


def as_tensor(x, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``x`` as a tensor: a tensor keeps its device unless ``device`` is given (its dtype
    unless ``dtype`` is); any other data is placed on ``device`` (the CPU when None)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=x.device if device is None else device)
    return torch.as_tensor(x, dtype=dtype, device=torch.device("cpu") if device is None else device)


def device_of(*values, default=None) -> torch.device:
    """The device of the first tensor among ``values``; ``default`` (the CPU) when none is one."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu") if default is None else resolve_device(default)


def _generator_device(generator) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def uniform(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> torch.Tensor:
    """U[0, 1) of ``shape`` on ``device``, drawn on the generator's device (the CPU without
    one) and moved: a seeded CPU generator gives the same points whatever the model's device."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=_generator_device(generator))
    return u.to(device)


def normal(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> torch.Tensor:
    """N(0, 1) of ``shape`` on ``device``, drawn like ``uniform``."""
    g = torch.randn(shape, generator=generator, dtype=dtype, device=_generator_device(generator))
    return g.to(device)


def check_same_device(actual: torch.device, wanted, what: str) -> None:
    """DeviceError when ``wanted`` (None: anything goes) names another device than ``actual``."""
    if wanted is not None and resolve_device(wanted) != actual:
        raise DeviceError(f"{what} lives on {actual}, not on the device asked for ({wanted}); "
                          f"wrap it with device={str(wanted)!r} or leave the device out")
