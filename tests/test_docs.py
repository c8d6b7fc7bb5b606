"""Every code snippet in README.md and docs/*.md runs.

* a ```python block is executed in a fresh namespace, with the repository root as the working
  directory and on ``sys.path`` (for ``models``);
* a ```bash block is run by bash (``set -e``) in a fresh temporary directory in which
  ``examples`` (and ``models``, ``tests``) link to the repository's folders and ``verifier`` runs
  ``python -m verifier`` with this interpreter;
* a block whose fence reads ```python no-run or ```bash no-run is not run (set-up commands,
  code meant to be pasted into the package). Any other fence (```text, ```console) is prose;
* a block identical to an earlier one (the README repeating a how-to's commands) runs once,
  under the first one's id; the later copy is listed as skipped, naming it.

The set-up section of the README must hold exactly the two commands that CI runs, and the
training section's snippet and command must reproduce the figures its text states (they run
once, in that test).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SETUP_COMMANDS = [
    "pip install -r requirements.txt -e . && verifier bounds "
    "examples/data/lirpa_mnist_fc_3layer.onnx --input examples/data/mnist_sample.npy --eps 0.03 "
    "--label examples/data/mnist_label.npy --method crown",
    'pip install -r requirements.txt -e ".[test]" && python -m pytest -q',
]

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def code_blocks(text: str):
    """(info string, first line number of the code, code) of each fenced block of ``text``."""
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start(2)) + 1
        yield m.group(1).strip(), line, m.group(2)


TRAIN_SECTION = "## Certified training: `verifier train`"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^{re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README.md has no {title!r} section"
    return m.group(1)


def _training_snippets() -> tuple[str, str]:
    """The README training section's first python and first bash block."""
    blocks = list(code_blocks(_section(TRAIN_SECTION)))
    python = next(code for info, _, code in blocks if info == "python")
    bash = next(code for info, _, code in blocks if info == "bash")
    return python, bash


def _blocks(lang: str):
    out, first = [], {}
    figures = set(_training_snippets())
    for path in DOCS:
        for info, line, code in code_blocks(path.read_text(encoding="utf-8")):
            words = info.split()
            if words[:1] == [lang]:
                where = f"{path.relative_to(ROOT)}:{line}"
                marks = [] if "no-run" not in words[1:] else [pytest.mark.skip(reason="no-run")]
                if not marks and code in figures:
                    marks = [pytest.mark.skip(reason="run by test_readme_training_figures_hold")]
                elif not marks and code in first:
                    marks = [pytest.mark.skip(reason=f"the same code runs as {first[code]}")]
                elif not marks:
                    first[code] = where
                out.append(pytest.param(code, id=where, marks=marks))
    return out


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


@pytest.fixture
def registries():
    """Snapshot the operator registry and mapping tables: a snippet (adding an operator) may
    register a rule; the other tests must not see it."""
    from verifier.graph import mapping
    from verifier.ops import RULES
    tables = [RULES, mapping.FUNCTIONS, mapping.METHODS]
    saved = [dict(t) for t in tables]
    modules = mapping._MODULES
    saved_modules = None if modules is None else dict(modules)
    yield
    for t, s in zip(tables, saved):
        t.clear()
        t.update(s)
    if saved_modules is None:
        mapping._MODULES = None
    else:
        mapping._MODULES.clear()
        mapping._MODULES.update(saved_modules)


def test_docs_have_runnable_snippets():
    assert len(PYTHON_BLOCKS) >= 10, [p.id for p in PYTHON_BLOCKS]
    assert (ROOT / "docs").is_dir()


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_snippet_runs(code, monkeypatch, registries):
    _exec_python(code, monkeypatch)


