"""verify(): verdicts known by construction, the VNN-COMP `test` benchmark, counterexample
replay, and bad input that must give an error (never a verdict)."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier import ShapeError
from verifier.complete import verify
from verifier.spec.vnnlib import VnnlibError, parse_vnnlib

DATA = Path(__file__).resolve().parents[1] / "data" / "vnncomp_test"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "vnncomp"


def _onnx_relu_net(path, W1, b1, W2, b2):
    """y = W2 relu(W1 x + b1) + b2 as an ONNX file with input [1, n]."""
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in ((np.asarray(W1).T, "W1"), (b1, "b1"), (np.asarray(W2).T, "W2"), (b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    n_in, n_out = np.asarray(W1).shape[1], np.asarray(W2).shape[0]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8  # what the installed onnxruntime reads
    onnx.save(m, path)
    return path


@pytest.fixture
def absnet(tmp_path):
    """y0 = |x0| = relu(x0) + relu(-x0), y1 = 0.5: on x0 in [-1, 1], y0 ranges over [0, 1]."""
    return _onnx_relu_net(tmp_path / "abs.onnx", [[1.0], [-1.0]], [0, 0], [[1, 1], [0, 0]], [0, 0.5])


def _spec(tmp_path, text, name="p.vnnlib"):
    p = tmp_path / name
    p.write_text(text)
    return p


HEAD = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"


def test_unsat_by_construction(absnet, tmp_path):
    # |x| >= 0 always: y0 <= -0.1 is impossible
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (<= Y_0 -0.1))\n")
    v = verify(absnet, p, timeout=20)
    assert v.status == "unsat", v
    assert v.method in ("ibp", "crown")


def test_sat_by_construction_with_replayed_counterexample(absnet, tmp_path):
    # |x| >= 0.9 happens near the corners
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= Y_0 0.9))\n")
    v = verify(absnet, p, timeout=20)
    assert v.status == "sat", v
    cex = v.counterexample
    assert -1 <= cex.x[0] <= 1
    sess = ort.InferenceSession(str(absnet), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": cex.x.astype(np.float32).reshape(1, 1)})[0].reshape(-1)
    assert y[0] >= 0.9
    np.testing.assert_allclose(y, cex.y, rtol=0, atol=0)
    assert cex.vnncomp_text().startswith("((X_0 ") and "(Y_1 " in cex.vnncomp_text()


def test_disjunction_of_outputs_sat_only_through_second_disjunct(absnet, tmp_path):
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n"
                              "(assert (or (and (<= Y_0 -1)) (and (>= Y_0 Y_1) (>= Y_0 0.8))))\n")
    v = verify(absnet, p, timeout=20)
    assert v.status == "sat" and v.counterexample.disjunct == 1


def test_disjunction_all_impossible_is_unsat(absnet, tmp_path):
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n"
                              "(assert (or (and (<= Y_0 -1)) (and (>= Y_0 1.5)) (and (<= Y_1 0.4))))\n")
    assert verify(absnet, p, timeout=20).status == "unsat"


def test_two_input_boxes_only_second_is_sat(absnet, tmp_path):
    # box 1: x in [-0.1, 0.1] -> y0 <= 0.1; box 2: x in [0.5, 1] -> y0 >= 0.5
    p = _spec(tmp_path, HEAD + "(assert (or (and (>= X_0 -0.1) (<= X_0 0.1))"
                              " (and (>= X_0 0.5) (<= X_0 1))))\n(assert (>= Y_0 0.45))\n")
    v = verify(absnet, p, timeout=20)
    assert v.status == "sat" and v.counterexample.region == 1 and v.counterexample.x[0] >= 0.5


def test_two_input_boxes_both_unsat(absnet, tmp_path):
    p = _spec(tmp_path, HEAD + "(assert (or (and (>= X_0 -0.1) (<= X_0 0.1))"
                              " (and (>= X_0 0.2) (<= X_0 0.3))))\n(assert (>= Y_0 0.45))\n")
    assert verify(absnet, p, timeout=20).status == "unsat"


def test_unknown_when_bounds_are_loose_and_no_counterexample(tmp_path):
    # y0 = relu(x) - relu(x) = 0 exactly, but interval/CROWN bounds on [-1, 1] are loose
    net = _onnx_relu_net(tmp_path / "z.onnx", [[1.0], [1.0]], [0, 0], [[1, -1], [0, 0]], [0, 0])
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= Y_0 0.5))\n")
    v = verify(net, p, timeout=20, bab=False)
    assert v.status == "unknown", v
    assert v.counterexample is None
    # input splitting makes both ReLUs stable on each half: then the bound is exact
    v = verify(net, p, timeout=20)
    assert v.status == "unsat" and v.method == "bab-input", v


def test_spec_and_model_sizes_must_agree(absnet, tmp_path):
    p = _spec(tmp_path, "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                        "(declare-const Y_1 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
                        "(assert (>= X_1 0))\n(assert (<= X_1 1))\n(assert (<= Y_0 0))\n")
    with pytest.raises(ShapeError, match="2 inputs"):
        verify(absnet, p, timeout=5)


def test_malformed_spec_is_an_error_not_a_verdict(absnet, tmp_path):
    p = _spec(tmp_path, HEAD + "(assert (>= X_0 -1)\n")
    with pytest.raises(VnnlibError, match="p.vnnlib:"):
        verify(absnet, p, timeout=5)


def _expected():
    with open(DATA / "expected.csv") as f:
        return [tuple(r) for r in csv.reader(f)]


@pytest.mark.parametrize("onnx_rel,vnnlib_rel,expected", _expected())
def test_vnncomp_test_benchmark_answers_match_ground_truth(onnx_rel, vnnlib_rel, expected):
    v = verify(DATA / onnx_rel, DATA / vnnlib_rel, timeout=60)
    assert v.status == expected, v
    if v.status == "sat":
        spec = parse_vnnlib((DATA / vnnlib_rel).read_text())
        region = spec.regions[v.counterexample.region]
        assert np.all(v.counterexample.x >= region.lower) and np.all(v.counterexample.x <= region.upper)
        sess = ort.InferenceSession(str(DATA / onnx_rel), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        y = sess.run(None, {inp.name: v.counterexample.x.astype(np.float32).reshape(shape)})[0].reshape(-1)
        assert region.disjuncts[v.counterexample.disjunct].holds(y)


def _forward_matches_ort(onnx_path, lower, upper, n=8):
    from verifier import BoundedModel
    m = BoundedModel.from_onnx(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = (lower + rng.random(lower.shape) * (upper - lower)).astype(np.float32)
        want = sess.run(None, {inp.name: x.reshape(shape)})[0].reshape(-1)
        got = m(torch.from_numpy(x).reshape(1, *m.input_shape)).numpy().reshape(-1)
        ours = m.graph_forward(torch.from_numpy(x).reshape(1, *m.input_shape)).numpy().reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bench", ["test", "acasxu", "mnist_fc", "oval21", "collins_rul_cnn"])
def test_shared_vnncomp_models_load_and_match_onnxruntime(bench):
    d = SHARED / bench
    if not d.exists():
        pytest.skip("../shared/benchmarks/vnncomp is not present")
    from verifier.spec.vnnlib import read_vnnlib
    seen = set()
    with open(d / "instances.csv") as f:
        rows = [r for r in csv.reader(f) if r]
    for onnx_rel, vnnlib_rel, _ in rows:
        if onnx_rel in seen:
            continue
        seen.add(onnx_rel)
        spec = read_vnnlib(d / vnnlib_rel)
        r = spec.regions[0]
        _forward_matches_ort(d / onnx_rel, r.lower, r.upper, n=2)


def test_cli_verify_and_batch(tmp_path):
    out = tmp_path / "res.csv"
    r = subprocess.run([sys.executable, "-m", "verifier", "batch", str(DATA / "instances.csv"),
                        "--out", str(out), "--timeout", "30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    exp = {(o, v): e for o, v, e in _expected()}
    assert len(rows) == 5
    for row in rows:
        key = (str(Path(row["onnx"]).relative_to(Path(row["onnx"]).parents[1])),
               str(Path(row["vnnlib"]).relative_to(Path(row["vnnlib"]).parents[1])))
        assert row["status"] == exp[key]
    r = subprocess.run([sys.executable, "-m", "verifier", "verify", str(DATA / "onnx/test_sat.onnx"),
                        str(DATA / "vnnlib/test_prop.vnnlib"), "--json", "--cex-file", str(tmp_path / "c.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '"status": "sat"' in r.stdout
    assert (tmp_path / "c.txt").read_text().startswith("((X_0 ")


@pytest.mark.parametrize("args,needle", [
    (["verify", "missing.onnx", "x.vnnlib"], "no such file"),
    (["verify", str(DATA / "onnx/test_sat.onnx"), str(DATA / "vnnlib/test_nano.vnnlib")], "inputs"),
    (["batch", "nope.csv", "--out", "o.csv"], "no such file"),
])
def test_cli_verify_bad_input_is_one_clear_error(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, "-m", "verifier", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert r.stdout.strip() == ""


def _bad_files(tmp_path):
    good_onnx = DATA / "onnx/test_sat.onnx"
    good_spec = DATA / "vnnlib/test_prop.vnnlib"
    trunc = tmp_path / "trunc.onnx"
    data = good_onnx.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    # an ONNX model with two ops we cannot bound
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    g = helper.make_graph([helper.make_node("Floor", ["x"], ["e"], name="the_floor"),
                           helper.make_node("Selu", ["e"], ["y"], name="the_selu")],
                          "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    unsup = tmp_path / "unsup.onnx"
    onnx.save(m, unsup)
    syntax = tmp_path / "syntax.vnnlib"
    syntax.write_text(good_spec.read_text().replace("(assert", "(assert (", 1))
    semantic = tmp_path / "semantic.vnnlib"
    semantic.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n"
                        "(assert (<= Y_0 0))\n")  # X_0 has no lower bound
    return [
        ([str(trunc), str(good_spec)], "trunc.onnx"),
        ([str(unsup), str(good_spec)], "the_floor"),
        ([str(good_onnx), str(syntax)], "syntax.vnnlib:"),
        ([str(good_onnx), str(semantic)], "semantic.vnnlib:"),
        ([str(good_onnx), str(DATA / "vnnlib/test_nano.vnnlib")], "inputs"),
        ([str(tmp_path / "missing.onnx"), str(good_spec)], "no such file"),
        ([str(good_onnx), str(tmp_path / "missing.vnnlib")], "no such file"),
    ]


def test_cli_verify_bad_input_corpus(tmp_path, capsys):
    """Each bad file is one clear error (exit 2, the file or node named, no traceback, no
    verdict): the first through ``python -m verifier`` in a new process, the rest in-process
    (each new process costs seconds of imports)."""
    from verifier.cli import main
    for i, (args, needle) in enumerate(_bad_files(tmp_path)):
        if i == 0:
            r = subprocess.run([sys.executable, "-m", "verifier", "verify", *args, "--timeout", "10"],
                               capture_output=True, text=True, timeout=120)
            code, out, err = r.returncode, r.stdout, r.stderr
        else:
            code = main(["verify", *args, "--timeout", "10"])
            cap = capsys.readouterr()
            out, err = cap.out, cap.err
        assert code == 2, (args, out, err)
        assert "Traceback" not in err and needle in err, (needle, err)
        assert out.strip() == "", "an error must never print a verdict"
        if needle == "the_floor":
            assert "the_selu" in err


def test_vnncomp_scripts_write_error_for_bad_input(tmp_path):
    import os
    root = Path(__file__).resolve().parents[2] / "vnncomp"
    env = {**os.environ, "VERIFIER_SOCKET": str(tmp_path / "none.sock")}
    bad = _bad_files(tmp_path)
    for args, _ in (bad[0], bad[2]):   # a bad model, a bad spec: each a cold process of seconds
        res = tmp_path / "out.txt"
        subprocess.run(["bash", str(root / "run_instance.sh"), "v1", "x", *args, str(res), "10"],
                       check=True, timeout=120, env=env)
        assert res.read_text().splitlines()[0] == "error"


def test_vnncomp_scripts_write_results_file(tmp_path):
    import os
    root = Path(__file__).resolve().parents[2] / "vnncomp"
    sock = str(tmp_path / "v.sock")
    env = {**os.environ, "VERIFIER_SOCKET": sock}
    try:
        subprocess.run(["bash", str(root / "prepare_instance.sh"), "v1", "test", str(DATA / "onnx/test_sat.onnx"),
                        str(DATA / "vnnlib/test_prop.vnnlib")], check=True, timeout=120, env=env)
        assert Path(sock).exists()  # the warm process is up
        for onnx_rel, vnnlib_rel, expected in _expected():
            res = tmp_path / "out.txt"
            subprocess.run(["bash", str(root / "run_instance.sh"), "v1", "test", str(DATA / onnx_rel),
                            str(DATA / vnnlib_rel), str(res), "30"], check=True, timeout=120, env=env)
            lines = res.read_text().splitlines()
            assert lines[0] == expected
            if expected == "sat":
                assert lines[1].startswith("((X_0 ")
                n_x = sum(1 for l in lines if "(X_" in l)
                n_y = sum(1 for l in lines if "(Y_" in l)
                assert (n_x, n_y) == (5, 5)
    finally:
        subprocess.run([sys.executable, "-m", "verifier.cli.vnncomp_server", "stop", sock], timeout=30)


def test_run_instance_without_server_runs_in_process(tmp_path):
    import os
    root = Path(__file__).resolve().parents[2] / "vnncomp"
    env = {**os.environ, "VERIFIER_SOCKET": str(tmp_path / "none.sock")}
    res = tmp_path / "out.txt"
    subprocess.run(["bash", str(root / "run_instance.sh"), "v1", "test", str(DATA / "onnx/test_unsat.onnx"),
                    str(DATA / "vnnlib/test_prop.vnnlib"), str(res), "30"], check=True, timeout=120, env=env)
    assert res.read_text().splitlines()[0] == "unsat"
