"""What the documented commands need is in the base install (``pyproject.toml``'s
``dependencies``); what stays optional fails with one line that names the extra to install
(exit status 2), never with an internal error or a silent fallback.

Missing packages are simulated with ``sys.modules[name] = None`` (``import name`` then raises
ImportError), in this process: the command line runs through ``verifier.cli.main``.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from verifier.cli import main
from verifier.deps import PACKAGES, require
from verifier.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
TEST_BENCH = ROOT / "tests" / "data" / "vnncomp_test"
# import name -> pip name, where they differ
PIP_NAMES = {"yaml": "pyyaml", "sklearn": "scikit-learn", "google": "protobuf"}
# the repository's model zoo (models/), not an installed package
NOT_PACKAGES = {"models"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def _third_party_imports():
    """-> (top-level names imported by an import statement anywhere in verifier/, names
    imported through ``require("name", ...)``), standard library left out."""
    direct, required = set(), set()
    for path in (ROOT / "verifier").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                direct |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                direct.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                required.add(node.args[0].value.split(".")[0])
    drop = set(sys.stdlib_module_names) | NOT_PACKAGES | {"verifier", "__future__"}
    return direct - drop, required - drop


def test_the_import_scan_sees_the_imports():
    """Guards the test below against scanning nothing."""
    direct, required = _third_party_imports()
    assert {"torch", "numpy", "onnx", "networkx"} <= direct
    assert {"ray", "yaml", "onnxruntime"} <= required


def test_every_package_imported_directly_is_in_the_base_install():
    """An ``import x`` that runs in a documented command must not fail after the README's first
    command (``pip install -r requirements.txt -e .``); optional packages go through
    ``verifier.deps.require``."""
    base = _names(_pyproject()["dependencies"])
    direct, _ = _third_party_imports()
    missing = {PIP_NAMES.get(m, m) for m in direct} - base
    assert not missing, f"imported without require() but not in the base dependencies: {missing}"


def test_every_required_package_is_where_its_install_hint_says():
    project = _pyproject()
    base = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    _, required = _third_party_imports()
    for module in required:
        assert module in PACKAGES, f"require({module!r}) without an entry in deps.PACKAGES"
    for module, (package, extra) in PACKAGES.items():
        if extra is None:
            assert package in base, f"{package} is said to be in the base install"
        else:
            assert package in extras[extra] and package not in base, (package, extra)


def test_onnxruntime_and_pyyaml_are_in_the_base_install():
    """Replay on onnxruntime is part of every sat verdict; YAML configs are documented."""
    base = _names(_pyproject()["dependencies"])
    assert {"onnxruntime", "pyyaml"} <= base
    assert "ray" not in base


def test_require_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError) as e:
        require("ray", "--workers 4")
    msg = str(e.value)
    assert msg.startswith("--workers 4 needs the Python package ray, which is not installed")
    assert 'pip install -e ".[ray]"' in msg and "\n" not in msg


# -- the digits ship with the package ---------------------------------------------------------

def test_digits_load_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    from verifier.train.data import load_digits_split
    train, test = load_digits_split("train"), load_digits_split("test")
    # 1,797 digits, a quarter (449) held out
    assert (len(train), len(test)) == (1348, 449)
    assert tuple(train.x.shape[1:]) == (1, 8, 8) and train.n_classes == 10
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert sorted(set(train.y.tolist()) | set(test.y.tolist())) == list(range(10))


def test_shipped_digits_equal_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    from verifier.train.data import DIGITS_FILE
    d = datasets.load_digits()
    with np.load(DIGITS_FILE) as f:
        np.testing.assert_array_equal(f["images"], d.images)
        np.testing.assert_array_equal(f["labels"], d.target)


def test_the_digits_file_is_package_data():
    """A wheel (not only an editable install) carries it."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "train/digits.npz" in data["verifier"]


# -- the command line: one line, exit 2 ---------------------------------------------------------

def test_yaml_config_without_pyyaml_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\n")
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: reading the YAML config")
    assert "pyyaml" in err and "pip install" in err
    assert not (tmp_path / "run").exists()


def test_verify_without_onnxruntime_says_so_instead_of_replaying_on_torch(monkeypatch, capsys):
    """The sat instance would otherwise be replayed on the converted model."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["verify", str(TEST_BENCH / "onnx" / "test_sat.onnx"),
                 str(TEST_BENCH / "vnnlib" / "test_prop.vnnlib"), "--timeout", "30", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: replaying counterexamples")
    assert "onnxruntime" in err and "pip install" in err


def test_verify_api_without_onnxruntime_raises_the_typed_error(monkeypatch):
    from verifier.complete import verify
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        verify(str(TEST_BENCH / "onnx" / "test_sat.onnx"),
               str(TEST_BENCH / "vnnlib" / "test_prop.vnnlib"), timeout=30)


def test_onnx2torch_and_torchvision_are_not_in_the_base_install():
    """The CPU build of torch cannot import PyPI's torchvision, which onnx2torch imports."""
    project = _pyproject()
    assert not {"onnx2torch", "torchvision"} & _names(project["dependencies"])
    assert "onnx2torch" in _names(project["optional-dependencies"]["onnx2torch"])
    pins = (ROOT / "requirements.txt").read_text().split("\n")
    assert not [p for p in pins if p.strip().startswith("torchvision")]
