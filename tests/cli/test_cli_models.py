"""The model argument: every command that takes a MODEL takes an ONNX file or a PyTorch state dict
with --arch, the same way; a checkpoint without --arch says what to add; the format is read from
the file (a suffix that lies gives no protobuf error); MODEL and SPEC swapped are named as such."""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys

import numpy as np
import pytest
import torch

from cli_support import REPO

cli_main = importlib.import_module("verifier.cli.main")


def _subparsers():
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


# the VNN-COMP interface (instances.csv rows, run_instance.sh arguments) is ONNX by definition
VNNCOMP_ONLY = {"vnncomp-run"}
MODEL_COMMANDS = sorted(n for n, p in _subparsers().items()
                        if any(a.dest == "model" and not a.option_strings for a in p._actions)
                        and n not in VNNCOMP_ONLY)


def test_the_model_commands_are_found():
    assert {"bounds", "verify", "flatness", "sensitivity", "delta", "lipschitz"} <= \
        set(MODEL_COMMANDS)


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_takes_the_same_checkpoint_flags(name):
    p = _subparsers()[name]
    ref = {a.dest: (a.help, a.metavar, a.nargs) for a in _subparsers()["flatness"]._actions}
    got = {a.dest: (a.help, a.metavar, a.nargs) for a in p._actions}
    for dest in ("model", "arch", "arch_kwargs", "input_shape"):
        assert dest in got, (name, dest)
        if dest != "model":
            assert got[dest] == ref[dest], (name, dest)
    assert "PyTorch" in got["model"][0] and "--arch" in got["model"][0]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """The zoo's mlp_tanh (20 inputs, 4 outputs) as a state dict, a batch of inputs, a dataset,
    and a VNN-LIB property that every output satisfies somewhere (sat)."""
    sys.path.insert(0, str(REPO))
    from models.architectures import build
    d = tmp_path_factory.mktemp("ck")
    net, shape = build("mlp_tanh", seed=0)
    net.eval()
    torch.save(net.state_dict(), d / "m.pt")
    shutil.copy(d / "m.pt", d / "lying.onnx")            # a checkpoint under an ONNX name
    x = np.random.default_rng(0).uniform(-1, 1, (3, *shape)).astype(np.float32)
    np.save(d / "x.npy", x)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(d / "data.npz", x=x, y=y)
    lines = [f"(declare-const X_{i} Real)" for i in range(20)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(4)]
    lines += [f"(assert (>= X_{i} {x[0, i] - 0.01:.6f}))\n(assert (<= X_{i} {x[0, i] + 0.01:.6f}))"
              for i in range(20)]
    lines += ["(assert (>= Y_0 -1000.0))"]                 # holds everywhere: sat
    (d / "p.vnnlib").write_text("\n".join(lines) + "\n")
    return {"dir": d, "net": net, "x": x, "pt": str(d / "m.pt"), "xf": str(d / "x.npy"),
            "data": str(d / "data.npz"), "spec": str(d / "p.vnnlib")}


def _argv(name, ck, model):
    return {
        "bounds": ["bounds", model, "--input", ck["xf"], "--eps", "0"],
        "verify": ["verify", model, ck["spec"], "--timeout", "20"],
        "flatness": ["flatness", model, "--data", ck["data"], "--weights", "*",
                     "--weight-eps", "0.001", "--attack-steps", "1"],
        "sensitivity": ["sensitivity", model, "--data", ck["data"], "--weight-eps", "0.001",
                        "--attack-steps", "1"],
        "delta": ["delta", model, "--data", ck["data"], "--quantize", "8", "--attack-steps", "1"],
        "lipschitz": ["lipschitz", model],
    }[name]


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_a_checkpoint_without_arch_says_to_add_it(cli, ck, name):
    r = cli(*_argv(name, ck, ck["pt"]))
    assert r.code == 2 and r.out == "", r.err
    assert "is a PyTorch checkpoint: add --arch NAME" in r.err and "mlp_tanh" in r.err
    assert "DecodeError" not in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_runs_on_a_checkpoint_with_arch(cli, ck, name):
    r = cli(*_argv(name, ck, ck["pt"]), "--arch", "mlp_tanh")
    assert r.code == 0, r.err


