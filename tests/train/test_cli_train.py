"""``verifier train`` end to end on scikit-learn's digits: the output folder's files, the report's
fields, the ONNX export (read back through our own ONNX path and onnxruntime), --resume of a
finished run, and one-line usage errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from verifier.cli import main

ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--model-kwargs",
        '{"in_dim": 64, "hidden": [32]}', "--eps", "0.05", "--epochs", "4", "--ramp-epochs", "2",
        "--warmup-epochs", "1", "--batch-size", "64", "--lr", "0.002", "--test-subset", "60",
        "--no-progress"]


def test_train_command_writes_model_onnx_and_report(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_methods: [ibp, crown, alpha-crown]\neval_eps: [0.01, 0.05]\n"
                   "eval_pgd_steps: 5\nepochs: 99\n")   # --epochs overrides the file
    out = tmp_path / "run"
    assert main(ARGS + ["--config", str(cfg), "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for f in ("checkpoint.pt", "model.pt", "model.onnx", "report.json", "report.png", "config.json"):
        assert (out / f).is_file(), f
    assert report["n"] == 60 and report["epochs"] == 4
    cert = report["certified_acc"]
    assert list(cert) == ["ibp", "ibp+crown", "ibp+crown+alpha-crown"]
    assert cert["ibp"] <= cert["ibp+crown"] <= cert["ibp+crown+alpha-crown"] <= report["pgd_acc"]
    assert report["pgd_acc"] <= report["clean_acc"] and report["violations"] == 0
    assert report["certified_vs_eps"]["eps"] == [0.01, 0.05]
    assert len(json.loads((out / "report.json").read_text())["history"]) == 4
    # the ONNX export computes what the state dict computes
    import onnxruntime as ort
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from models import mlp
    from verifier import BoundedModel
    net = mlp(64, [32], 10)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = torch.rand(5, 1, 8, 8)
    ref = net(x).detach().numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"))
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(BoundedModel.from_onnx(out / "model.onnx")(x).numpy(), ref,
                               rtol=1e-5, atol=1e-5)
    # a finished run resumed: no more training, the same report
    assert main(ARGS + ["--config", str(cfg), "--output", str(out), "--json", "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["certified_acc"] == cert and again["clean_acc"] == report["clean_acc"]


@pytest.mark.parametrize("extra, match", [
    (["--model-kwargs", "{bad"], "--model-kwargs is not valid JSON"),
    (["--method", "pgd"], "invalid choice"),
    (["--eps", "2"], "'eps': 2.0 is outside"),
    (["--model", "no_such_model"], "'model': model no_such_model: not a zoo model"),
    (["--model-kwargs", '{"width": 3}'], "'model_kwargs'"),
    (["--dataset", "npz", "--train-path", "a.npz", "--test-path", "b.npz"], "a.npz: no such file"),
    (["--dataset", "idx", "--train-path", "/nonexistent/folder"], "no such dataset folder"),
    (["--config", "/nonexistent.yaml"], "no such config file"),
])
def test_train_command_errors_are_one_line(tmp_path, capsys, extra, match):
    args = [a for a in ARGS if a not in ("--model-kwargs", '{"in_dim": 64, "hidden": [32]}')] \
        if "--model-kwargs" in extra else ARGS
    assert main(args + extra + ["--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err
