"""The weight-perturbation command line: ``bounds --weights``, ``flatness``, ``sensitivity`` and
``delta``. Numbers are checked against onnxruntime on models sampled inside the set."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cli_support import make_mlp, onnx_forward


@pytest.fixture(scope="module")
def wdata(tmp_path_factory, ):
    d = tmp_path_factory.mktemp("wdata")
    model = make_mlp(d / "mlp.onnx")
    x = np.random.default_rng(3).uniform(0, 1, (12, 1, 2, 2)).astype(np.float32)
    y = onnx_forward(model, x).argmax(1).astype(np.int64)
    np.savez(d / "data.npz", x=x, y=y)
    # a second model: every parameter nudged (a "fine-tuned" copy)
    m = onnx.load(str(model))
    rng = np.random.default_rng(4)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a + 0.02 * rng.standard_normal(a.shape)).astype(np.float32), t.name))
    onnx.save(m, str(d / "other.onnx"))
    return {"dir": d, "model": str(model), "other": str(d / "other.onnx"), "x": x, "y": y,
            "data": str(d / "data.npz")}


def _with_weights(path, out, W1=None):
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name == "W1" and W1 is not None:
            t.CopyFrom(numpy_helper.from_array(W1.astype(np.float32), "W1"))
    onnx.save(m, str(out))
    return out


def test_bounds_with_weights_contain_sampled_models(cli, wdata, tmp_path):
    np.save(tmp_path / "x.npy", wdata["x"][:3])
    r = cli("bounds", wdata["model"], "--input", str(tmp_path / "x.npy"), "--weights", "W1",
            "--weight-eps", "0.05", "--json")
    assert r.code == 0, r.err
    lo, up = np.array(r.json["lower"]), np.array(r.json["upper"])
    W1 = numpy_helper.to_array([t for t in onnx.load(wdata["model"]).graph.initializer
                                if t.name == "W1"][0])
    rng = np.random.default_rng(0)
    for i in range(10):
        d = rng.uniform(-0.05, 0.05, W1.shape) if i % 2 else 0.05 * np.sign(rng.standard_normal(W1.shape))
        p = _with_weights(wdata["model"], tmp_path / f"s{i}.onnx", W1 + d * (1 - 1e-6))
        out = onnx_forward(p, wdata["x"][:3])
        assert (out >= lo - 1e-5).all() and (out <= up + 1e-5).all()
    # the fixed input is the unperturbed model's output at eps 0
    r0 = cli("bounds", wdata["model"], "--input", str(tmp_path / "x.npy"), "--weights", "*",
             "--weight-eps", "0", "--json")
    ref = onnx_forward(wdata["model"], wdata["x"][:3])
    assert np.allclose(r0.json["lower"], ref, atol=1e-5) and np.allclose(r0.json["upper"], ref, atol=1e-5)


def test_bounds_with_weights_and_input_ball_and_table(cli, wdata, tmp_path):
    np.save(tmp_path / "x.npy", wdata["x"][:1])
    r = cli("bounds", wdata["model"], "--input", str(tmp_path / "x.npy"), "--eps", "0.01",
            "--weights", "W*", "--weights", "b2", "--weight-eps", "0.1", "--weight-norm", "2",
            "--label", "0", "--method", "crown-ibp")
    assert r.code == 0, r.err
    assert "parameters: L2 (Frobenius, per tensor) eps=0.1 on W*, b2" in r.out


@pytest.mark.parametrize("args, msg", [
    (["--weights", "W1"], "--weights needs --weight-eps"),
    (["--weight-eps", "0.1"], "--weight-eps needs --weights"),
    (["--weights", "nope*", "--weight-eps", "0.1"], "no parameter matches 'nope*'"),
    (["--weights", "W1", "--weight-eps", "0.1", "--relative", "--weight-norm", "2"], "--relative"),
    (["--weights", "W1", "--weight-eps", "-1"], "must be >= 0"),
])
def test_bad_weight_flags_are_one_line_errors(cli, wdata, tmp_path, args, msg):
    np.save(tmp_path / "x.npy", wdata["x"][:1])
    r = cli("bounds", wdata["model"], "--input", str(tmp_path / "x.npy"), *args)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("error:") and msg in r.err and "Traceback" not in r.err


def test_input_without_eps_needs_weights(cli, wdata, tmp_path):
    np.save(tmp_path / "x.npy", wdata["x"][:1])
    r = cli("bounds", wdata["model"], "--input", str(tmp_path / "x.npy"))
    assert r.code == 2 and "--input needs --eps" in r.err


def test_flatness_sweep_json_csv_png(cli, wdata, tmp_path):
    r = cli("flatness", wdata["model"], "--data", wdata["data"], "--weights", "*",
            "--weight-eps", "0.01", "0.03", "--json", "--csv", str(tmp_path / "c.csv"),
            "--plot", str(tmp_path / "c.png"), "--attack-steps", "3")
    assert r.code == 0, r.err
    rows = r.json["radii"]
    assert [x["label"] for x in rows] == ["0.01", "0.03"]
    for x in rows:
        assert x["attack_loss"] <= x["certified_loss"] + 1e-6
        assert x["clean_loss"] <= x["attack_loss"] + 1e-9
    assert rows[0]["certified_loss"] < rows[1]["certified_loss"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 3


def test_sensitivity_table(cli, wdata, tmp_path):
    r = cli("sensitivity", wdata["model"], "--data", wdata["data"], "--weight-eps", "0.05",
            "--relative", "--params", "both", "--attack-steps", "3", "--plot", str(tmp_path / "s.png"))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[0] == "module"
    mods = [ln.split()[0] for ln in lines[1:] if ln and not ln.startswith("wrote")]
    assert len(mods) == 2, r.out  # the two Gemm layers, each with its weight and bias


def test_delta_other_model_segment_holds_at_both_ends(cli, wdata):
    r = cli("delta", wdata["model"], "--other", wdata["other"], "--data", wdata["data"],
            "--json", "--attack-steps", "3")
    assert r.code == 0, r.err
    s = r.json["sets"][0]
    # both endpoints are models of the segment: their mean losses lie below the certificate
    x, y = wdata["x"], wdata["y"]
    for path in (wdata["model"], wdata["other"]):
        out = onnx_forward(path, x).astype(np.float64)
        ce = np.log(np.exp(out - out.max(1, keepdims=True)).sum(1)) + out.max(1) - out[np.arange(len(y)), y]
        assert ce.mean() <= s["certified_loss"] + 1e-6


@pytest.mark.parametrize("args, msg", [
    ([], "exactly one of --other, --delta, --quantize"),
    (["--quantize", "8", "--ball"], "--ball goes with --other"),
    (["--quantize", "8", "--t", "0", "1"], "--t sets the range"),
])
def test_delta_bad_flags(cli, wdata, args, msg):
    r = cli("delta", wdata["model"], "--data", wdata["data"], *args)
    assert r.code == 2 and msg in r.err


def test_delta_quantize_reports_a_fraction(cli, wdata):
    r = cli("delta", wdata["model"], "--data", wdata["data"], "--quantize", "8", "--attack-steps", "2")
    assert r.code == 0, r.err
    assert "prediction certified unchanged on" in r.out and "8-bit" in r.out
    rj = cli("delta", wdata["model"], "--data", wdata["data"], "--quantize", "8", "--any-rounding",
             "--json", "--attack-steps", "2")
    assert json.loads(rj.out)["sets"][0]["label"] == "any 8-bit"


def test_flatness_missing_data_file(cli, wdata):
    r = cli("flatness", wdata["model"], "--data", "absent.npz", "--weights", "*", "--weight-eps", "0.1")
    assert r.code == 2 and "absent.npz: no such file" in r.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import sys

    import torch
    from cli_support import REPO
    sys.path.insert(0, str(REPO))
    from models.architectures import build
    d = tmp_path_factory.mktemp("ckpt")
    m, shape = build("mlp_tanh", seed=0)
    torch.save(m.state_dict(), d / "m.pt")
    x = np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(d / "data.npz", x=x, y=y)
    bad = {k: v.clone() for k, v in m.state_dict().items()}
    bad["1.weight"][0, 0] = float("nan")
    torch.save(bad, d / "nan.pt")
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"w": [1, 2]}, d / "notensors.pt")
    return d


def test_pytorch_checkpoint_with_zoo_arch(cli, ckpt):
    r = cli("flatness", str(ckpt / "m.pt"), "--arch", "mlp_tanh", "--data", str(ckpt / "data.npz"),
            "--weights", "*.weight", "--weight-eps", "0.01", "--json", "--attack-steps", "3")
    assert r.code == 0, r.err
    row = r.json["radii"][0]
    assert row["clean_accuracy"] == 1.0  # labels are the model's predictions
    assert row["attack_loss"] <= row["certified_loss"]


@pytest.mark.parametrize("file, extra, msg", [
    ("m.pt", [], "is a PyTorch checkpoint: add --arch NAME"),
    ("m.pt", ["--arch", "small_cnn"], "does not fit --arch small_cnn"),
    ("m.pt", ["--arch", "nope"], "not a zoo model"),
    ("m.pt", ["--arch", "mlp_tanh", "--arch-kwargs", "{bad json"], "not a valid JSON"),
    ("nan.pt", ["--arch", "mlp_tanh"], "parameter 1.weight holds 1 NaN"),
    ("garbage.pt", ["--arch", "mlp_tanh"], "not a readable PyTorch state dict"),
    ("notensors.pt", ["--arch", "mlp_tanh"], "expected a state dict"),
])
def test_bad_checkpoints_are_clear_errors(cli, ckpt, file, extra, msg):
    r = cli("sensitivity", str(ckpt / file), *extra, "--data", str(ckpt / "data.npz"),
            "--weight-eps", "0.01")
    assert r.code == 2 and msg in r.err and "Traceback" not in r.err, r.err


def test_flatness_data_given_as_a_npy_says_it_needs_an_npz(cli, wdata, tmp_path):
    np.save(tmp_path / "x.npy", wdata["x"])
    r = cli("flatness", wdata["model"], "--data", tmp_path / "x.npy", "--weights", "*",
            "--weight-eps", "0.1")
    assert r.code == 2 and r.out == ""
    assert "x.npy: a single .npy array" in r.err and "np.savez" in r.err
    assert "TypeError" not in r.err and "context manager" not in r.err


def test_delta_task_vector_given_as_a_npy_says_it_needs_an_npz(cli, wdata, tmp_path):
    np.save(tmp_path / "d.npy", np.zeros(3, np.float32))
    r = cli("delta", wdata["model"], "--data", wdata["data"], "--delta", tmp_path / "d.npy")
    assert r.code == 2 and "d.npy: a single .npy array" in r.err and "TypeError" not in r.err
