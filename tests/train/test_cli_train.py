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
    (["--augment-shift", "-1"], "--augment-shift"),
    (["--model", "cnn_cert", "--model-kwargs", '{"input_size": 8, "extra_convs": -1}'],
     "'model_kwargs': extra_convs=-1 must be 0 or more"),
    (["--augment-shift", "8"], "'augment_shift': 8 pixels needs images"),
])
def test_train_command_errors_are_one_line(tmp_path, capsys, extra, match):
    args = [a for a in ARGS if a not in ("--model-kwargs", '{"in_dim": 64, "hidden": [32]}')] \
        if "--model-kwargs" in extra else ARGS
    assert main(args + extra + ["--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err


# -- one source of defaults -----------------------------------------------------------------------

def test_flags_not_given_leave_the_python_api_defaults():
    """``verifier train`` with no settings builds exactly ``TrainConfig()``, and its help states
    TrainConfig's defaults (batch size 64, lr 2e-3: the ones the README's digits run needs)."""
    from verifier.cli.main import build_parser
    from verifier.cli.train import _FLAGS
    from verifier.train import TrainConfig, load_config
    a = build_parser().parse_args(["train"])
    assert load_config(None, {k: getattr(a, k) for k in _FLAGS}) == TrainConfig()
    assert (TrainConfig().batch_size, TrainConfig().lr) == (64, 2e-3)
    a = build_parser().parse_args(["train", "--augment-shift", "2"])
    assert load_config(None, {k: getattr(a, k) for k in _FLAGS}).augment_shift == 2


def test_help_states_the_config_defaults(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--batch-size N", "64"), ("--lr LR", "0.002"), ("--epochs N", "20"),
                          ("--ramp-epochs N", "10"), ("--eps EPS", "0.1")]:
        i = text.index(flag + " ")
        assert f"(default {default})" in text[i:i + 120], (flag, text[i:i + 120])


# -- the report's eps grid ------------------------------------------------------------------------

QUICK = ["train", "--dataset", "digits", "--model", "mlp", "--model-kwargs",
         '{"in_dim": 64, "hidden": [16]}', "--epochs", "2", "--warmup-epochs", "1",
         "--ramp-epochs", "1", "--test-subset", "20", "--no-progress", "--json"]


@pytest.mark.parametrize("flags, grid", [
    ([], [0.025, 0.05, 0.1, 0.15, 0.2]),              # --eps 0.1 times 0.25, 0.5, 1, 1.5, 2
    (["--eval-eps", "0.02", "0.3"], [0.02, 0.3]),
    (["--eval-eps"], []),                             # no grid
])
def test_eval_eps_flag_sets_the_grid_of_the_report(tmp_path, capsys, flags, grid):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_methods: [ibp]\neval_pgd_steps: 2\neps: 0.1\n")
    assert main(QUICK + ["--config", str(cfg), "--output", str(tmp_path / "o")] + flags) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["certified_vs_eps"]["eps"] == pytest.approx(grid)
    assert len(rep["certified_vs_eps"]["ibp"]) == len(grid)


def test_eval_eps_values_are_checked(tmp_path, capsys):
    assert main(QUICK + ["--eval-eps", "0.1", "2", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'eval_eps'" in err and "[0, 1]" in err
    assert not (tmp_path / "o").exists()
    assert main(["train", "--lipschitz", "svd_clip", "--eval-eps", "0.1"]) == 2
    assert "--eval-eps" in capsys.readouterr().err


# -- a run that learned nothing says so -----------------------------------------------------------

@pytest.mark.parametrize("acc, chance, near", [
    (0.21, 0.10, True),     # the README command with the old defaults: kappa 0.12
    (0.27, 0.10, True),     # kappa 0.189
    (0.29, 0.10, False),    # kappa 0.211
    (0.83, 0.10, False),
    (0.55, 0.50, True),     # two classes: kappa 0.1
    (0.65, 0.50, False),    # kappa 0.3
    (0.90, 0.90, True),     # one class makes 90% of the test set: always answering it
])
def test_near_chance_is_kappa_under_a_fifth(acc, chance, near):
    from verifier.train.evaluation import near_chance
    assert near_chance(acc, chance) is near


def test_chance_accuracy_is_the_largest_class_share():
    from verifier.train.evaluation import chance_accuracy
    assert chance_accuracy(torch.tensor([0, 1, 1, 2, 1, 0, 3, 1]), 5) == 0.5
    assert chance_accuracy(torch.arange(10), 10) == 0.1


def test_a_run_near_chance_ends_with_a_warning(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--model", "mlp", "--model-kwargs",
            '{"in_dim": 64, "hidden": [16]}', "--method", "natural", "--epochs", "1",
            "--warmup-epochs", "0", "--ramp-epochs", "0", "--lr", "1e-7", "--test-subset", "50",
            "--eval-eps", "--no-progress", "--output", str(tmp_path / "o")]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_methods: [ibp]\neval_pgd_steps: 2\n")
    assert main(args + ["--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "clean accuracy" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("warning: clean accuracy") and "near chance" in last
    assert "--epochs" in last and "--lr" in last
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["clean_acc"] < 0.28 and rep["warnings"] and "near chance" in rep["warnings"][0]


# -- config errors leave nothing behind -----------------------------------------------------------

@pytest.mark.parametrize("extra, yaml, match", [
    (["--model", "no_such_model"], None, "not a zoo model"),
    (["--model-kwargs", '{"in_dim": 64, "hidden": [8], "out": 3}'], None, "has 10 classes"),
    (["--model-kwargs", '{"width": 3}'], None, "'model_kwargs'"),
    ([], "lr: 0.001\nbatch_sise: 32\n", "unknown config key 'batch_sise'"),
    ([], "reg_weight: -1\n", "'reg_weight': must be >= 0"),
    ([], "epochs: [1\n", "invalid YAML"),
    ([], "toml", "invalid TOML"),
])
def test_config_errors_leave_no_output_folder(tmp_path, capsys, extra, yaml, match):
    out = tmp_path / "runs" / "o"
    args = [a for a in ARGS if a not in ("--model-kwargs", '{"in_dim": 64, "hidden": [32]}')] \
        if "--model-kwargs" in extra else ARGS
    if yaml == "toml":
        (tmp_path / "c.toml").write_text("lr = = 1\n")
        extra = extra + ["--config", str(tmp_path / "c.toml")]
    elif yaml is not None:
        (tmp_path / "c.yaml").write_text(yaml)
        extra = extra + ["--config", str(tmp_path / "c.yaml")]
    assert main(args + extra + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err
    assert not out.exists() and not out.parent.exists()


def test_a_failed_first_epoch_removes_the_folder_it_made(tmp_path):
    from verifier.train import from_dict, load_digits_split
    from verifier.train.trainer import train

    def stop(epoch, step):
        raise KeyboardInterrupt

    out = tmp_path / "o"
    cfg = from_dict({"dataset": "digits", "model": "mlp", "epochs": 1, "ramp_epochs": 0,
                     "model_kwargs": {"in_dim": 64, "hidden": [8]}, "output": str(out)})
    data = (load_digits_split("train").subset(64), load_digits_split("test").subset(8))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, data=data, callback=stop)
    assert not out.exists()
    # a folder that was there already stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, data=data, callback=stop)
    assert (out / "notes.txt").read_text() == "mine"
