"""The `verifier` entry point: help, exit statuses, `python -m verifier`, lazy imports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_support import EXAMPLES, REPO


def test_help_lists_the_commands(cli):
    r = cli("--help")
    assert r.code == 0 and "bounds" in r.out and "COMMAND" in r.out


def test_no_command_prints_help_and_exits_2(cli):
    r = cli()
    assert r.code == 2 and r.out == "" and "usage: verifier" in r.err and "bounds" in r.err


def test_unknown_command_is_a_usage_error(cli):
    r = cli("frobnicate")
    assert r.code == 2 and r.err.startswith("error: ") and "frobnicate" in r.err


def test_version(cli):
    r = cli("--version")
    assert r.code == 0 and r.out.startswith("verifier ")


def test_bounds_help_documents_every_flag_and_has_examples(cli):
    r = cli("bounds", "--help")
    assert r.code == 0
    for flag in ("--input", "--eps", "--norm", "--clip", "--lower", "--upper", "--method",
                 "--label", "--json", "--threads", "--dtype", "--debug", "MODEL", "--arch",
                 "--weights", "--weight-eps", "--weight-norm", "--relative", "--style",
                 "--generators", "--at"):
        assert flag in r.out, flag
    for word in ("ibp", "crown-ibp", "float64", "busy machine", "f_Y - f_j"):
        assert word in r.out, word
    examples = r.out.split("examples:")[1]
    assert examples.count("verifier bounds") == 4


def _python_m(*argv):
    return subprocess.run([sys.executable, "-m", "verifier", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_python_m_verifier_runs_the_readme_command_and_fails_cleanly():
    r = _python_m("bounds", EXAMPLES / "lirpa_mnist_fc_3layer.onnx", "--input",
                  EXAMPLES / "mnist_sample.npy", "--eps", 0.03, "--label",
                  EXAMPLES / "mnist_label.npy", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)                       # stdout holds the JSON and nothing else
    assert len(d["lower"][0]) == 9 and d["verified"] == [False]
    r = _python_m("bounds", "absent.onnx", "--input", EXAMPLES / "mnist_sample.npy", "--eps", 0.1)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = _python_m()
    assert r.returncode == 2 and "usage" in r.stderr


def test_help_does_not_import_torch():
    for argv in (["--help"], ["bounds", "--help"], ["bounds", "m.onnx", "--eps", "-1"],
                 ["train", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "verifier", *argv],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
        assert "torch" not in imported and "numpy" not in imported, argv


@pytest.mark.parametrize("argv", [["bounds", "m.onnx", "--input", "x.npy", "--eps", "0.1"],
                                  ["verify", "m.onnx", "p.vnnlib"], ["report", "r.csv"],
                                  ["flatness", "m.onnx", "--data", "d.npz"]])
def test_an_unknown_flag_points_to_the_subcommands_help(cli, argv):
    r = cli(*argv, "--frobnicate")
    assert r.code == 2 and r.out == ""
    assert r.err.strip() == (f"error: unrecognized arguments: --frobnicate "
                             f"(see 'verifier {argv[0]} --help')")
