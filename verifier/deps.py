"""Third-party packages that are imported where a feature uses them, through one helper.

``require(module, purpose)`` imports ``module`` or raises :class:`MissingDependencyError`,
whose one-line message names the feature, the pip package and the command that installs it:
the optional extras of ``pyproject.toml`` (``pip install -e ".[ray]"``), or the base install
for a package that every documented command may need (a broken or partial environment).
The command line turns the error into ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import importlib

from .errors import MissingDependencyError

BASE_INSTALL = "pip install -r requirements.txt -e ."

# import name -> (pip package, extra of pyproject.toml; None: part of the base install)
PACKAGES: dict[str, tuple[str, str | None]] = {
    "ray": ("ray", "ray"),
    "onnx2torch": ("onnx2torch", "onnx2torch"),
    "onnxruntime": ("onnxruntime", None),
    "yaml": ("pyyaml", None),
}


def install_command(module: str) -> str:
    """How to install the package that provides ``module``."""
    top = module.split(".")[0]
    package, extra = PACKAGES.get(top, (top, None))
    if extra is not None:
        return f"pip install -e \".[{extra}]\" (or pip install {package})"
    if top in PACKAGES:
        return f"{BASE_INSTALL} (or pip install {package})"
    return f"pip install {package}"


def require(module: str, purpose: str):
    """``import module`` -> the module; else a MissingDependencyError that says what
    ``purpose`` (e.g. "--workers 2", "reading a YAML config") needs and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = PACKAGES.get(top, (top, None))[0]
        raise MissingDependencyError(purpose, module, package, install_command(module),
                                     str(e).splitlines()[0] if str(e) else "") from None
