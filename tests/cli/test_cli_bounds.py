"""`verifier bounds`: results, flag combinations and output formats.

Soundness is checked against onnxruntime (an independent forward pass) at sampled points of the
input set, and results are compared with the Python API and with the reference bounds shipped
for the example model."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from cli_support import EXAMPLES, REPO, onnx_forward

REFERENCE = REPO.parent / "shared" / "benchmarks" / "classifiers" / "reference.json"
EX_MODEL = EXAMPLES / "lirpa_mnist_fc_3layer.onnx"


def _samples_in_ball(x, eps, norm, clip, n=200, seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(n):
        d = rng.standard_normal(x.shape)
        if norm == "inf":
            d = rng.uniform(-1, 1, x.shape) * eps
        else:
            p = float(norm)
            flat = d.reshape(len(x), -1)
            d = (flat / np.linalg.norm(flat, ord=p, axis=1, keepdims=True)).reshape(x.shape)
            d *= eps * rng.uniform(0, 1, (len(x),) + (1,) * (x.ndim - 1))
        pt = x + d
        if clip is not None:
            pt = np.clip(pt, *clip)
        pts.append(pt.astype(np.float32))
    return pts


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_ball_bounds_contain_onnxruntime_outputs(cli, tiny, method, norm, clip):
    args = ["bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.3, "--norm", norm,
            "--method", method, "--json"]
    if clip:
        args += ["--clip", *clip]
    r = cli(*args)
    assert r.code == 0, r.err
    lo, up = np.array(r.json["lower"]), np.array(r.json["upper"])
    assert lo.shape == up.shape == (4, 3) and r.json["verified"] is None
    for pt in _samples_in_ball(tiny["x"], 0.3, norm, clip):
        f = onnx_forward(tiny["model"], pt)
        assert (f >= lo - 1e-4).all() and (f <= up + 1e-4).all()


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_margins_with_label_file_are_sound_and_match_api(cli, tiny, method):
    r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.2, "--label", tiny["y4"],
            "--method", method, "--json")
    assert r.code == 0, r.err
    lo, up = np.array(r.json["lower"]), np.array(r.json["upper"])
    assert lo.shape == (4, 2)
    for pt in _samples_in_ball(tiny["x"], 0.2, "inf", None):
        f = onnx_forward(tiny["model"], pt)
        for i, y in enumerate(tiny["y"]):
            m = np.array([f[i, y] - f[i, j] for j in range(3) if j != y])
            assert (m >= lo[i] - 1e-4).all() and (m <= up[i] + 1e-4).all()
    assert r.json["verified"] == [bool(v) for v in (lo > 0).all(1)]

    import torch
    from verifier import BoundedModel, LpBall, margin_spec
    bm = BoundedModel.from_onnx(tiny["model"])
    res = bm.bounds(LpBall(torch.tensor(tiny["x"]), 0.2), method=method,
                    spec=margin_spec(tiny["y"], 3))
    np.testing.assert_allclose(lo, res.lower.numpy(), atol=1e-6)
    np.testing.assert_allclose(up, res.upper.numpy(), atol=1e-6)


def test_ibp_margin_at_least_as_tight_as_difference_of_output_bounds(cli, tiny):
    out = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.2, "--method", "ibp",
              "--json").json
    mar = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.2, "--method", "ibp",
              "--label", tiny["y4"], "--json").json
    for i, y in enumerate(tiny["y"]):
        js = [j for j in range(3) if j != y]      # ascending j, y skipped
        for r, j in enumerate(js):
            assert mar["lower"][i][r] >= out["lower"][i][y] - out["upper"][i][j] - 1e-5
            assert mar["upper"][i][r] <= out["upper"][i][y] - out["lower"][i][j] + 1e-5


def test_eps_zero_gives_the_forward_pass_and_verifies_the_prediction(cli, tiny):
    r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0, "--json")
    f = onnx_forward(tiny["model"], tiny["x"])
    np.testing.assert_allclose(r.json["lower"], f, atol=1e-5)
    np.testing.assert_allclose(r.json["upper"], f, atol=1e-5)
    r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0, "--label", tiny["y4"],
            "--json")
    assert r.json["verified"] == [True] * 4
    wrong = (tiny["y"] + 1) % 3
    np.save(tiny["dir"] / "wrong.npy", wrong)
    r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0, "--label",
            tiny["dir"] / "wrong.npy", "--json")
    assert r.json["verified"] == [False] * 4


def test_json_schema_is_exact(cli, tiny):
    for extra, n_rows in (([], 3), (["--label", 0], 2)):
        r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.1, "--json", *extra)
        assert r.code == 0 and r.err == ""
        assert r.out.endswith("\n") and r.out.count("\n") == 1      # one JSON line, nothing else
        d = json.loads(r.out)
        assert list(d) == ["lower", "upper", "verified", "proved_by", "time_s"]
        for k in ("lower", "upper"):
            assert len(d[k]) == 4 and all(len(row) == n_rows for row in d[k])
            assert all(isinstance(v, float) for row in d[k] for v in row)
        if extra:
            assert isinstance(d["verified"], list) and len(d["verified"]) == 4
            assert all(isinstance(v, bool) for v in d["verified"])
        else:
            assert d["verified"] is None
        assert isinstance(d["time_s"], float) and 0 <= d["time_s"] < 30


def test_label_int_is_broadcast_like_a_file_of_repeated_labels(cli, tiny):
    np.save(tiny["dir"] / "ones.npy", np.ones(4, np.int32))
    np.save(tiny["dir"] / "one.npy", np.array([[1]]))           # one label, any shape
    np.save(tiny["dir"] / "onesf.npy", np.ones(4))               # integral floats are accepted
    base = ["bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.1, "--json", "--label"]
    a = cli(*base, 1).json
    for f in ("ones.npy", "one.npy", "onesf.npy"):
        b = cli(*base, tiny["dir"] / f).json
        assert a["lower"] == b["lower"] and a["upper"] == b["upper"]


def test_input_forms_single_batched_and_flat_agree(cli, tiny):
    x0 = tiny["x"][0]
    forms = {"x_chw": x0, "x_nchw": x0[None], "x_flat": x0.reshape(-1)}
    results = []
    for name, arr in forms.items():
        np.save(tiny["dir"] / f"{name}.npy", arr)
        r = cli("bounds", tiny["model"], "--input", tiny["dir"] / f"{name}.npy", "--eps", 0.1,
                "--json")
        assert r.code == 0, r.err
        results.append(r.json["lower"])
    batch = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.1, "--json").json
    assert results[0] == results[1] == results[2]
    np.testing.assert_allclose(results[0][0], batch["lower"][0], atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_box_equals_linf_ball_and_clip(cli, tiny, method):
    x, eps = tiny["x"], 0.15
    np.save(tiny["dir"] / "xl.npy", x - eps)
    np.save(tiny["dir"] / "xu.npy", x + eps)
    np.save(tiny["dir"] / "xlc.npy", np.clip(x - eps, 0.1, 0.9))
    np.save(tiny["dir"] / "xuc.npy", np.clip(x + eps, 0.1, 0.9))
    common = ["--method", method, "--label", tiny["y4"], "--json"]
    ball = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", eps, *common).json
    box = cli("bounds", tiny["model"], "--lower", tiny["dir"] / "xl.npy", "--upper",
              tiny["dir"] / "xu.npy", *common).json
    np.testing.assert_allclose(ball["lower"], box["lower"], atol=1e-5)
    np.testing.assert_allclose(ball["upper"], box["upper"], atol=1e-5)
    ballc = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", eps, "--clip", 0.1, 0.9,
                *common).json
    boxc = cli("bounds", tiny["model"], "--lower", tiny["dir"] / "xlc.npy", "--upper",
               tiny["dir"] / "xuc.npy", *common).json
    np.testing.assert_allclose(ballc["lower"], boxc["lower"], atol=1e-5)
    assert (np.array(ballc["lower"]) >= np.array(ball["lower"]) - 1e-5).all()


def test_float64_agrees_with_float32(cli, tiny):
    args = ["bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.1, "--json"]
    a = cli(*args).json
    b = cli(*args, "--dtype", "float64").json
    np.testing.assert_allclose(a["lower"], b["lower"], atol=1e-4)
    np.testing.assert_allclose(a["upper"], b["upper"], atol=1e-4)


def test_threads_flag_sets_torch_threads_default_one(cli, tiny, monkeypatch):
    import torch
    calls, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    args = ["bounds", tiny["model"], "--input", tiny["x1"], "--eps", 0.1, "--json"]
    assert cli(*args, "--threads", 3).code == 0 and calls[0] == 3
    calls.clear()
    assert cli(*args).code == 0 and calls[0] == 1


def test_text_output_is_a_table_with_verdicts_and_time(cli, tiny):
    r = cli("bounds", tiny["model"], "--input", tiny["x4"], "--eps", 0.0, "--label", tiny["y4"])
    assert r.code == 0 and r.err == ""
    for i, y in enumerate(tiny["y"]):
        assert f"sample {i} (label {y}): margins f_{y} - f_j" in r.out
    assert r.out.count("verified: yes") == 4
    assert "verified: 4 of 4 samples" in r.out
    assert re.search(r"time: \d+\.\d+ s", r.out)
    r = cli("bounds", tiny["model"], "--input", tiny["x1"], "--eps", 0.1, "--norm", "2")
    assert "sample 0: outputs" in r.out and "verified" not in r.out
    rows = [ln.split() for ln in r.out.splitlines() if re.match(r"^\s+\d+\s", ln)]
    assert [int(row[0]) for row in rows] == [0, 1, 2]
    assert all(float(row[1]) <= float(row[2]) for row in rows)
    assert "L2 ball eps=0.1" in r.out


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference bounds not present")
def test_readme_example_matches_reference_crown_margins(cli):
    """The README's first command: CROWN margins of MNIST sample 0 at eps 0.03 (no clipping,
    mean 0 / std 1: the manifest says so) agree with the reference and are no looser."""
    ref = json.loads(REFERENCE.read_text())["models"]["lirpa_mnist_fc_3layer"]
    man = ref["manifest"]
    assert man["eps"] == 0.03 and man["clip_to_0_1"] is False
    assert man["mean"] == [0.0] and man["std"] == [1.0]
    run = next(r for r in ref["runs"] if r["idx"] == 0 and r["method"] == "CROWN")
    r = cli("bounds", EX_MODEL, "--input", EXAMPLES / "mnist_sample.npy", "--eps", 0.03,
            "--label", EXAMPLES / "mnist_label.npy", "--method", "crown", "--json")
    assert r.code == 0, r.err
    lo = np.array(r.json["lower"][0])
    np.testing.assert_allclose(lo, run["margin"]["lower"], atol=1e-4)
    assert (lo >= np.array(run["margin"]["lower"]) - 1e-4).all()
    assert r.json["verified"] == [run["verified"]]


def test_example_batch_of_five_with_label_file(cli):
    r = cli("bounds", EX_MODEL, "--input", EXAMPLES / "mnist_5.npy", "--eps", 0.01,
            "--label", EXAMPLES / "mnist_5_labels.npy", "--json")
    assert r.code == 0, r.err
    assert np.array(r.json["lower"]).shape == (5, 9) and len(r.json["verified"]) == 5
    assert all(math.isfinite(v) for row in r.json["lower"] for v in row)


def test_each_verified_sample_says_which_bound_proved_it(cli, tmp_path):
    """The IBP-trained cert_mnist_03 at eps 0.3 on MNIST test digits 0, 8 and 59: CROWN's own
    bound proves digit 0 only, IBP's proves all three (checked with --method ibp), and CROWN's
    final bounds are intersected with IBP's, so all three are verified, 8 and 59 "(ibp)"."""
    d = np.load(EXAMPLES / "mnist_test100.npz")
    np.save(tmp_path / "x.npy", d["x"][[0, 8, 59]])
    np.save(tmp_path / "y.npy", d["y"][[0, 8, 59]])
    args = ("bounds", REPO / "models" / "cert_mnist_03.onnx", "--input", tmp_path / "x.npy",
            "--eps", 0.3, "--clip", 0, 1, "--label", tmp_path / "y.npy")
    ibp = cli(*args, "--method", "ibp", "--json")
    assert ibp.code == 0, ibp.err
    assert ibp.json["verified"] == [True] * 3 and ibp.json["proved_by"] == ["ibp"] * 3
    r = cli(*args, "--method", "crown", "--json")
    assert r.code == 0, r.err
    assert r.json["verified"] == [True] * 3
    assert r.json["proved_by"] == ["crown", "ibp", "ibp"]
    assert (np.array(r.json["lower"]) >= np.array(ibp.json["lower"]) - 1e-4).all()
    text = cli(*args, "--method", "crown")
    assert text.code == 0, text.err
    verdicts = re.findall(r"verified: (yes \(\S+\)|no)", text.out)
    assert verdicts == ["yes (crown)", "yes (ibp)", "yes (ibp)"]
    assert "verified: 3 of 3 samples" in text.out
    unlabelled = cli(*args[:-2], "--json")
    assert unlabelled.json["proved_by"] is None and unlabelled.json["verified"] is None
