"""Every script in examples/ runs to completion (exit 0) within two minutes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DATA = ROOT / "examples" / "data"
NEEDS_DATA = {
    "bound_onnx_model.py": ["lirpa_mnist_fc_3layer.onnx", "mnist_sample.npy", "mnist_label.npy"],
    "weight_flatness.py": ["lirpa_mnist_fc_3layer.onnx", "mnist_test100.npz"],
    "report.py": ["lirpa_mnist_fc_3layer.onnx", "mnist_sample.npy"],
}


def test_there_are_examples():
    assert len(EXAMPLES) >= 2
    # one script per user job (README's jobs table)
    for name in ("bound_pytorch_model", "bound_onnx_model", "verify_vnnlib", "vnncomp_folder",
                 "train_digits", "train_lipschitz", "weight_flatness", "report", "style_shift"):
        assert (ROOT / "examples" / f"{name}.py").is_file(), name


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    missing = [f for f in NEEDS_DATA.get(script.name, []) if not (DATA / f).exists()]
    if missing:
        pytest.skip(f"examples/data/ lacks {', '.join(missing)} (the shipped example model)")
    # run from an unrelated directory: the scripts must find their files themselves
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.strip(), "the example printed nothing"
