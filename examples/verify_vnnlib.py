"""Verify an ONNX model against a VNN-LIB property: the shipped test networks of VNN-COMP's
`test` benchmark (tests/data/vnncomp_test), one property that holds and one that does not.

    python examples/verify_vnnlib.py

``verify`` reads the VNN-LIB file (a box of inputs and the output conditions of a
counterexample), attacks first (PGD; a candidate counts only once replayed on the ONNX model
with onnxruntime), then bounds (IBP, CROWN, alpha-CROWN), then branches and bounds. The verdict
carries its reason: ``unsat`` names the method that refuted every output condition, ``sat`` the
attack whose counterexample was replayed. Command line: ``verifier verify NET.onnx PROP.vnnlib``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from verifier.complete import verify
from verifier.spec.vnnlib import read_vnnlib

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "vnncomp_test"
PROP = DATA / "vnnlib" / "test_prop.vnnlib"


def main() -> None:
    spec = read_vnnlib(PROP)
    print(f"property {PROP.name}: {spec}")
    for name in ("test_unsat", "test_sat"):
        onnx = DATA / "onnx" / f"{name}.onnx"
        v = verify(str(onnx), str(PROP), timeout=30)
        print(f"\n{onnx.name}: {v.status} ({v.reason}; {v.time_s:.3f} s)")
        assert v.status == name.split("_")[1], "this copy of the benchmark ships the answers"
        if v.counterexample is not None:
            # check the counterexample ourselves: run the ONNX model on it
            sess = ort.InferenceSession(str(onnx))
            inp = sess.get_inputs()[0]
            x = np.asarray(v.counterexample.x, dtype=np.float32)
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            y = sess.run(None, {inp.name: x.reshape(shape)})[0].reshape(-1)
            print(f"  x = {x.reshape(-1)}  ->  y = {y}  (the engine reported {v.counterexample.y})")
            assert np.allclose(y, np.asarray(v.counterexample.y).reshape(-1), atol=1e-5)
            print("  in the VNN-COMP format:", v.counterexample.vnncomp_text().replace("\n", " "))


if __name__ == "__main__":
    main()