def _exec_python(code: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    import torch
    state = torch.random.get_rng_state()
    try:
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    finally:
        torch.random.set_rng_state(state)


def _run_bash(code: str, tmp_path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``code`` as the module doc says; -> (the finished process, its working folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "verifier"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m verifier "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "tests").symlink_to(ROOT / "tests")
    (work / "models").symlink_to(ROOT / "models")       # the zoo's shipped .onnx files
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}"
                                f"{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", "-e", "-c", code], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r, work


@pytest.mark.parametrize("code", BASH_BLOCKS)
def test_bash_snippet_runs(code, tmp_path):
    _run_bash(code, tmp_path)


# "clean accuracy 0.83, PGD accuracy 0.58, certified accuracy 0.47 by IBP, 0.57 by IBP then
# CROWN, 0.58 with alpha-CROWN" in the training section's prose
_FIGURES = re.compile(r"clean accuracy ([0-9.]+), PGD accuracy ([0-9.]+), certified accuracy "
                      r"([0-9.]+) by IBP, ([0-9.]+) by IBP then CROWN, ([0-9.]+) with alpha-CROWN")
# one test sample of the 100 is 0.01: float rounding that differs between torch builds moves a
# few samples, a wrong default or a stale figure moves dozens
FIGURE_TOL = 0.05


def test_readme_training_figures_hold_for_the_snippet_and_the_command(tmp_path, monkeypatch,
                                                                        capsys):
    """The figures the README states for its training snippet and command are what both print:
    the same defaults reach the same model; the command's report plots what it measured."""
    m = _FIGURES.search(" ".join(_section(TRAIN_SECTION).split()))
    assert m, "the README's training section does not state its figures in the form read here"
    clean, pgd, ibp, crown, alpha = map(float, m.groups())
    python, bash = _training_snippets()

    _exec_python(python, monkeypatch)
    printed = capsys.readouterr().out.strip().splitlines()[-1]     # clean pgd {method: acc}
    p_clean, p_pgd, p_cert = printed.split(" ", 2)
    p_cert = ast.literal_eval(p_cert)
    got = {"clean": float(p_clean), "pgd": float(p_pgd), "ibp": p_cert["ibp"],
           "crown": p_cert["ibp+crown"]}
    want = {"clean": clean, "pgd": pgd, "ibp": ibp, "crown": crown}
    for k in want:
        assert abs(got[k] - want[k]) <= FIGURE_TOL, ("python snippet", k, got, want)

    r, work = _run_bash(bash, tmp_path)
    rep = json.loads((work / "runs" / "digits" / "report.json").read_text())
    cert = rep["certified_acc"]
    got = {"clean": rep["clean_acc"], "pgd": rep["pgd_acc"], "ibp": cert["ibp"],
           "crown": cert["ibp+crown"], "alpha": cert["ibp+crown+alpha-crown"]}
    for k, v in {**want, "alpha": alpha}.items():
        assert abs(got[k] - v) <= FIGURE_TOL, ("bash command", k, got, want)
    # not from the README: the run learned the task and its certificates are consistent
    assert got["ibp"] <= got["crown"] <= got["alpha"] <= got["pgd"] <= got["clean"]
    assert rep["violations"] == 0 and rep["warnings"] == [] and "warning:" not in r.stderr
    # its page plots certified accuracy against eps and the training curves
    page = (work / "train.html").read_text(encoding="utf-8")
    for alt in ("certified accuracy vs eps", "training curves"):
        assert f'alt="{alt}" src="data:image/png;base64,' in page, alt


def _setup_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Set-up: two commands\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## Set-up: two commands' section"
    section = m.group(1)
    return [code.strip() for _, _, code in code_blocks(section)]


def test_readme_setup_section_holds_exactly_the_two_ci_commands():
    assert _setup_blocks() == SETUP_COMMANDS


def test_readme_first_setup_command_bounds_the_shipped_model():
    """The part after the install of the first set-up command (what CI runs) works."""
    cmd = SETUP_COMMANDS[0].split(" && ", 1)[1].split()
    assert cmd[0] == "verifier"
    r = subprocess.run([sys.executable, "-m", "verifier", *cmd[1:]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "verified:" in r.stdout and "margins f_7 - f_j" in r.stdout
