"""verifier.shapes.broadcast_shapes agrees with torch's on every small case, and bounding an
ONNX model does not import sympy (what torch.broadcast_shapes pulls in on first use)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verifier.shapes import broadcast_shapes

ROOT = Path(__file__).resolve().parents[1]
DIMS = [(), (1,), (3,), (2, 1), (1, 3), (2, 3), (3, 2), (4, 1, 3), (1, 1, 1), (0,), (0, 3)]


@pytest.mark.parametrize("a,b", list(itertools.product(DIMS, DIMS)))
def test_broadcast_shapes_matches_torch(a, b):
    try:
        want = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        with pytest.raises(RuntimeError):
            broadcast_shapes(a, b)
        return
    assert broadcast_shapes(a, b) == want
    assert broadcast_shapes(a, b, (1,)) == tuple(torch.broadcast_shapes(a, b, (1,)))


def test_bounding_an_onnx_model_does_not_import_sympy():
    code = ("import sys, numpy as np\n"
            "from verifier import BoundedModel, LpBall\n"
            "bm = BoundedModel.from_onnx('examples/data/lirpa_mnist_fc_3layer.onnx')\n"
            "x = np.load('examples/data/mnist_sample.npy').astype('float32')\n"
            "import torch\n"
            "bm.bounds(LpBall(torch.from_numpy(x), 0.03), method='crown')\n"
            "print('sympy' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
