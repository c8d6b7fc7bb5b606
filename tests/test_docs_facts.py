"""What the docs, the --help texts and the repository's files say about the code, checked against
the code: the README's ONNX operator column, the --method help beside docs/cli.md, the examples
of every --help, repository paths named in code and help, the .gitignore."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# -- the README's table of ONNX activations ---------------------------------------------------------

ACTIVATIONS = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Exp", "Abs", "Sin",
               "Cos", "Erf", "HardSigmoid", "HardSwish", "Selu", "Softsign", "Floor"]


def _readme_onnx_activations() -> str:
    """The ONNX column of the README's two activation rows."""
    cells = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if re.match(r"^\| (activations|smooth and piecewise-linear activations) \|", line):
            cells.append(_outside_parentheses(line.split("|")[3]))
    assert len(cells) == 2
    return " ".join(cells)


def _outside_parentheses(text: str) -> str:
    """``text`` without its parenthesized remarks (which name ops a fused pattern is made of)."""
    out, depth = [], 0
    for ch in text:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(out)


def _one_node_model(path: Path, op: str) -> Path:
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node(op, ["x"], ["y"], name="act")
    g = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("op", ACTIVATIONS)
def test_the_readme_lists_an_onnx_activation_exactly_when_it_loads(op, tmp_path):
    import torch

    from verifier import BoundedModel, LpBall
    from verifier.errors import UnsupportedOpsError
    try:
        model = BoundedModel.from_onnx(_one_node_model(tmp_path / f"{op}.onnx", op))
        x = torch.tensor([[-0.7, 0.1, 1.3]])
        r = model.bounds(LpBall(x, 0.2), method="ibp")
        assert torch.all(r.lower <= r.upper)
        loads = True
    except UnsupportedOpsError:
        loads = False
    listed = f"`{op}`" in _readme_onnx_activations()
    assert listed == loads, f"ONNX {op}: loads={loads}, listed in the README={listed}"


# -- the --help texts --------------------------------------------------------------------------

def _subparsers():
    import importlib
    main = importlib.import_module("verifier.cli.main")
    parser = main.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _plain(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_bounds_method_help_says_what_docs_cli_says():
    row = next(ln for ln in (ROOT / "docs" / "cli.md").read_text().splitlines()
               if ln.startswith("| `--method {ibp,crown,crown-ibp,alpha-crown}` |"))
    docs = _plain(row.split("|")[2])
    action = next(a for a in _subparsers()["bounds"]._actions if a.dest == "method")
    assert _plain(action.help) == docs


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_help_examples_have_no_broken_line_continuation(name):
    """A backslash at the end of a line in a Python string joins the lines (the backslash and
    the newline vanish): the example then shows as one line with a gap in it."""
    p = _subparsers()[name]
    for line in (p.epilog or "").splitlines():
        command = line.split("#")[0].rstrip()
        if not command.strip():
            continue
        assert not re.search(r"\S {3,}\S", command), f"verifier {name} --help: {line!r}"
    help_text = p.format_help()
    lines = help_text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.rstrip().endswith("\\"):
            assert lines[i + 1].startswith("      "), (name, line, lines[i + 1])


_REPO_PATH = re.compile(r"\b(?:models|docs|examples|benchmarks|tests|vnncomp)/[A-Za-z0-9_./-]+"
                        r"\.(?:md|json|py|sh|csv|npz|npy|onnx|pt)\b")


def test_repository_paths_named_in_code_and_help_exist():
    missing = []
    for folder in ("verifier", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for m in _REPO_PATH.finditer(path.read_text(encoding="utf-8")):
                if not (ROOT / m.group(0)).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert missing == []


# -- the repository ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gitignore_ignores_a_virtual_environment():
    for probe in (".venv/bin/python", ".venv/lib/site.py"):
        r = subprocess.run(["git", "check-ignore", "--no-index", "-q", probe], cwd=ROOT)
        assert r.returncode == 0, probe
