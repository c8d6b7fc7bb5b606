"""Output paths: every flag that names a file (or folder) to write is checked while the flags are
read, before any work; files are written atomically; a write that fails after the work still
leaves the results on stdout or in a fallback file, and no error names an internal temporary
file."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import time

import numpy as np
import pytest

from cli_support import make_mlp, onnx_forward
from verifier.cli.util import output_dir, output_file, plot_file

cli_main = importlib.import_module("verifier.cli.main")

# The arguments each subcommand needs to parse, with OUT where a positional output goes. The run
# function is replaced by a spy, so these files need not exist. A new subcommand must be added.
BASE_ARGV = {
    "bounds": ["m.onnx"],
    "flatness": ["m.onnx", "--data", "d.npz"],
    "sensitivity": ["m.onnx", "--data", "d.npz"],
    "delta": ["m.onnx", "--data", "d.npz"],
    "train": [],
    "lipschitz": ["m.onnx"],
    "verify": ["m.onnx", "s.vnnlib"],
    "batch": ["i.csv", "--out", "{ok}/r.csv"],
    "vnncomp-run": ["cat", "m.onnx", "s.vnnlib", "{OUT}", "10"],
    "report": ["f.csv"],
}

_OUTPUT_WORDS = re.compile(r"\b(write|writes|written|draw|draws|save|saves|results file|"
                           r"run folder|output)\b", re.I)


def _subparsers():
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _looks_like_output(action) -> bool:
    """An independent guess, from the help text and names, that a flag names a path to write."""
    if action.nargs == 0 or action.choices is not None or action.type not in (None, str):
        return False                         # flags (--json), choices, numbers: not paths
    words = " ".join(filter(None, [action.help, action.dest, str(action.metavar or "")]))
    return bool(_OUTPUT_WORDS.search(words)) or action.dest in ("out", "output", "results")


def _output_actions():
    out = []
    for name, p in _subparsers().items():
        for a in p._actions:
            if a.type in (output_file, output_dir, plot_file) or _looks_like_output(a):
                out.append((name, a))
    return out


OUTPUTS = _output_actions()
IDS = [f"{n}:{(a.option_strings or [a.dest])[0]}" for n, a in OUTPUTS]


def test_the_issue_flags_are_among_the_outputs_found():
    found = {(n, (a.option_strings or [a.dest])[0]) for n, a in OUTPUTS}
    for flag in [("sensitivity", "--plot"), ("flatness", "--csv"), ("verify", "--cex-file"),
                 ("batch", "--out"), ("report", "--html"), ("vnncomp-run", "results"),
                 ("train", "--output"), ("delta", "--csv")]:
        assert flag in found, flag


def test_every_subcommand_has_a_base_argv():
    assert set(_subparsers()) == set(BASE_ARGV)


@pytest.mark.parametrize("name,action", OUTPUTS, ids=IDS)
def test_every_output_flag_is_validated_when_the_flags_are_read(name, action):
    assert action.type in (output_file, output_dir, plot_file), \
        f"{name} {action.option_strings or action.dest}: give it type=output_file (or output_dir)"


def _argv(name, action, path, ok):
    base = [s.replace("{ok}", str(ok)) for s in BASE_ARGV[name]]
    if action.option_strings:
        flag = action.option_strings[0]
        if flag in base:                       # a required flag already in the base: replace it
            i = base.index(flag)
            base[i + 1] = path
            return [name, *base]
        return [name, *base, flag, path]
    return [name, *[path if s == "{OUT}" else s for s in base]]


@pytest.fixture
def spy(monkeypatch):
    """Every subcommand's run replaced by a spy that records the call."""
    calls = []
    subs = [dataclasses.replace(c, run=lambda a, n=c.name: calls.append(n) or 0)
            for c in cli_main.SUBCOMMANDS]
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", subs)
    return calls


def _suffix(action):
    return ".png" if action.type is plot_file else ".csv"


