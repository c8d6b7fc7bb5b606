"""Every code snippet in README.md and docs/*.md runs.

* a ```python block is executed in a fresh namespace, with the repository root as the working
  directory and on ``sys.path`` (for ``models``);
* a ```bash block is run by bash (``set -e``) in a fresh temporary directory in which
  ``examples`` links to the repository's ``examples/`` and ``verifier`` runs
  ``python -m verifier`` with this interpreter;
* a block whose fence reads ```python no-run or ```bash no-run is not run (set-up commands,
  code meant to be pasted into the package). Any other fence (```text, ```console) is prose;
* a block identical to an earlier one (the README repeating a how-to's commands) runs once,
  under the first one's id; the later copy is listed as skipped, naming it.

The set-up section of the README must hold exactly the two commands that CI runs.
"""
from __future__ import annotations

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


def _blocks(lang: str):
    out, first = [], {}
    for path in DOCS:
        for info, line, code in code_blocks(path.read_text(encoding="utf-8")):
            words = info.split()
            if words[:1] == [lang]:
                where = f"{path.relative_to(ROOT)}:{line}"
                marks = [] if "no-run" not in words[1:] else [pytest.mark.skip(reason="no-run")]
                if not marks and code in first:
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
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    import torch
    state = torch.random.get_rng_state()
    try:
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    finally:
        torch.random.set_rng_state(state)


@pytest.mark.parametrize("code", BASH_BLOCKS)
def test_bash_snippet_runs(code, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "verifier"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m verifier "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "tests").symlink_to(ROOT / "tests")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}"
                                f"{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", "-e", "-c", code], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


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
