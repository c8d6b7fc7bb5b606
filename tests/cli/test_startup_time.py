"""Start-up is not an instance's time: a fresh process pays for its imports and first-use
set-up before any instance's clock starts (``verifier.complete.warmup``) and reports it on its
own as ``startup_s``; the first row of a batch is no slower than the rows after it."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tests" / "data" / "vnncomp_test"


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "verifier", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_first_row_of_a_batch_is_timed_like_the_others(tmp_path):
    """Three copies of one instance (copied files: a batch runs a repeated row once)."""
    for i in range(3):
        shutil.copy(BENCH / "onnx" / "test_sat.onnx", tmp_path / f"net{i}.onnx")
    shutil.copy(BENCH / "vnnlib" / "test_prop.vnnlib", tmp_path / "prop.vnnlib")
    (tmp_path / "i.csv").write_text("".join(f"net{i}.onnx,prop.vnnlib,60\n" for i in range(3)))
    r = _cli(["batch", "i.csv", "--out", "r.csv"], tmp_path)
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["sat"] * 3
    times = [float(row["time_s"]) for row in rows]
    assert times[0] <= max(times[1:]) + 0.5, times
    assert "start-up:" in r.stderr


def test_verify_reports_startup_apart_from_time_s(tmp_path):
    """A cold process's time_s is the warm time_s of the same instance (this test process has
    run it once already), give or take 0.5 s; the start-up is in startup_s."""
    from verifier.complete import verify
    onnx, spec = BENCH / "onnx" / "test_sat.onnx", BENCH / "vnnlib" / "test_prop.vnnlib"
    verify(str(onnx), str(spec), timeout=60)
    warm = verify(str(onnx), str(spec), timeout=60).time_s
    out = json.loads(_cli(["verify", str(onnx), str(spec), "--json"], tmp_path).stdout)
    assert out["status"] == "sat"
    assert out["time_s"] <= warm + 0.5, (out["time_s"], warm)
    assert out["startup_s"] > 0


def test_warm_up_instances_are_what_the_warm_up_says():
    """The shipped network is y0 = min(max(x0 + x1, 0), 1), y1 = max(x0 + x1, 0) (onnxruntime
    at sampled points), the sat property is found by PGD, and the unsat one needs branch and
    bound (IBP, CROWN, alpha-CROWN leave it open), so the warm-up runs every step."""
    import numpy as np
    import onnxruntime as ort

    from verifier.complete import verify
    from verifier.complete.warmup import WARMUP_DIR, startup_seconds, warm_up
    net = WARMUP_DIR / "net.onnx"
    x = np.random.default_rng(0).uniform(-1, 1, (64, 1, 2)).astype(np.float32)
    sess = ort.InferenceSession(str(net), providers=["CPUExecutionProvider"])
    y = np.concatenate([sess.run(None, {"x": xi})[0] for xi in x])
    s = x[:, 0, 0] + x[:, 0, 1]
    np.testing.assert_allclose(y[:, 0], np.clip(s, 0, 1), atol=1e-6)
    np.testing.assert_allclose(y[:, 1], np.maximum(s, 0), atol=1e-6)
    sat = verify(str(net), str(WARMUP_DIR / "sat.vnnlib"), timeout=30)
    unsat = verify(str(net), str(WARMUP_DIR / "unsat.vnnlib"), timeout=30, attack=False)
    assert (sat.status, sat.method) == ("sat", "pgd")
    assert (unsat.status, unsat.method) == ("unsat", "bab-input")
    first = warm_up()
    assert startup_seconds() == first and warm_up() == first    # once per process


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_pytorch_model_does_not_import_the_onnx_converter_and_onnx_still_maps_after_it():
    """Wrapping a PyTorch model imports neither onnx2torch nor torchvision (seconds of start-up
    for nothing); an ONNX file read afterwards in the same process still finds its rules."""
    out = _python(f"""
import sys, torch
from verifier import BoundedModel
from verifier.complete import verify
net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
BoundedModel(net, input_shape=(4,)).bounds
print(sorted(m for m in ("onnx2torch", "torchvision") if m in sys.modules))
v = verify({str(BENCH / "onnx" / "test_unsat.onnx")!r}, {str(BENCH / "vnnlib" / "test_prop.vnnlib")!r},
           timeout=60)
print(v.status)
""")
    assert out.split("\n")[:2] == ["[]", "unsat"]


def test_vnncomp_run_takes_the_start_up_out_of_the_instance_budget(tmp_path, monkeypatch):
    """The VNN-COMP harness times the whole process: a run whose process started 7 s ago and
    was given 10 s leaves the instance 3 s, not 10 (else a cold process overruns the harness)."""
    import verifier.cli.verify as cv
    from verifier.cli import main

    seen = {}

    def fake_run_instance(onnx_path, vnnlib_path, timeout, seed=0, cache=None, warm=True,
                          device="cpu"):
        seen["timeout"] = timeout
        return {"status": "unknown", "reason": "stub", "method": "", "time_s": 0.0,
                "verdict": None}

    monkeypatch.setattr(cv, "run_instance", fake_run_instance)
    monkeypatch.setattr(cv, "since_start", lambda: 7.0)
    out = tmp_path / "res.txt"
    assert main(["vnncomp-run", "x", str(BENCH / "onnx" / "test_sat.onnx"),
                 str(BENCH / "vnnlib" / "test_prop.vnnlib"), str(out), "10"]) == 0
    assert abs(seen["timeout"] - 3.0) < 1e-9
    assert out.read_text() == "unknown\n"
    monkeypatch.setattr(cv, "since_start", lambda: 12.0)   # over budget: nothing left, not < 0
    assert main(["vnncomp-run", "x", str(BENCH / "onnx" / "test_sat.onnx"),
                 str(BENCH / "vnnlib" / "test_prop.vnnlib"), str(out), "10"]) == 0
    assert seen["timeout"] == 0.0
