"""``verifier.train``'s lazily imported names stay what they name: a submodule loaded later
(Python then sets it as an attribute of the package) must not shadow a function of the same
name (``evaluate`` was once both)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_lazy_name_is_also_a_submodule():
    import verifier.train as vt
    submodules = {m.name for m in pkgutil.iter_modules(vt.__path__)}
    assert not (set(vt._LAZY) & submodules), set(vt._LAZY) & submodules


def test_evaluate_is_the_function_after_every_submodule_is_imported():
    code = ("import importlib, pkgutil, verifier.train as vt\n"
            "from verifier.train import evaluate as before\n"
            "for m in pkgutil.iter_modules(vt.__path__):\n"
            "    importlib.import_module('verifier.train.' + m.name)\n"
            "from verifier.train import evaluate, train\n"
            "assert callable(before) and callable(evaluate) and callable(train), (evaluate, train)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