def test_bounds_of_a_checkpoint_at_eps_0_are_its_torch_outputs(cli, ck):
    r = cli(*_argv("bounds", ck, ck["pt"]), "--arch", "mlp_tanh", "--json")
    assert r.code == 0, r.err
    with torch.no_grad():
        want = ck["net"](torch.from_numpy(ck["x"])).double().numpy()
    np.testing.assert_allclose(r.json["lower"], want, atol=1e-5)
    np.testing.assert_allclose(r.json["upper"], want, atol=1e-5)


def test_verify_a_checkpoint_replays_the_counterexample_on_its_torch_module(cli, ck):
    r = cli("verify", ck["pt"], ck["spec"], "--arch", "mlp_tanh", "--json")
    assert r.code == 0, r.err
    v = r.json
    assert v["status"] == "sat"
    cex = v["counterexample"]
    assert cex["replayed_by"] == "torch"
    x = torch.tensor(cex["x"], dtype=torch.float32).reshape(1, 20)
    assert np.all(np.abs(x.numpy()[0] - ck["x"][0]) <= 0.01 + 1e-6)
    with torch.no_grad():
        y = ck["net"](x).double().numpy()[0]
    np.testing.assert_allclose(cex["y"], y, atol=1e-5)


def test_a_checkpoint_named_onnx_is_read_as_a_checkpoint(cli, ck):
    lying = str(ck["dir"] / "lying.onnx")
    r = cli(*_argv("bounds", ck, lying))
    assert r.code == 2 and "is a PyTorch checkpoint: add --arch" in r.err
    assert "DecodeError" not in r.err
    r = cli(*_argv("bounds", ck, lying), "--arch", "mlp_tanh")
    assert r.code == 0, r.err


def test_a_shipped_zoo_checkpoint_without_arch_names_its_exact_flags(cli):
    r = cli("bounds", REPO / "models" / "cert_mnist_01.pt", "--input",
            REPO / "examples" / "data" / "mnist_sample.npy", "--eps", "0.01")
    assert r.code == 2
    assert "add --arch cnn_cert --arch-kwargs '{\"width\": 32, \"fc\": 256, \"bn\": true}'" in r.err


def test_arch_with_an_onnx_model_is_refused(cli, ck, tmp_path):
    from cli_support import make_mlp
    m = make_mlp(tmp_path / "m.onnx")
    r = cli("bounds", m, "--input", ck["xf"], "--eps", "0", "--arch", "mlp")
    assert r.code == 2 and "ONNX file" in r.err and "drop --arch" in r.err


def test_the_library_onnx_reader_names_a_checkpoint(ck):
    from verifier import BoundedModel
    from verifier.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="is a PyTorch checkpoint, not an ONNX file"):
        BoundedModel.from_onnx(ck["pt"])


# -- MODEL and SPEC swapped ----------------------------------------------------------------------

VNN = REPO / "tests" / "data" / "vnncomp_test"


def test_verify_with_model_and_spec_swapped_says_so(cli):
    r = cli("verify", VNN / "vnnlib" / "test_prop.vnnlib", VNN / "onnx" / "test_sat.onnx")
    assert r.code == 2 and "VNN-LIB property, not a model" in r.err and "swapped" in r.err
    assert "DecodeError" not in r.err and "protobuf" not in r.err.lower()


def test_verify_with_a_model_as_the_spec_says_so(cli):
    r = cli("verify", VNN / "onnx" / "test_sat.onnx", VNN / "onnx" / "test_sat.onnx")
    assert r.code == 2 and "not a VNN-LIB property" in r.err and "swapped" in r.err


def test_a_vnnlib_given_to_bounds_as_the_model_says_so(cli, ck):
    r = cli("bounds", ck["spec"], "--input", ck["xf"], "--eps", "0")
    assert r.code == 2 and "VNN-LIB property, not a model" in r.err


def test_the_library_reads_a_vnnlib_model_as_swapped(ck, tmp_path):
    from verifier import BoundedModel
    from verifier.errors import ModelLoadError
    shutil.copy(ck["spec"], tmp_path / "p.onnx")           # even under a model's name
    with pytest.raises(ModelLoadError, match="VNN-LIB property, not an ONNX model"):
        BoundedModel.from_onnx(tmp_path / "p.onnx")