@pytest.mark.parametrize("name,action", OUTPUTS, ids=IDS)
def test_a_path_in_a_missing_folder_is_refused_before_any_work(name, action, spy, tmp_path,
                                                               capsys):
    if action.type is output_dir:   # a run folder is created, parents and all: not under a file
        (tmp_path / "nodir").write_text("a file")
        bad, needle = str(tmp_path / "nodir" / "run"), "is a file"
    else:
        bad, needle = str(tmp_path / "nodir" / f"x{_suffix(action)}"), "does not exist"
    code = cli_main.main(_argv(name, action, bad, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and spy == [], (code, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "nodir" in err and needle in err and f"verifier {name} --help" in err
    if action.type is output_dir:
        return
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("name,action", OUTPUTS, ids=IDS)
def test_a_folder_given_as_a_file_or_a_file_as_a_folder_is_refused(name, action, spy, tmp_path,
                                                                    capsys):
    if action.type is output_dir:
        target = tmp_path / "afile"
        target.write_text("keep me")
        needle = "is a file"
    else:
        target = tmp_path / f"adir{_suffix(action)}"
        target.mkdir()
        needle = "is a folder"
    code = cli_main.main(_argv(name, action, str(target), tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and spy == [] and needle in err, (code, err)


def test_a_plot_with_a_suffix_matplotlib_cannot_write_is_refused(spy, tmp_path, capsys):
    code = cli_main.main(["flatness", "m.onnx", "--data", "d.npz", "--plot",
                          str(tmp_path / "curve.txt")])
    err = capsys.readouterr().err
    assert code == 2 and spy == [] and "curve.txt" in err and ".png" in err


def test_a_good_output_path_passes(spy, tmp_path):
    assert cli_main.main(["flatness", "m.onnx", "--data", "d.npz", "--csv",
                          str(tmp_path / "c.csv"), "--plot", str(tmp_path / "c.png")]) == 0
    assert spy == ["flatness"] and list(tmp_path.iterdir()) == []   # nothing created


# -- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wdata(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    model = make_mlp(d / "mlp.onnx")
    x = np.random.default_rng(3).uniform(0, 1, (6, 1, 2, 2)).astype(np.float32)
    y = onnx_forward(model, x).argmax(1).astype(np.int64)
    np.savez(d / "data.npz", x=x, y=y)
    return {"model": str(model), "data": str(d / "data.npz")}


def test_sensitivity_plot_into_a_missing_folder_fails_at_once(cli, wdata, tmp_path, monkeypatch):
    import verifier.analysis.sensitivity as sens

    def never(*a, **k):
        raise AssertionError("the work ran")
    monkeypatch.setattr(sens, "sensitivity", never)
    t0 = time.perf_counter()
    r = cli("sensitivity", wdata["model"], "--data", wdata["data"], "--weight-eps", "0.01",
            "--plot", tmp_path / "nodir" / "s.png")
    assert r.code == 2 and "nodir" in r.err and r.out == ""
    assert time.perf_counter() - t0 < 2


def test_delta_plot_is_refused_before_the_work(cli, wdata, monkeypatch, tmp_path):
    import verifier.cli.weights as cw

    def never(a):
        raise AssertionError("the work ran")
    monkeypatch.setattr(cw, "_load", never)
    r = cli("delta", wdata["model"], "--data", wdata["data"], "--quantize", "8", "--plot",
            tmp_path / "d.png")
    assert r.code == 2 and "--plot" in r.err and "delta" in r.err


def test_a_csv_that_cannot_be_written_after_the_work_keeps_the_table(cli, wdata, tmp_path,
                                                                     monkeypatch):
    """The folder of --csv disappears while flatness runs: the table still reaches stdout and
    the CSV is saved in the temporary folder, named in the error."""
    import shutil

    import verifier.analysis.flatness as fl
    folder = tmp_path / "gone"
    folder.mkdir()
    real = fl.flatness

    def flatness_then_remove(*a, **k):
        r = real(*a, **k)
        shutil.rmtree(folder)
        return r
    monkeypatch.setattr(fl, "flatness", flatness_then_remove)
    r = cli("flatness", wdata["model"], "--data", wdata["data"], "--weights", "*",
            "--weight-eps", "0.01", "--csv", folder / "c.csv")
    assert r.code == 2
    assert "certified" in r.out and "0.01" in r.out           # the table
    assert "gone/c.csv" in r.err and "saved to " in r.err and ".tmp" not in r.err
    fallback = r.err.split("saved to ")[1].split(" instead")[0]
    try:
        head = open(fallback).readline()
        assert head.startswith("label,n,clean_loss,certified_loss")
    finally:
        os.remove(fallback)


def test_verify_prints_the_counterexample_when_the_cex_file_cannot_be_written(cli, tmp_path,
                                                                              monkeypatch):
    import shutil

    import verifier.complete as complete
    from cli_support import REPO
    d = REPO / "tests" / "data" / "vnncomp_test"
    folder = tmp_path / "gone"
    folder.mkdir()
    real = complete.verify

    def verify_then_remove(*a, **k):
        v = real(*a, **k)
        shutil.rmtree(folder)
        return v
    monkeypatch.setattr(complete, "verify", verify_then_remove)
    r = cli("verify", d / "onnx" / "test_sat.onnx", d / "vnnlib" / "test_prop.vnnlib",
            "--cex-file", folder / "c.txt", "--timeout", "30")
    assert r.code == 2 and r.out.startswith("sat")
    assert "(X_0 " in r.out and "gone/c.txt" in r.err
    fallback = r.err.split("saved to ")[1].split(" instead")[0]
    try:
        assert open(fallback).read().startswith("((X_0 ")
    finally:
        os.remove(fallback)


def test_batch_results_in_a_missing_folder_never_names_a_temporary_file(cli, tmp_path):
    from cli_support import REPO
    inst = REPO / "tests" / "data" / "vnncomp_test" / "instances.csv"
    r = cli("batch", inst, "--out", tmp_path / "nodir" / "r.csv")
    assert r.code == 2 and "nodir" in r.err and ".tmp" not in r.err


def test_results_file_error_names_the_results_file_not_its_temporary(tmp_path):
    from verifier.schedule import ResultsFile
    target = tmp_path / "nodir" / "r.csv"
    with pytest.raises(OSError) as e:
        ResultsFile(str(target))
    assert e.value.filename == str(target) and ".tmp" not in str(e.value)


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
    from verifier.files import write_atomically
    target = tmp_path / "t.csv"
    target.write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("new, partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError) as e:
        write_atomically(str(target), half_then_fail)
    assert e.value.filename == str(target)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.csv"]


def test_write_atomically_gives_a_new_file_the_usual_mode(tmp_path):
    from verifier.files import write_atomically
    (tmp_path / "plain").write_text("x")
    write_atomically(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").write("y"))
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "plain").st_mode
