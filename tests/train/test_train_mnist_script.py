"""benchmarks/train_mnist.py: the configs it builds (several methods, loss fusion) and the table
it prints from finished runs."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("train_mnist", ROOT / "benchmarks" / "train_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(runs=["mnist-0.3"], seed=0, threads=1, epochs=None, width=32, fc=256, method=None,
                loss_fusion=False, alpha=None, sabr_lambda=None, pgd_steps=None, train_eps=None,
                augment_shift=None, lr=None, batch_size=None, ema_decay=None,
                eval_methods=None,
                eval_budget=None, bab_timeout=None, pgd_restarts=None, extra_convs=0, output=None,
                data_dir="/data")
    base.update(kw)
    return argparse.Namespace(**base)


def test_one_output_folder_per_method_and_loss_fusion_set():
    tm = _script()
    a = _args(method=["ibp", "sabr"], output="out")
    outs = [tm.config_for("mnist-0.3", a, m)["output"] for m in a.method]
    assert outs == ["out/mnist-0.3-ibp", "out/mnist-0.3-sabr"]
    d = tm.config_for("mnist-0.3", _args(method=["crown-ibp"], loss_fusion=True), "crown-ibp")
    assert d["method"] == "crown-ibp" and d["loss_fusion"] is True
    assert d["output"] == "runs/mnist-0.3-crown-ibp-lf"
    one = tm.config_for("mnist-0.3", _args(method=["sabr"], output="here"), "sabr")
    assert one["output"] == "here"                      # a single run keeps the folder it was given
    assert d["train_eps"] == 0.4                        # the run's own ...
    assert tm.config_for("mnist-0.3", _args(train_eps=0.33), None)["train_eps"] == 0.33  # ... or given
    assert "eval_bab_timeout_s" not in d                  # bab's per-image limit: the config's ...
    assert tm.config_for("mnist-0.3", _args(bab_timeout=12.0), None)["eval_bab_timeout_s"] == 12.0
    assert tm.config_for("mnist-0.3", _args(), None)["eval_pgd_restarts"] == 10  # PGD starts ...
    assert tm.config_for("mnist-0.3", _args(pgd_restarts=3), None)["eval_pgd_restarts"] == 3
    assert "extra_convs" not in d["model_kwargs"]         # the two-convolution cnn_cert ...
    deep = tm.config_for("mnist-0.3", _args(extra_convs=2, width=16), None)["model_kwargs"]
    assert deep == {"width": 16, "fc": 256, "bn": True, "extra_convs": 2}   # ... or a deeper one
    assert "augment_shift" not in d                       # no shifts unless asked for
    assert tm.config_for("mnist-0.3", _args(augment_shift=2), None)["augment_shift"] == 2
    assert (d["lr"], d["batch_size"]) == (5e-4, 100)       # the recipe's optimizer ...
    fast = tm.config_for("mnist-0.3", _args(lr=1e-3, batch_size=50), None)
    assert (fast["lr"], fast["batch_size"]) == (1e-3, 50)  # ... or another
    assert "ema_decay" not in d                             # the last weights unless asked for
    assert tm.config_for("mnist-0.3", _args(ema_decay=0.999), None)["ema_decay"] == 0.999
    with pytest.raises(SystemExit, match="natural baseline takes no --method"):
        tm.config_for("mnist-natural", _args(runs=["mnist-natural"]), "sabr")


def test_table_of_finished_runs(tmp_path):
    tm = _script()
    runs = []
    for i, (method, cert, ds) in enumerate([
            ("ibp", {"ibp": 0.859, "ibp+crown": 0.861}, "npz"),
            ("sabr", {"ibp": 0.7, "ibp+crown": 0.75, "ibp+crown+alpha-crown": 0.76}, "idx"),
            ("crown-ibp", {"ibp": 0.868, "ibp+crown": 0.868, "ibp+crown+bab": 0.881}, "npz")]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "report.json").write_text(json.dumps({"clean_acc": 0.926, "pgd_acc": 0.89,
                                                   "certified_acc": cert, "train_time_s": 1786.6}))
        (d / "config.json").write_text(json.dumps({
            "method": method, "eps": 0.3 if ds == "npz" else 0.1, "epochs": 60, "dataset": ds,
            "train_path": "/usr/share/datasets/fashion-mnist", "sabr_lambda": 0.4}))
        runs.append(d)
    lines = tm.table(runs).splitlines()
    assert lines[2] == "| MNIST 0.3 | ibp | 60 | 92.6% | 89.0% | 85.9% / 86.1% / - | 1787 s |"
    assert lines[3] == ("| Fashion-MNIST 0.1 | sabr lambda 0.4 | 60 | 92.6% | 89.0% | "
                        "70.0% / 75.0% / 76.0% | 1787 s |")
    assert "| 86.8% / 86.8% / - / +BaB 88.1% | 1787 s |" in lines[4]   # the complete method's
    # the radius trained at and a model other than width 32 / fc 256, where the config has them
    cfg = json.loads((runs[0] / "config.json").read_text())
    cfg.update(train_eps=0.4, model_kwargs={"width": 64, "fc": 512, "bn": True}, seed=1)
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    assert tm.table(runs[:1]).splitlines()[2].startswith(
        "| MNIST 0.3 (trained at 0.4) | ibp, width 64 fc 512, seed 1 | 60 |")
    cfg.update(model_kwargs={"width": 16, "fc": 256, "bn": True, "extra_convs": 1}, seed=0)
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    assert tm.table(runs[:1]).splitlines()[2].startswith(
        "| MNIST 0.3 (trained at 0.4) | ibp, width 16 fc 256, 1 extra conv(s) per stage | 60 |")
    cfg.update(model_kwargs={"width": 32, "fc": 256, "bn": True}, augment_shift=2)
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    assert tm.table(runs[:1]).splitlines()[2].startswith(
        "| MNIST 0.3 (trained at 0.4) | ibp, shifts of up to 2 px | 60 |")
    cfg.update(augment_shift=0, lr=1e-3, batch_size=50)
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    assert tm.table(runs[:1]).splitlines()[2].startswith(
        "| MNIST 0.3 (trained at 0.4) | ibp, lr 0.001, batch 50 | 60 |")
    cfg.update(lr=5e-4, batch_size=100, ema_decay=0.999)
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    assert tm.table(runs[:1]).splitlines()[2].startswith(
        "| MNIST 0.3 (trained at 0.4) | ibp, EMA 0.999 | 60 |")


@pytest.mark.parametrize("argv, needle", [
    (["--table", "no_such_run"], "no_such_run hold no finished run"),
    (["mnist-0.3", "--method", "sabr", "--loss-fusion"], "needs --method crown-ibp"),
    (["mnist-0.4"], "unknown run(s) mnist-0.4"),
    (["mnist-0.3", "--train-eps", "-1"], "'train_eps': -1.0 is outside [0, 1]"),
    (["mnist-0.3", "--method", "ibp", "mtl-ibp", "--alpha", "2"], "'alpha'"),
    (["mnist-0.3", "--eval-methods", "ibp", "bab", "--bab-timeout", "0"], "'eval_bab_timeout_s'"),
    (["mnist-0.3", "--pgd-restarts", "0"], "'eval_pgd_restarts'"),
    (["mnist-0.3", "--extra-convs", "-1"], "--extra-convs -1"),
    (["mnist-0.3", "--lr", "0"], "'lr': must be > 0"),
    (["mnist-0.3", "--ema-decay", "1"], "'ema_decay': must lie in [0, 1)"),
    (["mnist-0.3", "--lr", "inf"], "'lr': must be > 0 and finite"),
    (["mnist-0.3", "--batch-size", "0"], "'batch_size'"),
])
def test_bad_arguments_are_one_clear_error(argv, needle, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_mnist.py"), *argv],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
