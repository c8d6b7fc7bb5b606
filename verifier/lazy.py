"""Lazily imported package attributes (PEP 562): a package's ``__getattr__`` and ``__dir__``
that import a public name's module on first use, so importing the package stays cheap."""
from __future__ import annotations

import importlib


def lazy_attributes(package: str, lazy: dict[str, str], namespace: dict, public: list[str]):
    """-> (``__getattr__``, ``__dir__``) for ``package`` whose names ``lazy`` (name -> relative
    module) are imported on first access and then cached in ``namespace`` (its globals)."""
    def getattr_(name: str):
        if name in lazy:
            value = getattr(importlib.import_module(lazy[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_():
        return sorted(set(namespace) | set(public))

    return getattr_, dir_
